"""A griffe extension that reads normjax's docstring conventions for the API reference.

normjax's Google-style docstrings use two forms that griffe's Google parser does not know:

* one `Args:` item for several parameters that share a description, `use_scale, use_bias: ...`
  (the names may wrap onto the next lines). The item is split into one item per name, each with the
  shared description, so every name is checked against the signature (strict mode fails on a name that
  is not a parameter) and gets its own row.
* the section title `Example:` (singular), which griffe would render as an admonition, so that the
  doctest's output lines became Markdown. It is read as `Examples:`, rendered as a code block.

Only the text handed to the renderer changes; the source docstrings stay as they are.
"""

import re

import griffe

_SECTION = re.compile(r"^(?P<title>[A-Za-z][A-Za-z ]*):\s*$")
_ITEM_SECTIONS = {
  "args",
  "arguments",
  "params",
  "parameters",
  "attributes",
  "keyword args",
  "keyword arguments",
  "other parameters",
}
_NAMES = re.compile(r"^(?P<names>\**\w+(?:\s*,\s*\**\w+)+)\s*:(?P<rest>.*)$")
_NAME_LIST_PREFIX = re.compile(r"^\**\w+(?:\s*,\s*\**\w+)*\s*,$")


def _indent(line):
  return len(line) - len(line.lstrip(" "))


def _split_items(body):
  """Splits the grouped items of one Args-like section body (a list of lines)."""
  items = [line for line in body if line.strip()]
  if not items:
    return body
  item_indent = min(_indent(line) for line in items)
  out, i = [], 0
  while i < len(body):
    line = body[i]
    if not line.strip() or _indent(line) != item_indent:
      out.append(line)
      i += 1
      continue
    # The names may wrap: "a, b, c,\n    d, e: description".
    header, j = line.strip(), i + 1
    while _NAME_LIST_PREFIX.match(header) and j < len(body) and _indent(body[j]) > item_indent:
      header += " " + body[j].strip()
      j += 1
    match = _NAMES.match(header)
    if not match:
      out.append(line)
      i += 1
      continue
    k = j
    while k < len(body) and body[k].strip() and _indent(body[k]) > item_indent:
      k += 1
    names = [n.strip() for n in match.group("names").split(",")]
    for name in names:
      out.append(" " * item_indent + f"{name}:{match.group('rest')}")
      out.extend(body[j:k])
    i = k
  return out


def rewrite(text):
  """Returns the docstring `text` with grouped items split and `Example:` read as `Examples:`."""
  lines = text.splitlines()
  out, i = [], 0
  while i < len(lines):
    match = _SECTION.match(lines[i])
    if not match:
      out.append(lines[i])
      i += 1
      continue
    title = match.group("title")
    out.append("Examples:" if title == "Example" else lines[i])
    j = i + 1
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > 0):
      j += 1
    body = lines[i + 1 : j]
    out.extend(_split_items(body) if title.lower() in _ITEM_SECTIONS else body)
    i = j
  return "\n".join(out)


class NormjaxDocstrings(griffe.Extension):
  """Rewrites each docstring as described in the module docstring, before griffe parses it."""

  def on_instance(self, *, node, obj, agent, **kwargs):
    del node, agent, kwargs
    if obj.docstring is not None:
      obj.docstring.value = rewrite(obj.docstring.value)
