"""One process of `tests/test_collectives_multiprocess.py`: joins a 2-process `jax.distributed` run on
127.0.0.1 (2 CPU devices each) and prints, as JSON, each local device's group sums of a known array
under `shard_map`, by both of `normjax._src.collectives`' ways of summing groups.

Usage: python tests/collectives_driver.py PROCESS_ID PORT
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUPS = [[0, 2], [1, 3]]  # each pair spans both processes
ROWS = 4


def main():
  process_id, port = int(sys.argv[1]), int(sys.argv[2])
  import jax  # pylint: disable=g-import-not-at-top

  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
  )
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from normjax._src import collectives  # pylint: disable=g-import-not-at-top

  mesh = Mesh(np.array(jax.devices()), ("d",))
  data = np.arange(ROWS * 3, dtype=np.float32).reshape(ROWS, 3) ** 1.5
  x = jax.make_array_from_callback(data.shape, NamedSharding(mesh, P("d")), lambda i: data[i])
  ways = {
    "butterfly": collectives._sum_by_butterfly,  # pylint: disable=protected-access
    "gather": collectives._sum_by_permutes,  # pylint: disable=protected-access
    "one all-reduce": collectives._sum_by_one_all_reduce,  # pylint: disable=protected-access
    "cross_device_sum": collectives.cross_device_sum,
  }
  out = {}
  for name, way in ways.items():
    summed = jax.jit(
      jax.shard_map(
        lambda v, way=way: way(v, "d", GROUPS), mesh=mesh, in_specs=P("d"), out_specs=P("d")
      )
    )(x)
    out[name] = {
      str(s.index[0].start): np.asarray(s.data).tolist() for s in summed.addressable_shards
    }
  print("RESULT " + json.dumps(out), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
