"""experiments.train / main: a smoke test per config, NaN stop, kill-and-resume, multi-host synchronized BN."""

import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from experiments import compare
from experiments import train
from experiments.configs import cifar10_cnn
from experiments.configs import cifar10_resnet18
from experiments.configs import cifar10_resnet20
from experiments.configs import default
from experiments.configs import digits_bn_vs_none
from experiments.configs import fashion_mnist_cnn
from experiments.configs import mnist_cnn
from experiments_fixtures import REPO
from experiments_fixtures import SHARED_DATA
from experiments_fixtures import driver_command
from experiments_fixtures import run_checked
from experiments_fixtures import subprocess_env

CONFIGS = {
  "digits_bn_vs_none": (digits_bn_vs_none, "small"),
  "mnist_cnn": (mnist_cnn, "small"),
  "fashion_mnist_cnn": (fashion_mnist_cnn, "small"),
  "cifar10_cnn": (cifar10_cnn, "small"),
  "cifar10_cnn_max_norm": (cifar10_cnn, "small,max_norm"),
  "cifar10_resnet20": (cifar10_resnet20, "small"),
  "cifar10_resnet18": (cifar10_resnet18, "small"),
}


def _small(module, variant, cache, **overrides):
  config = module.get_config(variant)
  config.cache_dir = cache
  config.progress_bar = False
  if config.get(
    "data_dir"
  ):  # configs name ../shared/data relative to the repo root; tests may run elsewhere
    config.data_dir = os.path.join(SHARED_DATA, os.path.basename(config.data_dir))
  config.update(overrides)
  return config


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_smoke(name, data_cache, tmp_path):
  module, variant = CONFIGS[name]
  config = _small(module, variant, data_cache)
  if config.dataset != "digits" and not os.path.isdir(SHARED_DATA):
    pytest.skip(f"{SHARED_DATA} is absent")
  # A few batches: 3 steps, 64 test examples.
  config.num_steps = 3
  config.eval_examples = 64
  config.eval_batch_size = 64
  config.batch_size = max(16, config.batch_size // 4)
  if config.model == "resnet18":  # the largest model: one step, one example per device
    config.num_steps, config.batch_size, config.eval_examples, config.eval_batch_size = 1, 8, 8, 8
  if config.get("compare"):
    results = compare.run_comparison(config, str(tmp_path))
    assert set(results) == set(config.compare)
    assert os.path.exists(tmp_path / "comparison.png") and os.path.exists(tmp_path / "table.md")
    result = results["batch_norm"]
    workdir = tmp_path / "batch_norm"
  else:
    result = train.train_and_evaluate(config, str(tmp_path))
    workdir = tmp_path
  assert np.isfinite(result["train_loss"]) and 0.0 <= result["eval_accuracy"] <= 1.0
  for f in ("train.csv", "eval.csv", "config.json", "run.json", "curves.png", "final_metrics.json"):
    assert (workdir / f).exists(), f
  assert json.loads((workdir / "run.json").read_text())["seed"] == config.seed
  assert any((workdir / "tensorboard").iterdir())
  assert (workdir / "checkpoints" / str(result["steps"])).exists()


def test_digits_learns_and_recalibrates(data_cache, tmp_path):
  config = _small(
    default, "", data_cache, num_steps=60, recalibrate_steps=4, batch_size=64, log_every=10
  )
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["eval_accuracy"] > 0.8, result
  assert result["eval_accuracy_recalibrated"] > 0.8, result
  assert (tmp_path / "recalibrated.csv").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_cache, tmp_path, monkeypatch):
  config = _small(
    default,
    "",
    data_cache,
    num_steps=12,
    checkpoint_every=4,
    log_every=2,
    async_checkpointing=False,
  )
  original = train._global_batch
  calls = []

  def poisoned(batch, sharding):  # the 7th training batch holds a NaN
    calls.append(1)
    if len(calls) == 7:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return original(batch, sharding)

  monkeypatch.setattr(train, "_global_batch", poisoned)
  with pytest.raises(
    FloatingPointError,
    match=r"training diverged at step 7: the training loss is nan; stopped. "
    r"Every saved checkpoint is finite; the last is step 4 in ",
  ):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _load(path):
  return dict(np.load(path))


