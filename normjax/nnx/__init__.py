"""Flax nnx faces: drop-ins for `flax.nnx`'s normalization layers, plus normjax's variants.

Parameters are `nnx.Param`s and running statistics `nnx.BatchStat`s with flax's names; the mode is
flax's `use_running_average` attribute (`model.train()` / `model.eval()`, `nnx.view`) unless a call
gives `use_running_average` or normjax's `training=`. Every constructor lists the options of the core
configuration explicitly. The nnx-specific tools (population recalibration, folding, flax state
conversion) live here too.
"""

from normjax.nnx._batch_norm import BatchCount
from normjax.nnx._batch_norm import BatchNorm
from normjax.nnx._batch_norm import BatchRenorm
from normjax.nnx._batch_norm import GhostBatchNorm
from normjax.nnx._batch_norm import from_flax_state
from normjax.nnx._batch_norm import to_flax_state
from normjax.nnx._feature_norms import GroupNorm
from normjax.nnx._feature_norms import InstanceNorm
from normjax.nnx._feature_norms import LayerNorm
from normjax.nnx._feature_norms import RMSNorm
from normjax.nnx._folding import fold_batch_norm_pair
from normjax.nnx._frozen_batch_norm import FrozenBatchNorm
from normjax.nnx._population import recalibrate_batch_stats
from normjax.nnx._virtual_batch_norm import VirtualBatchNorm
from normjax.nnx._weights import SpectralNormDense
from normjax.nnx._weights import SpectralNormLinear
from normjax.nnx._weights import WeightNormDense
from normjax.nnx._weights import WeightNormLinear
from normjax.nnx._weights import WeightStandardizedConv

__all__ = [
  "BatchCount",
  "BatchNorm",
  "BatchRenorm",
  "FrozenBatchNorm",
  "GhostBatchNorm",
  "GroupNorm",
  "InstanceNorm",
  "LayerNorm",
  "RMSNorm",
  "SpectralNormDense",
  "SpectralNormLinear",
  "VirtualBatchNorm",
  "WeightNormDense",
  "WeightNormLinear",
  "WeightStandardizedConv",
  "fold_batch_norm_pair",
  "from_flax_state",
  "recalibrate_batch_stats",
  "to_flax_state",
]
