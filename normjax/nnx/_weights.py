"""flax nnx layers with reparametrized kernels: weight-standardized Conv, weight-normed and
spectral-normed Linear. The kernel transforms are the pure `normjax` ones; these modules hold variables.

nnx names its dense layer `Linear`; `WeightNormDense` and `SpectralNormDense` are aliases that match
the `normjax.linen` names.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes
import jax
import jax.numpy as jnp

from normjax._src import modes
from normjax._src import transform
from normjax._src import validation
from normjax._src import weights as weights_lib
from normjax.nnx import _common

_LECUN = nnx.initializers.lecun_normal()


@dataclasses.dataclass(frozen=True)
class _StandardizeKernel:
  """A `promote_dtype` for `nnx.Conv` that standardizes the kernel, then promotes as given.

  `nnx.Conv` passes `(inputs, kernel, bias)` through `promote_dtype` right before the convolution, so
  the raw kernel stays the `kernel` parameter and the convolution (padding, dilation, groups, ...) is
  flax's own.
  """

  epsilon: float
  promote_dtype: Callable

  def __call__(self, args, /, *, dtype=None, **kwargs):
    inputs, kernel, bias = args
    kernel = weights_lib.standardize_kernel(kernel, epsilon=self.epsilon)
    return self.promote_dtype((inputs, kernel, bias), dtype=dtype, **kwargs)


class WeightStandardizedConv(nnx.Conv):
  """`flax.nnx.Conv` whose kernel is standardized per output channel before use (arXiv:1903.10520).

  The raw kernel is the `kernel` parameter; the convolution uses `normjax.standardize_kernel(kernel)`:
  mean 0 and variance 1 over (h, w, in) for each output channel, `ws_epsilon` inside the square root.

  Args:
    in_features, out_features, kernel_size, strides: as `flax.nnx.Conv`.
    ws_epsilon: epsilon of the standardization (default 1e-5).
    promote_dtype: flax's dtype promotion, applied after the standardization.
    rngs: `nnx.Rngs` for the kernel and bias initializers (required, as `nnx.Conv`).
    **conv_options: every other keyword argument of `flax.nnx.Conv` (`padding`, `kernel_dilation`,
      `feature_group_count`, `use_bias`, `dtype`, `param_dtype`, `kernel_init`, `bias_init`, ...).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import normjax.nnx as njn
    >>> conv = njn.WeightStandardizedConv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((1, 5, 5, 3))).shape
    (1, 5, 5, 8)

  References:
    Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight
    Standardization", arXiv:1903.10520.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: Union[int, Sequence[int]],
    strides: Union[None, int, Sequence[int]] = 1,
    *,
    ws_epsilon: float = 1e-5,
    promote_dtype: Callable = flax_dtypes.promote_dtype,
    rngs: nnx.Rngs,
    **conv_options,
  ):
    validation.check_positive(ws_epsilon, "ws_epsilon")
    super().__init__(
      in_features,
      out_features,
      kernel_size,
      strides,
      promote_dtype=_StandardizeKernel(ws_epsilon, promote_dtype),
      rngs=rngs,
      **conv_options,
    )
    self.ws_epsilon = ws_epsilon


def _key(rngs: Optional[nnx.Rngs], init, name: str, layer: str):
  if rngs is not None:
    return rngs.params()
  if init is nnx.initializers.zeros or init is _common.ZEROS:
    return None
  raise ValueError(
    f"{layer}: {name}={init!r} needs a random key but rngs=None; pass rngs=nnx.Rngs(seed)"
  )


class WeightNormLinear(nnx.Module):
  """Linear layer with a weight-normed kernel `w = g · v/‖v‖` (`normjax.weight_norm`, arXiv:1602.07868).

  Params: `v` (`kernel_init`), `g` (initialized to ‖v‖, so the layer starts as a plain Linear with
  kernel `v`) and `bias`. `data_init(x)` applies the paper's data-dependent initialization: `g` and
  `bias` are set so that the outputs on the batch `x` have mean 0 and standard deviation `init_scale`.

  Args:
    in_features, out_features: sizes of the input's last axis and of the output's.
    use_bias: add a learned bias.
    epsilon: added to ‖v‖² inside the square root (default 1e-12).
    init_scale: the target standard deviation of `data_init`.
    param_dtype: dtype of the parameters.
    kernel_init, bias_init: flax initializers of `v` and `bias`.
    precision: `jax.lax` precision of the matrix product.
    rngs: `nnx.Rngs` (required for `kernel_init`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import normjax.nnx as njn
    >>> layer = njn.WeightNormLinear(3, 4, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (64, 3))
    >>> layer.data_init(x)
    >>> bool(jnp.allclose(layer(x).std(0), 1.0, atol=1e-3))
    True

  References:
    Salimans & Kingma 2016, "Weight Normalization", arXiv:1602.07868.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    epsilon: float = 1e-12,
    init_scale: float = 1.0,
    param_dtype: Any = jnp.float32,
    kernel_init: Callable = _LECUN,
    bias_init: Callable = _common.ZEROS,
    precision: Any = None,
    rngs: nnx.Rngs,
  ):
    layer = "normjax.nnx.WeightNormLinear"
    validation.check_positive(epsilon, "epsilon")
    v = kernel_init(
      _key(rngs, kernel_init, "kernel_init", layer), (in_features, out_features), param_dtype
    )
    params, _ = weights_lib.weight_norm(epsilon=epsilon).init(v)
    self.v = nnx.Param(params["v"])
    self.g = nnx.Param(params["g"])
    self.bias = (
      nnx.Param(bias_init(_key(rngs, bias_init, "bias_init", layer), (out_features,), param_dtype))
      if use_bias
      else nnx.data(None)
    )
    self.in_features, self.out_features = in_features, out_features
    self.use_bias, self.epsilon, self.init_scale = use_bias, epsilon, init_scale
    self.param_dtype, self.precision = param_dtype, precision

  def kernel(self) -> jax.Array:
    """The kernel the layer uses, `g · v/‖v‖`."""
    w, _ = weights_lib.weight_norm(epsilon=self.epsilon).apply(
      {"v": self.v[...], "g": self.g[...]}, transform.EmptyState(), training=False
    )
    return w

  def data_init(self, x) -> None:
    """The paper's data-dependent initialization (§3) from the batch `x`: sets `g` and `bias`."""
    params, bias = weights_lib.weight_norm_data_init(
      {"v": self.v[...], "g": self.g[...]},
      jnp.dot(x, self.kernel(), precision=self.precision),
      init_scale=self.init_scale,
    )
    self.g[...] = params["g"]
    if self.bias is not None:
      self.bias[...] = bias

  def __call__(self, x):
    """Applies the linear layer with the weight-normed kernel `g · v/‖v‖`."""
    y = jnp.dot(x, self.kernel(), precision=self.precision)
    return y + self.bias[...] if self.bias is not None else y


