"""Device groups across processes: two local processes joined by `jax.distributed` (gloo on CPU), 2
CPU devices each, pairs of devices that span both processes (`tests/collectives_driver.py`); each way
of summing groups gives every device its pair's sum, as NumPy computes it."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = [[0, 2], [1, 3]]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_group_sums_across_two_processes():
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  driver = os.path.join(HERE, "collectives_driver.py")
  procs = [
    subprocess.Popen(
      [sys.executable, driver, str(i), str(port)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  data = np.arange(12, dtype=np.float32).reshape(4, 3) ** 1.5
  want = {i: data[g].astype(np.float64).sum(0) for g in GROUPS for i in g}
  seen = set()
  for text in outputs:
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    for way, rows in result.items():
      for device, values in rows.items():
        np.testing.assert_allclose(values[0], want[int(device)], rtol=1e-6, err_msg=way)
        seen.add((way, int(device)))
  assert len(seen) == 4 * 4, seen
