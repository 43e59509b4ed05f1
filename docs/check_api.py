"""Fails when a public name of normjax has no docstring or no entry in the API reference.

Run from the repository root before `mkdocs build --strict -f docs/mkdocs.yml`:

    .venv/bin/python docs/check_api.py

The public names of a module are its `__all__`, or, without one (`normjax`), its attributes whose
names do not start with an underscore, modules excluded. Each must

* have a docstring of its own: a class's auto-generated `Name(field, ...)` docstring (NamedTuple,
  dataclass) does not count, and neither does one inherited from a base class;
* have a `::: module.name` entry on a page under `docs/pages/`;

Every `::: identifier` on the pages must name a documented module or one of these names, so a stale
entry fails too. Public methods and properties (and `__call__`) that a public class defines itself
without a docstring are listed as warnings; with `--members` they fail the check too. Exit status 1 with
one line per problem; 0 with a summary otherwise.
"""

import dataclasses
import importlib
import inspect
import pathlib
import re
import sys

MODULES = ("normjax", "normjax.linen", "normjax.nnx", "normjax.equinox")
PAGES = pathlib.Path(__file__).resolve().parent / "pages"
_DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", re.MULTILINE)


def public_names(module):
  """The public names of `module`: `__all__`, else its non-underscore attributes that are not modules."""
  if hasattr(module, "__all__"):  # dunder entries (`__version__`) are data, not API
    return [n for n in module.__all__ if not (n.startswith("__") and n.endswith("__"))]
  return sorted(
    n for n, v in vars(module).items() if not n.startswith("_") and not inspect.ismodule(v)
  )


def own_docstring(obj):
  """The docstring `obj` defines itself, or None (auto-generated and inherited ones do not count)."""
  if inspect.isclass(obj):
    doc = obj.__dict__.get("__doc__")
    if doc and doc.lstrip().startswith(f"{obj.__name__}("):  # NamedTuple / dataclass signature
      return None
  else:
    doc = getattr(obj, "__doc__", None)
  return doc if doc and doc.strip() else None


def undocumented_members(cls):
  """Names of the public methods and properties that `cls` defines itself without a docstring."""
  missing = []
  fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
  for name, member in vars(cls).items():
    if (name.startswith("_") and name != "__call__") or name in fields:  # a field's default is data
      continue
    if isinstance(member, (staticmethod, classmethod)):
      member = member.__func__
    if isinstance(member, property) or inspect.isfunction(member):
      if not (member.__doc__ and member.__doc__.strip()):
        missing.append(name)
  return missing


def documented_identifiers():
  """Every `::: identifier` of the pages, mapped to the pages that name it."""
  found = {}
  for page in sorted(PAGES.rglob("*.md")):
    for ident in _DIRECTIVE.findall(page.read_text(encoding="utf-8")):
      found.setdefault(ident, []).append(str(page.relative_to(PAGES)))
  return found


def main(argv):
  strict_members = "--members" in argv
  problems, warnings, checked = [], [], 0
  identifiers = documented_identifiers()
  expected = set()
  for module_name in MODULES:
    module = importlib.import_module(module_name)
    expected.add(module_name)
    if not (module.__doc__ and module.__doc__.strip()):
      problems.append(f"{module_name}: the module has no docstring")
    for name in public_names(module):
      full = f"{module_name}.{name}"
      expected.add(full)
      checked += 1
      if not hasattr(module, name):
        problems.append(f"{full}: listed in __all__ but not defined")
        continue
      obj = getattr(module, name)
      if own_docstring(obj) is None:
        problems.append(f"{full}: no docstring of its own")
      if inspect.isclass(obj):
        for member in undocumented_members(obj):
          (problems if strict_members else warnings).append(
            f"{full}.{member}: public method or property without a docstring"
          )
      if full not in identifiers:
        problems.append(
          f"{full}: missing from the API pages (add '::: {full}' to a page under docs/pages/api/)"
        )
  for ident, pages in sorted(identifiers.items()):
    if ident not in expected:
      problems.append(
        f"'::: {ident}' in {', '.join(pages)}: not a public name of {', '.join(MODULES)}"
      )
  for line in warnings:
    print(f"check_api: warning: {line}", file=sys.stderr)
  for line in problems:
    print(f"check_api: {line}", file=sys.stderr)
  if problems:
    print(f"check_api: {len(problems)} problem(s)", file=sys.stderr)
    return 1
  print(
    f"check_api: {checked} public names in {len(MODULES)} modules, all documented and on the "
    f"API pages ({len(warnings)} member warning(s))"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
