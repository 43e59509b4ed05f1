"""Runs one training job in its own process for the experiments tests (kill-and-resume, multi-host).

Usage: python tests/experiments_driver.py CONFIG_JSON WORKDIR OUT_NPZ [--sleep S] [--kill_in_save STEP]
       [--process_id I --num_processes N --port P]

Set XLA_FLAGS (device count) in the environment before starting it. The final params and batch_stats are
saved to OUT_NPZ by process 0. `--sleep` slows each step down so that a test can kill the run mid-way.
`--kill_in_save STEP` kills the process (SIGKILL) while it saves checkpoint STEP: its files are written,
its atomic rename is not done.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _kill_in_save(step: int) -> None:
  """Makes Orbax SIGKILL this process when it is about to rename checkpoint `step` into place."""
  import signal  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def killing_finalize(self, *a, **k):
    if self.get_final().name == str(step):
      print(f"KILLED in the save of step {step}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self, *a, **k)

  atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("config_json")
  parser.add_argument("workdir")
  parser.add_argument("out_npz")
  parser.add_argument("--sleep", type=float, default=0.0)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--port", type=int, default=None)
  parser.add_argument("--kill_in_save", type=int, default=None)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top

  if args.num_processes:
    jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{args.port}",
      num_processes=args.num_processes,
      process_id=args.process_id,
    )
  import flax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import input_pipeline  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top
  from experiments.configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.update_from_flattened_dict(json.loads(args.config_json))
  if args.sleep:
    prefetch = input_pipeline.prefetch

    def slow(ds, buffer_size):
      for batch in prefetch(ds, buffer_size):
        time.sleep(args.sleep)
        yield batch

    input_pipeline.prefetch = slow  # train.py looks it up at call time
  if args.kill_in_save is not None:
    _kill_in_save(args.kill_in_save)
  state, result = train.train_and_evaluate_with_state(
    ml_collections.ConfigDict(config), args.workdir
  )
  host = train.to_host({"params": state.params, "batch_stats": state.batch_stats})
  if jax.process_index() == 0:
    flat = flax.traverse_util.flatten_dict(host, sep="/")
    np.savez(args.out_npz, **{k: np.asarray(v) for k, v in flat.items()})
    print("RESULT", json.dumps(result))


if __name__ == "__main__":
  main()
