#!/usr/bin/env bash
# The distribution: `python -m build` makes an sdist and a wheel; the wheel holds the `normjax` package
# only (+ py.typed and the CPU kernel's C++ source); installed into a fresh environment it imports and runs a BatchNorm step.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
.venv/bin/pip install -q build
.venv/bin/python -m build -q --outdir "$out" . > /dev/null
ls "$out"/normjax-*.tar.gz > /dev/null
wheel=$(ls "$out"/normjax-*.whl)
python3 - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
assert top == ["normjax"], f"the wheel holds {top}; expected only the normjax package"
assert "normjax/py.typed" in names, "py.typed is missing from the wheel"
assert "normjax/_src/cpu_batch_norm.cc" in names, "the CPU kernel's source is missing from the wheel"
print(f"wheel: {len(names)} files, top-level {top}")
PY
python3 -m venv "$out/venv"
"$out/venv/bin/pip" install -q "$wheel"
(cd "$out" && "$out/venv/bin/python" - <<'PY'
import importlib.util, sys
import jax, jax.numpy as jnp, normjax
assert importlib.util.find_spec("experiments") is None, "experiments must not be installed"
bn = normjax.batch_norm(momentum=0.9)
x = jax.random.normal(jax.random.key(0), (16, 4)) * 3.0 + 5.0
params, state = bn.init(x)
y, state = jax.jit(lambda p, s, v: bn.apply(p, s, v, training=True))(params, state, x)
assert bool(jnp.allclose(y.mean(0), 0.0, atol=1e-5)) and int(state.count) == 1
from normjax._src import cpu_kernel  # built from the installed source on first use
step = jax.jit(lambda p, s, v: bn.apply(p, s, v, training=True)).lower(params, state, x).as_text()
import shutil  # with a C++ compiler on this host the kernel must build; without one, the XLA program
assert (cpu_kernel.TARGET in step) == bool(shutil.which("g++") or shutil.which("c++")), step[:300]
assert "flax" not in sys.modules
y = normjax.linen.BatchNorm(use_running_average=True).apply(
    normjax.linen.BatchNorm(use_running_average=True).init(jax.random.key(0), x), x)
print("smoke test of the installed wheel: ok, normjax", normjax.__version__)
PY
)
rm -rf "$out"
