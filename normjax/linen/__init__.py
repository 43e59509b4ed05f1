"""Flax linen wrappers: parameters in `params`, running statistics in the mutable `batch_stats`."""
from normjax.linen._batch_norm import BatchNorm
from normjax.linen._batch_norm import BatchRenorm
from normjax.linen._batch_norm import GhostBatchNorm
from normjax.linen._batch_norm import VirtualBatchNorm
