"""Figures from XLA's optimized HLO text: kernels, bytes moved and fusion breaks.

`analyze(text, full_numel)` reads the text that `jax.jit(f).lower(...).compile().as_text()` returns
and counts, over the top-level instructions of the entry computation (descending into `call`s, where
XLA puts command buffers):

  * `kernels`: instructions that launch work: fusions, custom calls (cuDNN, cuBLAS), copies,
    reductions or collectives left unfused. Parameters, constants, tuples, get-tuple-element and
    bitcasts are free.
  * `bytes`: the sum over kernels of their operand bytes and result bytes: a map of the memory traffic
    the program asks for (a kernel may re-read an operand from cache, or read only part of it), not a
    measurement.
  * with `full_numel` (the element count of the activation), the passes over full-size data:
    `full_reads` (kernel operands of at least `full_numel` elements), `full_writes` (full-size kernel
    results) and `intermediates`: full-size arrays that one kernel writes and another reads again, the
    fusion breaks that cost a write and a read of the activation.

Example:
  >>> text = '''
  ... ENTRY %main (x: f32[8,4]) -> f32[4] {
  ...   %x = f32[8,4]{1,0} parameter(0)
  ...   %fusion = f32[8,4]{1,0} fusion(%x), kind=kLoop, calls=%fused
  ...   ROOT %r = f32[4]{0} fusion(%fusion), kind=kInput, calls=%fused_reduce
  ... }'''
  >>> stats = analyze(text, full_numel=32)
  >>> stats["kernels"], stats["bytes"], stats["full_reads"], len(stats["intermediates"])
  (2, 400, 2, 1)
"""

import math
import re
from typing import NamedTuple, Optional

DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "token": 0,
}
FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")


class Instr(NamedTuple):
  name: str
  shape: str  # e.g. "bf16[256,56,56,64]{3,2,1,0}" or a tuple "(f32[64]{0}, s32[])"
  opcode: str
  operands: tuple  # operand names, without "%"
  attrs: str  # the text after the operand list
  root: bool


def arrays(shape: str):
  """(dtype, dims) of every array in a shape string (one, or each element of a tuple)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in DTYPE_BYTES or dtype.startswith("f8"):
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return out


def shape_bytes(shape: str) -> float:
  """Bytes of all arrays in a shape string."""
  return sum(DTYPE_BYTES.get(t, 1) * math.prod(d) for t, d in arrays(shape))


def _matching(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f"unbalanced parentheses in {text[:200]!r}")


def parse_instruction(line: str) -> Optional[Instr]:
  """One HLO instruction line, or None for anything else."""
  match = _INSTR.match(_COMMENT.sub("", line))
  if not match:
    return None
  root, name, rest = bool(match.group(1)), match.group(2), match.group(3)
  if rest.startswith("("):
    end = _matching(rest, 0)
    shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  opcode_match = re.match(r"([\w\-]+)\(", rest)
  if not opcode_match:
    return None
  start = opcode_match.end() - 1
  end = _matching(rest, start)
  operands = tuple(re.findall(r"%([\w.\-]+)", rest[start:end]))
  return Instr(name, shape, opcode_match.group(1), operands, rest[end + 1 :], root)


def computations(text: str) -> dict:
  """{name: [Instr, ...]} of every computation in the module; the entry's name is under "ENTRY"."""
  comps, current = {}, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("(")[0]:
      current = comps.setdefault(header.group(2), [])
      if header.group(1):
        comps["ENTRY"] = current
      continue
    if line.strip() == "}":
      current = None
      continue
    if current is not None:
      instr = parse_instruction(line)
      if instr is not None:
        current.append(instr)
  return comps


def _called(instr: Instr) -> Optional[str]:
  match = re.search(r"to_apply=%([\w.\-]+)", instr.attrs)
  return match.group(1) if match else None


def _is_kernel(instr: Instr) -> bool:
  op = instr.opcode
  return not (op in FREE or op.endswith("-done") or op.endswith("-update"))


