"""The TPU compile suite's train step (`benchmarks._tpu_models`) is the experiments' step.

`benchmarks.tpu_compile` compiles `benchmarks._tpu_models.train_step`, a copy of
`experiments.train._train_step` (importing `experiments.train` needs the experiments' data stack,
which a compile-only environment does not have). Here, on CPU, both steps run on the same state and
batch under the same 2-device shard_map and must give the same new state and metrics.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from benchmarks import _tpu_models as tm
from experiments import models
from experiments import train


def _mesh():
  return Mesh(np.array(jax.devices()[:2]), (models.BATCH_AXIS,))


def _state(model, tx, image_shape):
  variables = model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), training=False)
  params = variables["params"]
  return tm.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
  )


@pytest.mark.parametrize("norm", ["batch_norm", "sync_batch_norm", "group_norm"])
def test_suite_step_equals_the_experiments_step(norm):
  mesh = _mesh()
  model = tm.build_model("mnist_cnn", norm, per_device_batch=8)
  tx, config = tm.optimizer(), tm.norm_config(norm, ghost_batch_size=2)
  rng = np.random.default_rng(0)
  sharding = NamedSharding(mesh, P(models.BATCH_AXIS))
  batch = {
    "image": jax.device_put(rng.normal(size=(16, 28, 28, 1)).astype(np.float32), sharding),
    "label": jax.device_put(rng.integers(0, 10, size=16).astype(np.int32), sharding),
  }
  theirs_state = train.TrainState(**vars(_state(model, tx, (28, 28, 1))))
  ours_state = _state(model, tx, (28, 28, 1))
  ours = tm.make_train_step(model, tx, config, mesh)(ours_state, batch)
  theirs = train.make_steps(model, tx, config, mesh)[0](theirs_state, batch)
  ours_leaves, theirs_leaves = jax.tree.leaves(ours), jax.tree.leaves(theirs)
  assert len(ours_leaves) == len(theirs_leaves)
  for a, b in zip(ours_leaves, theirs_leaves):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
