"""linen layers with reparametrized kernels: weight-standardized Conv, weight-normed and spectral-normed
Dense. The kernel transforms are the pure `normjax` ones; these modules only hold the variables."""

from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from normjax._src import modes
from normjax._src import transform
from normjax._src import weights as weights_lib


class WeightStandardizedConv(nn.Module):
  """`flax.linen.Conv` whose kernel is standardized per output channel before use (arXiv:1903.10520).

  Fields are those of `nn.Conv` plus `ws_epsilon` (see `normjax.weight_standardization`). The raw kernel
  is stored in `params/Conv_0/kernel`; the standardized one is what the convolution uses.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> conv = njl.WeightStandardizedConv(8, (3, 3))
    >>> variables = conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    >>> conv.apply(variables, jnp.ones((1, 5, 5, 3))).shape
    (1, 5, 5, 8)
  """

  features: int
  kernel_size: Sequence[int]
  strides: Union[int, Sequence[int]] = 1
  padding: Any = "SAME"
  kernel_dilation: Union[int, Sequence[int]] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  ws_epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    """Convolves `x` with the standardized kernel."""
    ws = weights_lib.weight_standardization(epsilon=self.ws_epsilon)

    def standardize(variables):  # {"params": {"kernel", "bias"}}, empty while initializing
      params = variables.get("params", {})
      if "kernel" not in params:
        return variables
      kernel, _ = ws.apply({"kernel": params["kernel"]}, transform.EmptyState(), training=False)
      return {**variables, "params": {**params, "kernel": kernel}}

    conv = nn.map_variables(nn.Conv, "params", trans_in_fn=standardize, init=self.is_initializing())
    return conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=self.padding,
      kernel_dilation=self.kernel_dilation,
      feature_group_count=self.feature_group_count,
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
      name="Conv_0",
    )(x)


class WeightNormDense(nn.Module):
  """Dense layer with a weight-normed kernel `w = g · v/‖v‖` (`normjax.weight_norm`, arXiv:1602.07868).

  Params: `v` (initialized by `kernel_init`), `g` (initialized to ‖v‖, so the layer starts as a plain
  Dense with kernel `v`), `bias`. With `data_init=True`, `init` instead sets `g` and `bias` from the
  initialization batch by the paper's data-dependent rule (`normjax.weight_norm_data_init`): the initial
  pre-activations have mean 0 and standard deviation `init_scale` per unit on that batch.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> layer = njl.WeightNormDense(4)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> layer.apply(variables, jnp.ones((2, 3))).shape
    (2, 4)
  """

  features: int
  use_bias: bool = True
  epsilon: float = 1e-12
  data_init: bool = False
  init_scale: float = 1.0
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    """Applies the Dense layer with the weight-normed kernel `g · v/‖v‖`."""
    wn = weights_lib.weight_norm(epsilon=self.epsilon)
    v = self.param("v", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    g0 = wn.init(v)[0]["g"]
    initial_bias = jnp.zeros((self.features,), self.param_dtype)
    if self.data_init and self.is_initializing():
      w0, _ = wn.apply({"v": v, "g": g0}, transform.EmptyState(), training=False)
      new_params, initial_bias = weights_lib.weight_norm_data_init(
        {"v": v, "g": g0}, jnp.dot(x, w0), init_scale=self.init_scale
      )
      g0 = new_params["g"]
    g = self.param("g", lambda _: g0)
    w, _ = wn.apply({"v": v, "g": g}, transform.EmptyState(), training=False)
    y = jnp.dot(x, w)
    if self.use_bias:
      y = y + self.param("bias", lambda _: initial_bias)
    return y


class SpectralNormDense(nn.Module):
  """Dense layer with a spectrally normalized kernel `W / σ(W)` (`normjax.spectral_norm`).

  The kernel is in `params`; the power-iteration state (`u`, `sigma`) in the `batch_stats` collection,
  updated only in training mode and when the collection is mutable. The mode is chosen as for
  `normjax.linen.BatchNorm`: exactly one of the field `use_running_average`, the `__call__` argument
  `use_running_average`, or `training`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> layer = njl.SpectralNormDense(4)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)), training=False)
    >>> y, _ = layer.apply(variables, jnp.ones((2, 3)), training=True, mutable=["batch_stats"])
  """

  features: int
  use_running_average: Optional[bool] = None
  use_bias: bool = True
  n_power_iterations: int = 1
  epsilon: float = 1e-12
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(
    self, x, use_running_average: Optional[bool] = None, *, training: Optional[bool] = None
  ):
    """Applies the Dense layer with the kernel divided by its spectral norm; in training, one power-iteration step updates `u` and `sigma`."""
    training = modes.merge_linen(
      self.use_running_average, use_running_average, training, layer=type(self).__name__
    )
    sn = weights_lib.spectral_norm(n_power_iterations=self.n_power_iterations, epsilon=self.epsilon)
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    u = self.variable("batch_stats", "u", lambda: sn.init(kernel, self.make_rng("params"))[1].u)
    sigma = self.variable("batch_stats", "sigma", lambda: jnp.ones((), jnp.float32))
    update = training and not self.is_initializing()
    w, new_state = sn.apply(
      {"kernel": kernel}, weights_lib.SpectralNormState(u.value, sigma.value), training=update
    )
    if update and self.is_mutable_collection("batch_stats"):
      u.value, sigma.value = new_state.u, new_state.sigma
    y = jnp.dot(x, w)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    return y
