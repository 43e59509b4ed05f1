"""Ahead-of-time TPU compilation on a host without a TPU: slices, meshes, abstract inputs, HLO facts.

libtpu describes any TPU topology on a CPU host (`jax.experimental.topologies.get_topology_desc`, with
`TPU_SKIP_MDS_QUERY=1` so it does not ask a GCE metadata server). Its devices cannot run anything, but a
`jax.jit(...).lower(*abstract_args).compile()` for them runs the real TPU compiler: the optimized HLO
(`as_text()`), the compiler's cost model (`cost_analysis()`: bytes accessed, flops) and the per-device
buffer sizes (`memory_analysis()`) are those a TPU would get. Nothing here is a timing.

A *slice* is a name for a set of devices: a topology name (`"v5e:2x2"`), or `"v5e:1"` for one chip
(the first device of a v5e 2x2 topology). v4 exposes its two TensorCores as two devices per chip (the
2x2x1 topology has 8 devices); v5p and v6e/v5e one device per chip.
"""

import os

# Read by libtpu, and only when set before jax is imported (import this module first):
# no GCE metadata query for the host's own TPU; and since compiling never opens a TPU, several
# processes (pytest-xdist workers, a suite run beside the tests) may load libtpu at once, which its
# lockfile otherwise refuses.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from typing import Dict, List, Optional, Tuple  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

# slice name -> (topology name, number of devices used: None = all)
SLICES = {
  "v5e:1": ("v5e:2x2", 1),
  "v5e:2x2": ("v5e:2x2", None),
  "v4:2x2x1": ("v4:2x2x1", None),
  "v5p:2x2x1": ("v5p:2x2x1", None),
  "v6e:2x2": ("v6e:2x2", None),
  "v5e:4x4": ("v5e:4x4", None),
  "v5e:8x8": ("v5e:8x8", None),
  "v5e:16x16": ("v5e:16x16", None),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4}
