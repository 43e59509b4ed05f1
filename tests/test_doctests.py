"""Runs the runnable examples in every public docstring."""

import doctest
import importlib
import pkgutil

import pytest

import normjax

MODULES = sorted(
  m.name
  for m in pkgutil.walk_packages(normjax.__path__, prefix="normjax.")
  if not m.name.endswith("__init__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  if name.startswith("normjax.equinox"):
    pytest.importorskip("equinox")
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  if result.attempted == 0:
    pytest.skip(f"{name} has no docstring examples")  # not counted as a pass
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
