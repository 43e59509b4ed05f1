"""Plain helper functions shared by the test modules (import as `from tests import helpers`).

Fixtures live in `conftest.py`; these are ordinary functions so a test module can call them at import time
(e.g. inside `pytest.mark.parametrize`).
"""

import numpy as np


def normal_data(shape, mean=0.0, std=1.0, seed=0, dtype=np.float32) -> np.ndarray:
  """`mean + std * N(0, 1)` samples of `shape` from `np.random.default_rng(seed)`, cast to `dtype`.

  The draw is made in float64 and cast once, so the same seed gives the same numbers in every dtype.
  """
  return (mean + std * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)
