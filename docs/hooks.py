"""MkDocs hooks: publish repository files in place and include README sections by heading.

Two jobs, so that nothing in the site is a second copy that can drift:

* `on_files` adds files that live outside `docs/pages/` (RESULTS.md and its `results/*.png`,
  BENCHMARKS.md, the notebooks, `docs/migration.md`, `experiments/README.md`) under their repository
  paths, so every relative link that works on GitHub works in the site, and strict mode checks it.
* `on_page_markdown` replaces a line `<!-- include FILE "HEADING" [mode=M] [level=N] -->` by a part of
  FILE (relative to the repository root) found by its exact heading line: `mode=section` (default) the
  heading with everything under it, `mode=intro` the text between the heading and the next heading,
  `mode=subsections` everything under the heading after its intro. `level=N` shifts the headings so that
  the first included one has level N. A missing file or heading fails the build. It also gives a code
  fence tagged after its language (```` ```python before-linen ````) the tag as its title.
"""

import glob
import logging
import os
import re

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.normjax")

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))

# Repository files published under their own paths (glob patterns relative to ROOT).
EXTERNAL = (
  "BENCHMARKS.md",
  "RESULTS.md",
  "results/*.png",
  "notebooks/*.ipynb",
  "docs/migration.md",
  "experiments/README.md",
)

_INCLUDE = re.compile(r'^<!--\s*include\s+(\S+)\s+"([^"]+)"((?:\s+\w+=\S+)*)\s*-->\s*$')
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s")
_MODES = ("section", "intro", "subsections")
# A fence opened as "```python before-linen" (the migration guide tags its blocks for its test) is not
# a fence header that pymdownx.superfences accepts; the tag becomes the block's title.
_TAGGED_FENCE = re.compile(
  r"^(?P<indent>\s*)(?P<fence>```+|~~~+)(?P<lang>[\w+#.-]+)\s+(?P<tag>[\w.-]+)\s*$"
)


@event_priority(100)  # before mkdocs-jupyter turns the notebooks into pages
def on_files(files, config):
  """Adds the repository files of `EXTERNAL` to the site, keeping their repository paths."""
  for pattern in EXTERNAL:
    paths = sorted(glob.glob(os.path.join(ROOT, pattern)))
    if not paths:
      raise PluginError(f"docs/hooks.py: pattern {pattern!r} matches no file under {ROOT}")
    for path in paths:
      rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
      if files.get_file_from_path(rel) is None:
        files.append(File(rel, ROOT, config["site_dir"], config["use_directory_urls"]))
  return files


def _lines_outside_fences(lines):
  """Yields (index, heading level or 0) for each line; lines inside code fences are never headings."""
  fenced = False
  for i, line in enumerate(lines):
    if _FENCE.match(line):
      fenced = not fenced
      yield i, 0
      continue
    match = None if fenced else _HEADING.match(line)
    yield i, (len(match.group(1)) if match else 0)


def extract(text, heading, mode="section", level=None):
  """Returns the part of `text` under the exact heading line `heading` (see the module docstring)."""
  if mode not in _MODES:
    raise PluginError(f"include mode={mode!r} is not one of {_MODES}")
  lines = text.splitlines()
  levels = dict(_lines_outside_fences(lines))
  starts = [i for i, lvl in levels.items() if lvl and lines[i].strip() == heading.strip()]
  if len(starts) != 1:
    raise PluginError(
      f"include: heading {heading!r} found {len(starts)} times, expected exactly once"
    )
  start = starts[0]
  own = levels[start]
  end = next(
    (i for i in range(start + 1, len(lines)) if levels[i] and levels[i] <= own), len(lines)
  )
  first_sub = next((i for i in range(start + 1, end) if levels[i]), end)
  part = {
    "section": (start, end),
    "intro": (start + 1, first_sub),
    "subsections": (first_sub, end),
  }[mode]
  chunk = lines[part[0] : part[1]]
  if level is not None:
    top = min((levels[i] for i in range(*part) if levels[i]), default=None)
    if top is not None:
      shift = level - top
      chunk = [
        ("#" * (levels[i] + shift) + lines[i][levels[i] :]) if levels[i] else lines[i]
        for i in range(*part)
      ]
  return "\n".join(chunk).strip("\n") + "\n"


def on_page_markdown(markdown, page, config, files):
  """Expands the `<!-- include ... -->` lines of a page."""
  out = []
  for line in markdown.splitlines():
    tagged = _TAGGED_FENCE.match(line)
    if tagged:
      out.append('{indent}{fence}{lang} title="{tag}"'.format(**tagged.groupdict()))
      continue
    match = _INCLUDE.match(line)
    if not match:
      out.append(line)
      continue
    name, heading, raw_opts = match.groups()
    opts = dict(opt.split("=", 1) for opt in raw_opts.split())
    unknown = set(opts) - {"mode", "level"}
    if unknown:
      raise PluginError(f"{page.file.src_uri}: unknown include option(s) {sorted(unknown)}")
    path = os.path.join(ROOT, name)
    if not os.path.isfile(path):
      raise PluginError(f"{page.file.src_uri}: include file {name!r} does not exist under {ROOT}")
    with open(path, encoding="utf-8") as f:
      text = f.read()
    level = int(opts["level"]) if "level" in opts else None
    try:
      out.append(extract(text, heading, opts.get("mode", "section"), level))
    except PluginError as e:
      raise PluginError(f"{page.file.src_uri}: {name}: {e}") from None
  return "\n".join(out) + "\n"