_BYTES.update({"u32": 4, "f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1})


def libtpu_available() -> bool:
  """True when the `libtpu` package (the TPU compiler) is importable."""
  return importlib.util.find_spec("libtpu") is not None


@functools.lru_cache(maxsize=None)
def _topology(name: str):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  return topologies.get_topology_desc(platform="tpu", topology_name=name)


def slice_devices(name: str) -> list:
  """The TPU devices of slice `name` (see `SLICES`; any topology name works too)."""
  topology, count = SLICES.get(name, (name, None))
  devices = list(_topology(topology).devices)
  return devices if count is None else devices[:count]


def describe(name: str) -> dict:
  """Slice, topology, device kind, devices, chips and devices per chip."""
  devices = slice_devices(name)
  chips = len({tuple(d.coords) for d in devices})
  return {
    "slice": name,
    "topology": SLICES.get(name, (name, None))[0],
    "device_kind": devices[0].device_kind,
    "devices": len(devices),
    "chips": chips,
    "devices_per_chip": len(devices) // chips,
  }


def mesh(name: str, axis: str = "batch") -> Mesh:
  """A 1-D mesh named `axis` over every device of slice `name`."""
  return Mesh(np.array(slice_devices(name)), (axis,))


def grid_mesh(name: str, axes: Tuple[str, str], inner: int) -> Mesh:
  """A 2-D mesh (`devices // inner`, `inner`) over slice `name`: consecutive blocks of `inner` devices."""
  devices = np.array(slice_devices(name))
  return Mesh(devices.reshape(len(devices) // inner, inner), axes)


def abstract(tree, mesh_: Mesh, spec=None):
  """`tree`'s arrays as `jax.ShapeDtypeStruct`s placed on `mesh_` with `spec` (replicated by default)."""
  sharding = NamedSharding(mesh_, P() if spec is None else spec)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)


def global_batch(per_device_shape, dtype, mesh_: Mesh, axis="batch"):
  """A `ShapeDtypeStruct` of `per_device_shape` on each device of `axis`, split along axis 0."""
  n = mesh_.shape[axis] if isinstance(axis, str) else math.prod(mesh_.shape[a] for a in axis)
  shape = (per_device_shape[0] * n,) + tuple(per_device_shape[1:])
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh_, P(axis)))


# ------------------------------------------------------------------------------------ compiled facts


@dataclasses.dataclass
class Facts:
  """What the TPU compiler says about one program (per device)."""

  bytes_accessed: float
  flops: float
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  collectives: List[dict]
  hlo: str = dataclasses.field(repr=False, default="")

  @property
  def memory_bytes(self) -> int:
    """argument + output + temp bytes per device (what memory_analysis says one device holds)."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes

  def summary(self) -> dict:
    """The JSON-able numbers (no HLO): bytes, flops, memory, collective counts and payloads."""
    return {
      "bytes_accessed": self.bytes_accessed,
      "flops": self.flops,
      "argument_bytes": self.argument_bytes,
      "output_bytes": self.output_bytes,
      "temp_bytes": self.temp_bytes,
      "alias_bytes": self.alias_bytes,
      "memory_bytes": self.memory_bytes,
      **collective_counts(self.collectives),
    }


def compile_facts(fn, *args, donate_argnums=()) -> Facts:
  """Compiles `jax.jit(fn)` for the devices `args` are placed on and reads the compiler's facts.

  `fn` may already be jitted (a `jax.jit` of a `jax.jit` is the same program).
  """
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  return Facts(
    bytes_accessed=float(cost.get("bytes accessed", float("nan"))),
    flops=float(cost.get("flops", float("nan"))),
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    alias_bytes=int(memory.alias_size_in_bytes),
    collectives=collectives(hlo),
    hlo=hlo,
  )


# ------------------------------------------------------------------------------------- HLO parsing

_OPCODE = re.compile(r"^(?P<op>[a-z][a-z0-9-]*)\(")
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{[0-9]+,[0-9]+\},?)*)\}")


def _split_type(rest: str) -> Tuple[str, str]:
  """(result type, remainder) of the text after `name = ` in an HLO instruction."""
  if not rest.startswith("("):
    head, _, tail = rest.partition(" ")
    return head, tail
  depth = 0
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rest[: i + 1], rest[i + 1 :].lstrip()
  return rest, ""


def shape_bytes(type_text: str) -> int:
  """Bytes of every array in an HLO type (`f32[1,128]{...}` or a tuple of them)."""
  total = 0
  for dtype, dims in _SHAPE.findall(type_text):
    if dtype in _BYTES:
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def replica_groups(line: str) -> Optional[List[List[int]]]:
  """The replica groups of an HLO collective, from the list or the iota (`[G,S]<=[...]T(...)`) form."""
  iota = _GROUPS_IOTA.search(line)
  if iota:
    dims = [int(d) for d in iota.group(1).split(",")]
    reshape = [int(d) for d in iota.group(2).split(",")]
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    if iota.group(3):
      ids = ids.transpose([int(d) for d in iota.group(3).split(",")])
    return ids.reshape(dims[0], -1).tolist()
  listed = _GROUPS_LIST.search(line)
  if listed:
    return [
      [int(i) for i in g.split(",") if i] for g in re.findall(r"\{([0-9,]*)\}", listed.group(1))
    ]
  return None


def _collective(line: str) -> Optional[dict]:
  name, sep, rest = line.strip().partition(" = ")
  if not sep:
    return None
  type_text, remainder = _split_type(rest)
  match = _OPCODE.match(remainder)
  if not match:
    return None
  op = match.group("op")
  kind = op[: -len("-start")] if op.endswith("-start") else op
  if kind not in COLLECTIVES:
    return None
  if op.endswith("-start") and kind != "all-reduce":  # (operands, results, ...): keep the results
    type_text = _split_type(type_text[1:])[1] if type_text.startswith("(") else type_text
    if kind == "collective-permute":  # (operand, result, u32[] context, u32[] context)
      type_text = type_text.partition(", u32[]")[0]
  op_name = _OP_NAME.search(line)
  pairs = _PAIRS.search(line)
  return {
    "kind": kind,
    "name": name.removeprefix("ROOT ").lstrip("%"),
    "type": type_text,
    "bytes": shape_bytes(type_text),
    "operands": len(_SHAPE.findall(type_text)),
    "replica_groups": replica_groups(line),
    "op_name": op_name.group(1) if op_name else "",
    "pairs": [
      [int(i) for i in p.split(",")] for p in re.findall(r"\{([0-9]+,[0-9]+)\}", pairs.group(1))
    ]
    if pairs
    else None,
  }


def collectives(hlo_text: str) -> List[dict]:
  """Every collective instruction of an optimized HLO module (async pairs counted once, at `-start`).

  Each is `{kind, name, type, bytes, operands, replica_groups, op_name, pairs}`; `bytes` is the
  payload (the result arrays: for an all-reduce the summed operands, for a collective-permute the
  array each device receives); `pairs` the [source, target] devices of a collective-permute.
  """
  found = (_collective(line) for line in hlo_text.splitlines())
  return [c for c in found if c is not None]


def collective_counts(found: List[dict]) -> Dict[str, int]:
  """`{<kind>: count, <kind>_bytes: payload}` for each collective kind, plus the totals."""
  out = {}
  for kind in COLLECTIVES:
    of_kind = [c for c in found if c["kind"] == kind]
    key = kind.replace("-", "_")
    out[key] = len(of_kind)
    out[f"{key}_bytes"] = sum(c["bytes"] for c in of_kind)
  out["collectives"] = len(found)
  out["collective_bytes"] = sum(c["bytes"] for c in found)
  return out


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[^ ]+) = ")
_OPERAND = re.compile(r"%([A-Za-z0-9_.\-]+)")


def entry_traffic(hlo_text: str, min_bytes: int = 0) -> List[dict]:
  """The top-level instructions of the ENTRY computation with the bytes they read and write.

  `read` sums the operands' array bytes (each operand once), `written` the result's; a map of what
  the compiler's `bytes accessed` counts, instruction by instruction (bitcasts, tuples and
  get-tuple-elements move nothing and are left out). Rows where both are below `min_bytes` are dropped.
  """
  lines = hlo_text.splitlines()
  start = next(i for i, ln in enumerate(lines) if ln.startswith("ENTRY"))
  types, rows = {}, []
  for line in lines[start + 1 :]:
    if line.startswith("}"):
      break
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    type_text, remainder = _split_type(line[match.end() :])
    types[match.group("name")] = shape_bytes(type_text)
    opcode = _OPCODE.match(remainder)
    op = opcode.group("op") if opcode else "?"
    if op in ("parameter", "constant", "bitcast", "tuple", "get-tuple-element", "copy-done"):
      continue
    args = remainder[len(op) + 1 : remainder.find(")")] if opcode else ""
    read = sum(types.get(n, 0) for n in dict.fromkeys(_OPERAND.findall(args)))
    written = shape_bytes(type_text)
    if op == "copy-start":  # (destination, source, context): one copy of the source
      written = shape_bytes(_split_type(type_text[1:])[0]) if type_text.startswith("(") else written
    if max(read, written) >= min_bytes:
      op_name = _OP_NAME.search(line)
      rows.append(
        {
          "name": match.group("name"),
          "op": op,
          "read": read,
          "written": written,
          "op_name": op_name.group(1) if op_name else "",
        }
      )
  return rows
