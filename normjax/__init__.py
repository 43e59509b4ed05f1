"""normjax: normalization layers for JAX as pure, composable transforms.

Every layer is a `Transform`: `params, state = t.init(x)`, then
`y, state = t.apply(params, state, x, training=...)`.
"""
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

__version__ = "0.1.0"
