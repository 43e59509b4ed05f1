"""Fault injection for experiments/: runs that never lose work (issue 13, items 4-7).

Each test fails on the code before the fix: a NaN stop whose advice works when followed (run as the printed
command), a kill inside a checkpoint save, two runs preparing one cache at once (real subprocesses), a
truncated cache file, invalid configs refused before any work, a resumed work directory with another model,
a finished run rerun, and `run_study --shard` values.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import app

from experiments import config_checks
from experiments import input_pipeline
from experiments import run_study
from experiments import tfds_builders
from experiments import train
from experiments.configs import default
from experiments.configs import from_workdir
from experiments_fixtures import REPO
from experiments_fixtures import driver_command
from experiments_fixtures import run_checked
from experiments_fixtures import subprocess_env


def _config(cache, **overrides):
  c = default.get_config()
  c.cache_dir = cache
  c.progress_bar = False
  c.async_checkpointing = False
  c.batch_size = 32
  c.update(overrides)
  return c


# A no-norm CNN whose warmup to a peak learning rate of 1.0 blows up at step 24 (measured): the state's
# squared norm overflows while the loss is still finite (1.7e+30); the loss had already risen at step 20.
DIVERGING = dict(
  norm="none",
  learning_rate=1.0,
  schedule="warmup_cosine",
  warmup_steps=20,
  num_steps=40,
  checkpoint_every=5,
  log_every=5,
)


# ---------------------------------------------------------------------------------------------------------
# Item 4: only finite checkpoints; the NaN stop names the last one and prints a command that works.


def test_divergence_stops_before_saving_and_the_printed_command_continues(data_cache, tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError) as info:
    train.train_and_evaluate(_config(data_cache, **DIVERGING), workdir)
  message = str(info.value)
  assert message.startswith(
    "training diverged at step 24: the parameters, optimizer state or batch statistics "
    "hold NaN, Inf or values whose square overflows float32"
  ), message
  assert "the last is step 20" in message and "restores step 15" in message, message
  # Only finite states were saved (the old code checked the loss only and saved step 20 and a 1e31 step 25).
  assert train.checkpoint_steps(workdir) == [15, 20]
  command = re.search(r"\n  (python -m experiments\.main .*)\n", message).group(1)
  assert f"--config.restore_from={workdir}:15 --config.learning_rate=0.5" in command, command
  argv = shlex.split(command)
  proc = subprocess.run(
    [sys.executable, *argv[1:]],
    env=subprocess_env(2),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  fresh = argv[argv.index("--workdir") + 1]
  final = json.loads(open(os.path.join(fresh, "final_metrics.json")).read())
  assert (
    final["steps"] == 40 and np.isfinite(final["train_loss"]) and np.isfinite(final["eval_loss"])
  ), final
  assert train.checkpoint_steps(fresh)[-1] == 40
  rows = open(os.path.join(fresh, "train.csv")).read().splitlines()
  assert rows[1].startswith("20,") and rows[-1].startswith(
    "40,"
  )  # continued after step 15, not from 0


def test_divergence_without_a_checkpoint_says_so(data_cache, tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(
    FloatingPointError, match=r"step 24: .* No checkpoint was saved before it"
  ) as info:
    train.train_and_evaluate(_config(data_cache, **{**DIVERGING, "checkpoint_every": 30}), workdir)
  assert "step None" not in str(info.value) and "restore_from" not in str(info.value)
  assert (
    f"from_workdir.py:{workdir} --config.learning_rate=0.5 --workdir {workdir}_from_0_lr0.5"
    in str(info.value)
  )


def test_restore_from_checks_the_step_exists(data_cache, tmp_path):
  config = _config(data_cache, num_steps=2, restore_from=f"{tmp_path}/none:5")
  with pytest.raises(
    FileNotFoundError,
    match=r"restore_from='.*none:5': no checkpoint 5 in .*expected one of "
    r"the steps \[\]",
  ):
    train.train_and_evaluate(config, str(tmp_path / "new"))


# ---------------------------------------------------------------------------------------------------------
# Item 4: a kill inside a checkpoint save loses nothing (real subprocesses).


def test_kill_inside_a_checkpoint_save_resumes_to_the_same_parameters(data_cache, tmp_path):
  input_pipeline.get_datasets(_config(data_cache))  # prepare the data here, once
  cfg = json.dumps(
    {
      "cache_dir": data_cache,
      "num_steps": 12,
      "checkpoint_every": 4,
      "batch_size": 32,
      "log_every": 4,
      "progress_bar": False,
      "async_checkpointing": True,
    }
  )
  env = subprocess_env(2)
  run_checked(driver_command(cfg, str(tmp_path / "ref"), str(tmp_path / "ref.npz")), env)
  workdir = tmp_path / "killed"
  killed = subprocess.run(
    driver_command(cfg, str(workdir), str(tmp_path / "x.npz"), "--kill_in_save", "8"),
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert killed.returncode == -9 and "KILLED in the save of step 8" in killed.stdout, killed.stderr[
    -2000:
  ]
  leftovers = sorted(os.listdir(workdir / "checkpoints"))
  assert leftovers == ["4", "8.orbax-checkpoint-tmp"], (
    leftovers
  )  # step 8 fully written, not renamed
  run_checked(driver_command(cfg, str(workdir), str(tmp_path / "resumed.npz")), env)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "8"]
  ref, resumed = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "resumed.npz")
  assert sorted(ref) == sorted(resumed)
  for k in ref:
    np.testing.assert_array_equal(resumed[k], ref[k], err_msg=k)
  assert (workdir / "train.csv").read_text() == (tmp_path / "ref" / "train.csv").read_text()


# ---------------------------------------------------------------------------------------------------------
# Item 5: runs share a data cache safely; a damaged cache file is named with the fix.

_PREPARE = """
import os, sys, time
from experiments import tfds_builders
while not os.path.exists(sys.argv[2]):  # start together
  time.sleep(0.01)
