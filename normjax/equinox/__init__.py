"""Equinox faces: drop-ins for `equinox.nn`'s normalization layers, plus normjax's variants.

Layers take Equinox's constructor arguments (normjax's options as extra keywords), see one example per
call (batches go through `jax.vmap`, with an `axis_name` for BatchNorm), keep BatchNorm's running
statistics in an `eqx.nn.State` (`eqx.nn.make_with_state` works) and follow `eqx.nn.inference_mode`.
Needs `equinox` (an optional dependency).
"""

from normjax.equinox._batch_norm import BatchNorm
from normjax.equinox._feature_norms import GroupNorm
from normjax.equinox._feature_norms import InstanceNorm
from normjax.equinox._feature_norms import LayerNorm
from normjax.equinox._feature_norms import RMSNorm

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
