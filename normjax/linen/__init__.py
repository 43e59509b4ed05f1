"""Flax linen faces: drop-ins for `flax.linen`'s normalization layers, plus normjax's variants.

Parameters live in `params`, running statistics in the mutable `batch_stats` collection, as in flax;
the mode is flax's `use_running_average` (field or call argument) or normjax's `training=`. The
linen-specific tools (population recalibration, folding a whole model) live here too.
"""

from normjax.linen._batch_norm import BatchNorm
from normjax.linen._batch_norm import BatchRenorm
from normjax.linen._batch_norm import GhostBatchNorm
from normjax.linen._batch_norm import VirtualBatchNorm
from normjax.linen._batch_norm import to_flax_variables
from normjax.linen._feature_norms import GroupNorm
from normjax.linen._feature_norms import InstanceNorm
from normjax.linen._feature_norms import LayerNorm
from normjax.linen._feature_norms import RMSNorm
from normjax.linen._folding import fold_batch_norm_model
from normjax.linen._frozen_batch_norm import FrozenBatchNorm
from normjax.linen._population import recalibrate_batch_stats
from normjax.linen._weights import SpectralNormDense
from normjax.linen._weights import WeightNormDense
from normjax.linen._weights import WeightStandardizedConv

__all__ = [
  "BatchNorm",
  "BatchRenorm",
  "FrozenBatchNorm",
  "GhostBatchNorm",
  "GroupNorm",
  "InstanceNorm",
  "LayerNorm",
  "RMSNorm",
  "SpectralNormDense",
  "VirtualBatchNorm",
  "WeightNormDense",
  "WeightStandardizedConv",
  "fold_batch_norm_model",
  "recalibrate_batch_stats",
  "to_flax_variables",
]
