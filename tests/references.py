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
