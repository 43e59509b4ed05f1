"""experiments/studies (issue 6): every study's config runs a few steps, and its summary reports real numbers.

Also checks what the studies rely on: per-replica BN equals ghost BN (the small-batch emulation), the
activation probe sees normalized inputs under BN, precise-BN rows come at every evaluation, and the
steps-to-target count.
"""

import json
import os

import jax
import numpy as np
import pytest

import normjax
from experiments import run_study
from experiments import studies
from experiments.studies import common
from experiments.studies import learning_rate
from experiments_fixtures import SHARED_DATA


def _smoke_study(name, cache):
  study = studies.get_study(name, "smoke")
  for config in study.runs.values():
    config.cache_dir = cache
    if config.get("data_dir"):  # configs name ../shared/data relative to the repo root
      config.data_dir = os.path.join(SHARED_DATA, os.path.basename(config.data_dir))
    if config.dataset != "digits" and not os.path.isdir(SHARED_DATA):
      pytest.skip(f"{SHARED_DATA} is absent")
  return study


@pytest.fixture(scope="session")
def studies_workdir(tmp_path_factory):
  """One work directory per test process: runs shared by several studies are trained once."""
  return tmp_path_factory.mktemp("studies")


@pytest.mark.parametrize("name", studies.STUDIES)
def test_study_smoke(name, data_cache, studies_workdir):  # noqa: F811  pylint: disable=redefined-outer-name
  tmp_path = studies_workdir
  study = _smoke_study(name, data_cache)
  results = run_study.run_all(study, str(tmp_path))
  assert {r: len(rs) for r, rs in results.items()} == {r: len(study.seeds) for r in study.runs}
  table = run_study.summarize(study, results, str(tmp_path))
  out = tmp_path / name
  assert (out / "plot.png").stat().st_size > 10_000
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary["final"]) == set(study.runs) and summary["seeds"] == [0]
  assert "|" in table and "nan" not in table.lower(), table
  for rs in results.values():
    for r in rs:
      assert r.final.get("diverged") or 0.0 <= r.final["eval_accuracy"] <= 1.0


def test_activation_probe_and_precise_rows(data_cache, studies_workdir):  # noqa: F811  pylint: disable=redefined-outer-name
  study = _smoke_study("covariate_shift", data_cache)
  results = run_study.run_all(study, str(studies_workdir))
  bn, none = results["cifar_cnn_bn"][0], results["cifar_cnn_none"][0]
  steps, stds = common.curves([bn], "activations", "NormAct_1/mean_of_channel_stds")
  _, means = common.curves([bn], "activations", "NormAct_1/mean_of_abs_channel_means")
  assert list(steps) == [0, 2]
  # Training-mode BN with scale 1, bias 0 at step 0: every channel has mean 0 and std sqrt(v / (v + eps)).
  np.testing.assert_allclose(stds[0, 0], 1.0, atol=2e-3)
  assert means[0, 0] < 1e-4
  _, raw_stds = common.curves([none], "activations", "NormAct_1/mean_of_channel_stds")
  assert abs(raw_stds[0, 0] - 1.0) > 0.05  # without BN the ReLU input is not normalized
  eval_steps, _ = common.curves([bn], "eval", "eval_accuracy")
  precise_steps, _ = common.curves([bn], "recalibrated", "eval_accuracy")
  assert list(eval_steps) == list(precise_steps) == [1, 2]


def test_steps_to_target(tmp_path):
  (tmp_path / "eval.csv").write_text(
    "step,eval_loss,eval_accuracy\n10,1.0,0.5\n20,0.5,0.96\n30,0.4,0.97\n"
  )
  r = common.RunResult("run", 0, str(tmp_path), {})
  assert learning_rate.steps_to_target(r, 0.95) == 20
  assert learning_rate.steps_to_target(r, 0.99) == np.inf


def test_per_replica_batch_norm_equals_ghost_batch_norm():
  """Study 5's emulation: B/b devices each normalizing b examples == ghost batches of b inside B."""
  n = jax.device_count()
  x = jax.random.normal(jax.random.key(0), (2 * n, 5, 3)) * 3.0 + 1.0
  per_device = normjax.batch_norm(momentum=0.9)
  ghost = normjax.batch_norm(momentum=0.9, ghost_batch_size=2)
  params, state = per_device.init(x)
  y_ghost, _ = ghost.apply(params, state, x, training=True)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
  spec = jax.sharding.PartitionSpec("batch")
  f = jax.shard_map(
    lambda x: per_device.apply(params, state, x, training=True)[0],
    mesh=mesh,
    in_specs=spec,
    out_specs=spec,
  )
  np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), np.asarray(y_ghost), rtol=1e-5, atol=1e-5)
  assert (
    np.abs(
      np.asarray(y_ghost) - np.asarray(per_device.apply(params, state, x, training=True)[0])
    ).max()
    > 0.1
  )


def test_unknown_study_and_scale():
  with pytest.raises(ValueError, match="study='nope'"):
    studies.get_study("nope")
  with pytest.raises(ValueError, match="scale='gpu'"):
    studies.get_study("mnist_cnn", "gpu")
