"""float64 NumPy references written from the papers' equations, shared by the tests."""

import numpy as np


def batch_norm_train(x, axes, scale, bias, eps):
  """Ioffe & Szegedy 2015, Alg. 1: normalize with the biased batch variance.

  Returns y, the batch mean and the biased batch variance (keepdims).
  """
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=axes, keepdims=True)
  var = x.var(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


def batch_norm_train_grads(x, dy, axes, scale, eps, r=1.0):
  """Ioffe & Szegedy 2015 §3 back-propagation (with Ioffe 2017's constant factor r for renorm).

  For y = γ (x̂ r + d) + β, x̂ = (x − μ_B)/σ_B: dβ = Σ dy, dγ = Σ dy (x̂ r + d) is formed by the caller,
  and dx = γ r / σ_B · (dy − mean(dy) − x̂ · mean(dy x̂)). Returns dx and Σ dy x̂ and Σ dy (keepdims).
  """
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  mean = x.mean(axis=axes, keepdims=True)
  sigma = np.sqrt(x.var(axis=axes, keepdims=True) + eps)
  xhat = (x - mean) / sigma
  mean_dy = dy.mean(axis=axes, keepdims=True)
  mean_dy_xhat = (dy * xhat).mean(axis=axes, keepdims=True)
  dx = scale * r / sigma * (dy - mean_dy - xhat * mean_dy_xhat)
  return dx, (dy * xhat).sum(axis=axes, keepdims=True), dy.sum(axis=axes, keepdims=True)


def running_statistics(batch_values, initial, momentum, debias=False):
  """Running value after each batch value: EMA (`momentum` = weight of the old value), the cumulative
  average (`momentum=None`, PyTorch), or Haiku's zero-debiased EMA (a hidden EMA started at zero,
  reported divided by 1 − momentum^t)."""
  value, hidden, out = np.asarray(initial, np.float64), 0.0, []
  for t, new in enumerate(batch_values, start=1):
    if momentum is None:
      value = sum(batch_values[:t]) / t
    elif debias:
      hidden = momentum * hidden + (1 - momentum) * new
      value = hidden / (1 - momentum**t)
    else:
      value = momentum * value + (1 - momentum) * new
    out.append(value)
  return out


def ghost_groups(n, ghost_batch_size, grouping):
  """Row indices of each ghost group, as a list of arrays (Hoffer et al. 2017; tf-keras).

  "consecutive": group j is rows j·g … j·g + g − 1. "strided": tf-keras `virtual_batch_size` reshapes the
  batch to [g, n/g, ...] and reduces over the first axis, so group j is rows j, j + n/g, j + 2n/g, ...
  """
  g = ghost_batch_size
  rows = np.arange(n)
  if grouping == "consecutive":
    return list(rows.reshape(n // g, g))
  return list(rows.reshape(g, n // g).T)


def ghost_batch_norm_train(x, ghost_batch_size, grouping, feature_axes, gamma, beta, eps):
  """Ghost BatchNorm in training: each group normalized by its own biased moments.

  Returns y and the per-group means and variances (arrays of shape [groups, *feature_shape]).
  """
  x = np.asarray(x, np.float64)
  axes = tuple(a for a in range(1, x.ndim) if a not in feature_axes)
  bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  gamma = np.broadcast_to(np.asarray(gamma, np.float64), feature_shape)
  beta = np.broadcast_to(np.asarray(beta, np.float64), feature_shape)
  y, means, variances = np.empty_like(x), [], []
  for rows in ghost_groups(x.shape[0], ghost_batch_size, grouping):
    xg = x[rows]
    mean = xg.mean(axis=(0,) + axes, keepdims=True)
    var = xg.var(axis=(0,) + axes, keepdims=True)
    y[rows] = (xg - mean) / np.sqrt(var + eps) * np.reshape(gamma, bshape) + np.reshape(
      beta, bshape
    )
    means.append(mean.reshape(-1)), variances.append(var.reshape(-1))
  return y, np.array(means), np.array(variances)


def keras_renorm_steps(
  batches, gamma, beta, *, momentum, renorm_momentum, eps, rmin, rmax, dmax, initial_variance=1.0
):
  """Keras `BatchNormalization(renorm=True)` on 2-D batches, step by step, in float64.

  Ioffe 2017, Algorithm 1, with Keras' bookkeeping (tf-keras `_renorm_correction_and_moments` and its
  `testRenorm`; Keras 3 `_update_renorm_statistics`): r and d use the renorm moving mean and σ
  (`renorm_momentum`), the inference statistics are a moving mean and a moving σ = EMA of
  sqrt(σ²_B + ε) (`momentum`), and moving_variance = max(σ² − ε, 0). Both σ start at
  sqrt(initial_variance) (Keras' initializer), the means at 0.

  Returns a list with, per step, a dict: y (training output), moving_mean, moving_variance,
  y_inference (the same batch through the updated inference statistics) and clipped (whether r or d
  was clipped, per feature).
  """
  mean_r = mean_m = 0.0
  sigma_r = sigma_m = np.sqrt(initial_variance)
  out = []
  for x in batches:
    x = np.asarray(x, np.float64)
    mu, sigma_b = x.mean(0), np.sqrt(x.var(0) + eps)
    r_raw = sigma_b / np.maximum(sigma_r, np.sqrt(eps))
    d_raw = (mu - mean_r) / np.maximum(sigma_r, np.sqrt(eps))
    r, d = np.clip(r_raw, rmin, rmax), np.clip(d_raw, -dmax, dmax)
    y = ((x - mu) / sigma_b * r + d) * gamma + beta
    mean_r = renorm_momentum * mean_r + (1 - renorm_momentum) * mu
    sigma_r = renorm_momentum * sigma_r + (1 - renorm_momentum) * sigma_b
    mean_m = momentum * mean_m + (1 - momentum) * mu
    sigma_m = momentum * sigma_m + (1 - momentum) * sigma_b
    variance = np.maximum(sigma_m**2 - eps, 0.0)
    y_inference = (x - mean_m) / np.sqrt(variance + eps) * gamma + beta
    out.append(
      dict(
        y=y,
        moving_mean=np.broadcast_to(mean_m, mu.shape),
        moving_variance=np.broadcast_to(variance, mu.shape),
        y_inference=y_inference,
        clipped=(r != r_raw) | (d != d_raw),
      )
    )
  return out