b = tfds_builders.prepare("digits", cache_dir=sys.argv[1])
print("SIZES", len(b.as_data_source(split="train")), len(b.as_data_source(split="test")))
"""


def test_three_runs_prepare_one_cache_at_once(tmp_path):
  cache, go = str(tmp_path / "cache"), str(tmp_path / "go")
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _PREPARE, cache, go],
      env=subprocess_env(1),
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for _ in range(3)
  ]
  time.sleep(8)  # imports done (tfds, sklearn)
  open(go, "w").close()
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]  # the old code: FileExistsError in all but one
    assert "SIZES 1437 360" in out, out[-2000:]
  assert sum("downloaded and prepared to" in out for out in outputs) == 1, "prepared more than once"


def test_truncated_cache_file_is_named_with_the_fix(tmp_path):
  cache = str(tmp_path / "cache")
  builder = tfds_builders.prepare("digits", cache_dir=cache)
  path = os.path.join(builder.data_dir, "normjax_digits-train.array_record-00000-of-00001")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(tfds_builders.DataFormatError) as info:
    input_pipeline.get_datasets(_config(cache))
  assert str(info.value).startswith(f"{path}: the prepared file is corrupt (")
  assert f"delete {builder.data_dir} (the prepared copy" in str(info.value)
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.rmtree(builder.data_dir)  # the fix works
  assert input_pipeline.get_datasets(_config(cache))[2].num_train == 1437


# ---------------------------------------------------------------------------------------------------------
# Item 6: configs are validated before any work; a resumed work directory keeps its run.


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"learning_rate": -0.1}, "config.learning_rate=-0.1: expected a finite number > 0"),
    ({"learning_rate": float("nan")}, "config.learning_rate=nan: expected a finite number > 0"),
    ({"num_steps": -5, "num_epochs": 0}, "config.num_steps=-5: expected an integer >= 0"),
    (
      {"num_steps": 0, "num_epochs": 0},
      "config.num_steps=0 and config.num_epochs=0: expected at least one",
    ),
    ({"num_epochs": -1}, "config.num_epochs=-1: expected a finite number >= 0"),
    ({"batch_size": 0}, "config.batch_size=0: expected an integer > 0"),
    (
      {"batch_size": 36},
      "config.batch_size=36 is the global batch, over all devices: it must be divisible "
      "by the 8 device",
    ),
    ({"eval_batch_size": 100}, "config.eval_batch_size=100 is the global evaluation batch"),
    (
      {"norm": "ghost_batch_norm", "batch_size": 256, "ghost_batch_size": 12},
      r"config.ghost_batch_size=12 must be a positive divisor of the per-device batch of 32 examples "
      r"\(config.batch_size=256 is global, over 8 device\(s\)\)",
    ),
    (
      {"norm": "batch_renorm", "renorm_ghost_batch_size": 3},
      "config.renorm_ghost_batch_size=3 must be",
    ),
    ({"log_every": 0}, "config.log_every=0: expected an integer > 0"),
    ({"optimizer": "sgdd"}, "config.optimizer='sgdd': expected one of"),
    ({"restore_from": "runs/x"}, "config.restore_from='runs/x': expected '<workdir>:<step>'"),
  ],
)
def test_invalid_config_is_refused_before_any_work(overrides, message, tmp_path):
  cache = str(tmp_path / "cache")
  with pytest.raises(config_checks.ConfigError, match=message):
    train.train_and_evaluate(_config(cache, **overrides), str(tmp_path / "run"))
  assert not os.path.exists(cache) and not os.path.exists(
    tmp_path / "run"
  )  # nothing prepared or written


def test_batch_larger_than_the_data_is_refused_after_counting_it(data_cache, tmp_path):
  with pytest.raises(
    config_checks.ConfigError,
    match=r"config.batch_size=1440 \(global\) exceeds the 1437 "
    r"training examples of 'digits'",
  ):
    train.train_and_evaluate(_config(data_cache, batch_size=1440), str(tmp_path))


def test_resume_with_another_model_is_refused_in_one_paragraph(data_cache, tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(_config(data_cache, num_steps=4, checkpoint_every=2), workdir)
  other = _config(data_cache, num_steps=4, checkpoint_every=2, model="cifar_cnn", learning_rate=0.1)
  with pytest.raises(config_checks.ConfigError) as info:
    train.train_and_evaluate(other, workdir)
  message = str(info.value)
  assert "\n" not in message and len(message) < 1500
  assert message.startswith(
    f"{workdir} holds a run whose config differs in keys that change the run: "
    "learning_rate (saved 0.05, now 0.1), model (saved 'mnist_cnn', now 'cifar_cnn')."
  )
  assert f"--config.restore_from={workdir}:4" in message and "num_steps" in message
  # Keys that may change on resume are accepted: a longer run continues from step 4.
  longer = train.train_and_evaluate(
    _config(data_cache, num_steps=6, checkpoint_every=2, eval_every=3), workdir
  )
  assert longer["steps"] == 6 and train.checkpoint_steps(workdir) == [4, 6]
  assert [
    r.split(",")[0] for r in open(os.path.join(workdir, "train.csv")).read().splitlines()[1:]
  ] == ["2", "4", "6"]


# ---------------------------------------------------------------------------------------------------------
# Item 7: a finished run rerun reports its final metrics and writes nothing worse.


def test_finished_run_rerun_reports_its_metrics(data_cache, tmp_path, capsys):
  workdir = tmp_path / "run"
  config = _config(data_cache, num_steps=6, log_every=3)
  first = train.train_and_evaluate(config, str(workdir))
  saved = (workdir / "final_metrics.json").read_bytes()
  mtimes = {
    f: os.path.getmtime(workdir / f) for f in os.listdir(workdir) if os.path.isfile(workdir / f)
  }
  again = train.train_and_evaluate(config, str(workdir))
  assert again == json.loads(saved) and np.isfinite(again["train_loss"])
  assert again["train_loss"] == pytest.approx(first["train_loss"], rel=1e-6)
  assert "the run is complete (6 steps)" in capsys.readouterr().out
  assert (workdir / "final_metrics.json").read_bytes() == saved
  assert {f: os.path.getmtime(workdir / f) for f in mtimes} == mtimes  # nothing rewritten
  # Killed after its final checkpoint but before final_metrics.json: the train metrics come from train.csv.
  os.remove(workdir / "final_metrics.json")
  rebuilt = train.train_and_evaluate(config, str(workdir))
  assert rebuilt["train_loss"] == pytest.approx(first["train_loss"], rel=1e-6)
  assert rebuilt["eval_accuracy"] == first["eval_accuracy"]


def test_from_workdir_config_round_trips(data_cache, tmp_path):
  config = _config(data_cache, num_steps=3, data_mean=(0.25,), max_norm=None)
  train.train_and_evaluate(config, str(tmp_path))
  loaded = from_workdir.get_config(str(tmp_path))
  assert loaded.to_dict() == config.to_dict()
  with pytest.raises(
    FileNotFoundError, match=r"config.json: missing; expected the config.json of a work"
  ):
    from_workdir.get_config(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------------
# run_study: the documented flags exist, and shards out of range are refused.


def test_run_study_shards_and_documented_flags():
  assert run_study.parse_shard("1/2") == (1, 2)
  for bad in ("2/2", "0/0", "a/b", "1"):
    with pytest.raises(app.UsageError, match=re.escape(f"--shard={bad!r}: expected")):
      run_study.parse_shard(bad)
  documented = set(re.findall(r"--([a-z_]+)", run_study.__doc__))
  from absl import flags  # pylint: disable=g-import-not-at-top

  defined = set(flags.FLAGS) | {f"no{k}" for k in flags.FLAGS}
  assert documented and documented <= defined, documented - defined
