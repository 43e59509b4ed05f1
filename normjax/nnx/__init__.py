"""Flax NNX wrappers: `nnx.Param` for scale/bias, `nnx.BatchStat` for running statistics."""
from normjax.nnx._batch_norm import BatchNorm
from normjax.nnx._batch_norm import BatchRenorm
from normjax.nnx._batch_norm import GhostBatchNorm
from normjax.nnx._feature_norms import GroupNorm
from normjax.nnx._feature_norms import InstanceNorm
from normjax.nnx._feature_norms import LayerNorm
from normjax.nnx._feature_norms import RMSNorm
