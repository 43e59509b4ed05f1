"""experiments/configs: every config parses its variant string with the one helper,
`experiments.configs.parse_variants`, accepts "" and "small", and refuses an unknown name."""

import importlib
import pathlib

import pytest

from experiments import configs

CONFIG_DIR = pathlib.Path(configs.__file__).parent
# from_workdir.py takes a work directory, not a variant (tested in test_experiments_faults.py)
NAMES = sorted(
  p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "from_workdir")
)
ALLOWED = {name: {"small"} for name in NAMES} | {"cifar10_cnn": {"small", "max_norm"}}


def _module(name):
  return importlib.import_module(f"experiments.configs.{name}")


def test_every_config_file_is_covered():
  assert set(NAMES) == {
    "cifar10_cnn",
    "cifar10_resnet18",
    "cifar10_resnet20",
    "default",
    "digits_bn_vs_none",
    "fashion_mnist_cnn",
    "mnist_cnn",
  }


@pytest.mark.parametrize("name", NAMES)
def test_small_is_a_short_run_of_the_same_job(name):
  full, small = _module(name).get_config(""), _module(name).get_config("small")
  assert _module(name).get_config() == full  # the default argument is ""
  assert small.name == full.name and small.model == full.model and small.dataset == full.dataset
  assert (small.eval_every, small.checkpoint_every) == (0, 0)

  def length(c):  # steps, or epochs as a bound when num_steps is 0
    return (c.num_steps or float("inf"), c.num_epochs)

  assert length(small) < length(full) or small.num_epochs < full.num_epochs
  if full.eval_every:
    assert small.eval_every == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["nonsense", "small,nonsense", "Small"])
def test_an_unknown_variant_is_refused_with_the_allowed_ones_named(name, bad):
  allowed = sorted(ALLOWED[name])
  with pytest.raises(ValueError) as raised:
    _module(name).get_config(bad)
  message = str(raised.value)
  assert f"variant={bad!r}" in message and f"the allowed variants are {allowed}" in message


def test_variants_combine_and_ignore_spaces():
  from experiments.configs import cifar10_cnn

  both = cifar10_cnn.get_config("small, max_norm")
  assert both.max_norm == 3.0 and both.name == "cifar10_cnn_max_norm" and both.num_steps == 20
  assert both.model_kwargs.width == 16
  assert cifar10_cnn.get_config("max_norm").num_steps == 0
  assert cifar10_cnn.get_config("").max_norm is None


def test_small_values_are_the_ones_the_smoke_tests_rely_on():
  from experiments.configs import cifar10_resnet18, cifar10_resnet20, digits_bn_vs_none, mnist_cnn

  r18 = cifar10_resnet18.get_config("small")
  assert (r18.num_steps, r18.batch_size, r18.eval_batch_size, r18.eval_examples) == (
    3,
    16,
    512,
    512,
  )
  r20 = cifar10_resnet20.get_config("small")
  assert (r20.num_steps, r20.batch_size, r20.eval_examples, r20.model) == (10, 32, 512, "resnet20")
  assert (mnist_cnn.get_config("small").num_steps, mnist_cnn.get_config("small").eval_examples) == (
    50,
    512,
  )
  digits = digits_bn_vs_none.get_config("small")
  assert (digits.num_epochs, digits.eval_every, digits.num_steps) == (1, 0, 0)


@pytest.mark.parametrize(
  "variant, allowed, want",
  [
    ("", {"small"}, set()),
    ("small", {"small"}, {"small"}),
    (" small ,", {"small"}, {"small"}),
    ("a,b,a", {"a", "b", "c"}, {"a", "b"}),
  ],
)
def test_parse_variants(variant, allowed, want):
  assert configs.parse_variants(variant, allowed) == frozenset(want)


def test_parse_variants_errors():
  with pytest.raises(
    ValueError,
    match=r"variant='x,small' names unknown variant\(s\) \['x'\]; the allowed "
    r"variants are \['small'\] \(comma-separated\), or \"\" for the full run",
  ):
    configs.parse_variants("x,small", {"small"})
  with pytest.raises(TypeError, match=r"variant=None must be a string"):
    configs.parse_variants(None, {"small"})


def test_apply_small():
  from experiments.configs import default

  c = configs.apply_small(default.get_config(), num_steps=7, batch_size=8)
  assert (c.eval_every, c.checkpoint_every, c.num_steps, c.batch_size) == (0, 0, 7, 8)