class SpectralNormLinear(nnx.Module):
  """Linear layer with a spectrally normalized kernel `W / σ(W)` (`normjax.spectral_norm`).

  `kernel` and `bias` are `nnx.Param`s; the power-iteration vector `u` and the last estimate `sigma`
  are `nnx.BatchStat`s, updated in training mode only. The mode is `BatchNorm`'s: the attribute
  `use_running_average` (`model.train()` / `model.eval()`) unless the call gives
  `use_running_average` or `training`.

  Args:
    in_features, out_features: sizes of the input's last axis and of the output's.
    use_running_average: the mode when the call gives none (default False: training updates `u`).
    use_bias: add a learned bias.
    n_power_iterations: power-iteration steps per training call (>= 1).
    epsilon: added inside the square roots of the power iteration.
    param_dtype, kernel_init, bias_init, precision: as `WeightNormLinear`.
    rngs: `nnx.Rngs` for the kernel, the bias and the initial `u`.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import normjax.nnx as njn
    >>> layer = njn.SpectralNormLinear(3, 4, n_power_iterations=20, rngs=nnx.Rngs(0))
    >>> y = layer(jnp.ones((2, 3)))          # training: u and sigma are updated
    >>> layer.eval()
    >>> y = layer(jnp.ones((2, 3)))          # u and sigma kept

  References:
    Miyato et al. 2018, "Spectral Normalization for Generative Adversarial Networks", arXiv:1802.05957.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_running_average: Optional[bool] = False,
    use_bias: bool = True,
    n_power_iterations: int = 1,
    epsilon: float = 1e-12,
    param_dtype: Any = jnp.float32,
    kernel_init: Callable = _LECUN,
    bias_init: Callable = _common.ZEROS,
    precision: Any = None,
    rngs: nnx.Rngs,
  ):
    layer = "normjax.nnx.SpectralNormLinear"
    use_running_average = modes.check_flag(use_running_average, "use_running_average")
    sn = weights_lib.spectral_norm(n_power_iterations=n_power_iterations, epsilon=epsilon)
    kernel = kernel_init(
      _key(rngs, kernel_init, "kernel_init", layer), (in_features, out_features), param_dtype
    )
    self.kernel = nnx.Param(kernel)
    self.bias = (
      nnx.Param(bias_init(_key(rngs, bias_init, "bias_init", layer), (out_features,), param_dtype))
      if use_bias
      else nnx.data(None)
    )
    _, state = sn.init(kernel, None if rngs is None else rngs.params())
    self.u = nnx.BatchStat(state.u)
    self.sigma = nnx.BatchStat(state.sigma)
    self.in_features, self.out_features = in_features, out_features
    self.use_running_average, self.use_bias = use_running_average, use_bias
    self.n_power_iterations, self.epsilon = n_power_iterations, epsilon
    self.param_dtype, self.precision = param_dtype, precision

  def __call__(
    self, x, use_running_average: Optional[bool] = None, *, training: Optional[bool] = None
  ):
    """Applies the linear layer with the kernel divided by its spectral norm; in training, one power-iteration step updates `u` and `sigma`."""
    training = modes.merge_override(
      self.use_running_average,
      use_running_average,
      training,
      layer="normjax.nnx.SpectralNormLinear",
    )
    sn = weights_lib.spectral_norm(n_power_iterations=self.n_power_iterations, epsilon=self.epsilon)
    w, state = sn.apply(
      {"kernel": self.kernel[...]},
      weights_lib.SpectralNormState(self.u[...], self.sigma[...]),
      training=training,
    )
    if training:
      self.u[...], self.sigma[...] = state
    y = jnp.dot(x, w, precision=self.precision)
    return y + self.bias[...] if self.bias is not None else y

  def set_view(self, use_running_average: Optional[bool] = None):
    """Used by `nnx.view(model, use_running_average=...)`.

    Args:
      use_running_average: if given, the new mode attribute.
    """
    if use_running_average is not None:
      self.use_running_average = modes.check_flag(use_running_average, "use_running_average")


WeightNormDense = WeightNormLinear
SpectralNormDense = SpectralNormLinear
