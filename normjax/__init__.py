"""normjax: normalization layers for JAX as pure, composable transforms.

Every layer is a `Transform`: `params, state = t.init(x)`, then
`y, state = t.apply(params, state, x, training=...)`. The framework faces `normjax.linen`,
`normjax.nnx` and `normjax.equinox` are loaded on first use: `import normjax` imports no Flax or
Equinox.
"""

import importlib as _importlib

from normjax._src.batch_norm import BatchNormConfig
from normjax._src.batch_norm import BatchNormState
from normjax._src.batch_norm import batch_norm
from normjax._src.batch_norm import batch_renorm
from normjax._src.batch_norm import ghost_batch_norm
from normjax._src.normalize import normalize
from normjax._src.renorm import RenormClipping
from normjax._src.renorm import paper_schedule as batch_renorm_paper_schedule
from normjax._src.stats import merge_moments
from normjax._src.stats import moments
from normjax._src.transform import EmptyState
from normjax._src.transform import Transform
from normjax._src.virtual_batch_norm import VirtualBatchNormState
from normjax._src.virtual_batch_norm import virtual_batch_norm

__version__ = "0.3.0"

# Issue 3: feature-axis norms, weight reparametrizations, constraints, BatchNorm tools.
from normjax._src.constraints import Constraint
from normjax._src.constraints import is_kernel
from normjax._src.constraints import max_norm
from normjax._src.constraints import min_max_norm
from normjax._src.constraints import non_neg
from normjax._src.constraints import unit_norm
from normjax._src.feature_norms import group_norm
from normjax._src.feature_norms import instance_norm
from normjax._src.feature_norms import layer_norm
from normjax._src.feature_norms import rms_norm
from normjax._src.folding import fold_batch_norm
from normjax._src.frozen_batch_norm import frozen_batch_norm
from normjax._src.weights import SpectralNormState
from normjax._src.weights import WeightTransform
from normjax._src.weights import spectral_norm
from normjax._src.weights import standardize_kernel
from normjax._src.weights import weight_norm
from normjax._src.weights import weight_norm_data_init
from normjax._src.weights import weight_standardization

__all__ = [
  "BatchNormConfig",
  "BatchNormState",
  "Constraint",
  "EmptyState",
  "RenormClipping",
  "SpectralNormState",
  "Transform",
  "VirtualBatchNormState",
  "WeightTransform",
  "batch_norm",
  "batch_renorm",
  "batch_renorm_paper_schedule",
  "fold_batch_norm",
  "frozen_batch_norm",
  "ghost_batch_norm",
  "group_norm",
  "instance_norm",
  "is_kernel",
  "layer_norm",
  "max_norm",
  "merge_moments",
  "min_max_norm",
  "moments",
  "non_neg",
  "normalize",
  "rms_norm",
  "spectral_norm",
  "standardize_kernel",
  "unit_norm",
  "virtual_batch_norm",
  "weight_norm",
  "weight_norm_data_init",
  "weight_standardization",
  "__version__",
]

_FACES = ("linen", "nnx", "equinox")


def __getattr__(name):
  """Loads a framework face (`normjax.linen`, `normjax.nnx`, `normjax.equinox`) on first access."""
  if name in _FACES:
    return _importlib.import_module(f"normjax.{name}")
  raise AttributeError(f"module 'normjax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_FACES))
