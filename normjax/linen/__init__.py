"""Flax linen wrappers: parameters in `params`, running statistics in the mutable `batch_stats`."""
from normjax.linen._batch_norm import BatchNorm
from normjax.linen._batch_norm import BatchRenorm
from normjax.linen._batch_norm import GhostBatchNorm
from normjax.linen._batch_norm import VirtualBatchNorm
from normjax.linen._feature_norms import GroupNorm
from normjax.linen._feature_norms import InstanceNorm
from normjax.linen._feature_norms import LayerNorm
from normjax.linen._feature_norms import RMSNorm
from normjax.linen._frozen_batch_norm import FrozenBatchNorm
from normjax.linen._weights import SpectralNormDense
from normjax.linen._weights import WeightNormDense
from normjax.linen._weights import WeightStandardizedConv