def _source(table, name):
  """(producer, tuple index) of a value, looking through get-tuple-element and bitcast."""
  index = None
  while name in table and table[name].opcode in ("get-tuple-element", "bitcast"):
    instr = table[name]
    if instr.opcode == "get-tuple-element":
      index = int(re.search(r"index=(\d+)", instr.attrs).group(1))
    name = instr.operands[0]
  return name, index


def _numel(shape: str) -> int:
  return max((math.prod(d) for _, d in arrays(shape)), default=0)


def _kernels(comps, comp_name):
  """(kernel, symbol table) pairs of a computation, with `call`s replaced by their bodies."""
  body = comps.get(comp_name, [])
  table = {i.name: i for i in body}
  out = []
  for instr in body:
    if instr.opcode == "call" and _called(instr) in comps:
      out.extend(_kernels(comps, _called(instr)))
    elif _is_kernel(instr):
      out.append((instr, table))
  return out


def _kind(instr: Instr) -> str:
  if instr.opcode == "fusion":
    match = re.search(r"kind=(k\w+)", instr.attrs)
    return "fusion:" + (match.group(1) if match else "?")
  if instr.opcode == "custom-call":
    match = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
    return "custom-call:" + (match.group(1) if match else "?")
  return instr.opcode


def analyze(text: str, full_numel: Optional[int] = None) -> dict:
  """Kernels, bytes moved and (with `full_numel`) full-size passes and fusion breaks; see module doc."""
  comps = computations(text)
  kernels = _kernels(comps, "ENTRY")
  kernel_names = {k.name for k, _ in kernels}
  stats = {"kernels": len(kernels), "bytes": 0, "by_kind": {}}
  full = {"full_reads": 0, "full_writes": 0}
  intermediates = {}
  for instr, table in kernels:
    kind = _kind(instr)
    stats["by_kind"][kind] = stats["by_kind"].get(kind, 0) + 1
    operand_shapes = [table[o].shape for o in instr.operands if o in table]
    stats["bytes"] += shape_bytes(instr.shape) + sum(shape_bytes(s) for s in operand_shapes)
    if full_numel is None:
      continue
    full["full_writes"] += sum(math.prod(d) >= full_numel for _, d in arrays(instr.shape))
    for operand in instr.operands:
      if operand not in table or _numel(table[operand].shape) < full_numel:
        continue
      full["full_reads"] += 1
      producer, index = _source(table, operand)
      if producer in kernel_names:
        entry = intermediates.setdefault(
          (producer, index),
          {"producer": producer, "index": index, "shape": table[operand].shape, "consumers": []},
        )
        entry["consumers"].append(instr.name)
  stats["bytes"] = int(stats["bytes"])
  if full_numel is not None:
    stats.update(full)
    stats["intermediates"] = [
      {**v, "shape": _shape_text(v["shape"]), "bytes": int(shape_bytes(v["shape"]))}
      for v in intermediates.values()
    ]
  return stats


def sequences(text: str) -> dict:
  """{computation: kernel count} for the entry and every branch of its conditionals, recursively:
  the programs XLA:CPU's runtime executes as one thunk sequence each (in order when it has at most 8
  kernels, as a concurrent graph beyond; see `normjax/_src/lowering.py`)."""
  comps = computations(text)
  out = {}

  def visit(name):
    kernels = _kernels(comps, name)
    out[name] = len(kernels)
    for instr, _ in kernels:
      if instr.opcode == "conditional":
        match = re.search(r"branch_computations=\{([^}]*)\}", instr.attrs)
        names = match.group(1).split(",") if match else []
        names += re.findall(r"(?:true|false)_computation=%([\w.\-]+)", instr.attrs)
        for branch in names:
          branch = branch.strip().lstrip("%")
          if branch and branch not in out:
            visit(branch)

  visit("ENTRY")
  return out


def _shape_text(shape: str) -> str:
  """ "bf16[256,56,56,64]" without the layout."""
  dtype, dims = arrays(shape)[0]
  return f"{dtype}[{','.join(map(str, dims))}]"