def _assert_trees_close(a, b, **tol):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)


def test_killed_run_resumes_to_the_same_parameters(data_cache, tmp_path):
  train.input_pipeline.get_datasets(_small(default, "", data_cache))  # prepare the data once, here
  overrides = {
    "dataset": "digits",
    "cache_dir": data_cache,
    "num_steps": 40,
    "checkpoint_every": 5,
    "batch_size": 32,
    "log_every": 5,
    "async_checkpointing": False,
    "progress_bar": False,
  }
  cfg = json.dumps(overrides)
  env = subprocess_env(2)
  reference = run_checked(
    driver_command(cfg, str(tmp_path / "ref"), str(tmp_path / "ref.npz")), env
  )
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(
    driver_command(cfg, str(workdir), str(tmp_path / "unused.npz"), "--sleep", "0.25"),
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.time() + 240
    while time.time() < deadline:
      names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").exists() else []
      steps = [int(d) for d in names if d.isdigit() and int(d) >= 10]  # finalized checkpoints only
      if steps:
        break
      assert proc.poll() is None, "the run ended before it could be killed"
      time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  finally:
    if proc.poll() is None:
      proc.kill()
  killed_at = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert 10 <= killed_at < 40
  resumed = run_checked(driver_command(cfg, str(workdir), str(tmp_path / "resumed.npz")), env)
  _assert_trees_close(_load(tmp_path / "resumed.npz"), _load(tmp_path / "ref.npz"), rtol=0, atol=0)
  ref_result = json.loads(reference.stdout.split("RESULT", 1)[1])
  res_result = json.loads(resumed.stdout.split("RESULT", 1)[1])
  assert res_result["eval_accuracy"] == ref_result["eval_accuracy"]
  # The metrics of the resumed run equal those of the uninterrupted one (rows after the checkpoint dropped).
  assert (workdir / "train.csv").read_text() == (tmp_path / "ref" / "train.csv").read_text()


def test_two_processes_match_one_process_with_four_devices(data_cache, tmp_path):
  train.input_pipeline.get_datasets(_small(default, "", data_cache))
  cfg = json.dumps(
    {
      "dataset": "digits",
      "cache_dir": data_cache,
      "norm": "sync_batch_norm",
      "num_steps": 4,
      "batch_size": 32,
      "eval_batch_size": 64,
      "checkpoint_every": -1,
      "log_every": 1,
      "progress_bar": False,
      "learning_rate": 0.1,
    }
  )
  port = _free_port()
  env = subprocess_env(2)
  procs = [
    subprocess.Popen(
      driver_command(
        cfg,
        str(tmp_path / "multi"),
        str(tmp_path / "multi.npz"),
        "--process_id",
        str(i),
        "--num_processes",
        "2",
        "--port",
        str(port),
      ),
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-5000:]
  single = run_checked(
    driver_command(cfg, str(tmp_path / "single"), str(tmp_path / "single.npz")), subprocess_env(4)
  )
  multi, one = _load(tmp_path / "multi.npz"), _load(tmp_path / "single.npz")
  assert any(k.startswith("batch_stats/") for k in multi)
  _assert_trees_close(multi, one, rtol=1e-5, atol=1e-6)
  assert json.loads(outputs[0].split("RESULT", 1)[1])["eval_accuracy"] == pytest.approx(
    json.loads(single.stdout.split("RESULT", 1)[1])["eval_accuracy"]
  )
  # Statistics moved away from their initial values, identically in both set-ups.
  assert not np.allclose(multi["batch_stats/NormAct_0/BatchNorm_0/mean"], 0.0)
