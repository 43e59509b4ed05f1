"""float64 NumPy references written from the papers' equations, shared by the tests."""
import numpy as np


def batch_norm_train(x, axes, scale, bias, eps):
  """Ioffe & Szegedy 2015, Alg. 1: normalize with the biased batch variance."""
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=axes, keepdims=True)
  var = x.var(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var
