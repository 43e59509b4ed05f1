"""Diagnostics recorded at every evaluation: the distribution of the inputs to the activations.

With `config.track_activations`, `make_probe` returns a function of the train state that runs the model in
training mode (batch statistics, state updates discarded) on a fixed probe batch — the first
`config.probe_examples` test images — and summarizes the output of every norm module inside a `NormAct`,
i.e. the input to the ReLU when `norm_position="before"` (with `norm="none"` that is the raw conv / dense
output). This is the quantity Ioffe & Szegedy (2015, Fig. 1) plot to show internal covariate shift: its 15th,
50th and 85th percentiles for one fixed unit (channel 0), plus the mean over channels of each channel's
mean and standard deviation. The rows go to `activations.csv`, with keys `<layer>/<statistic>`.

Example:
  >>> probe = make_probe(config, model, test_source)  # None unless config.track_activations
  >>> probe(state)["NormAct_0/unit0_p50"]  # doctest: +SKIP
"""

import functools
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments import input_pipeline
from experiments import models


def _is_activation_input(module, method_name: str) -> bool:
  return method_name == "__call__" and isinstance(module.parent, models.NormAct)


def _summaries(x: jax.Array) -> Dict[str, jax.Array]:
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1])  # (examples × positions, channels)
  unit = x[:, 0]
  means, stds = x.mean(0), x.std(0)
  return {
    "unit0_p15": jnp.percentile(unit, 15),
    "unit0_p50": jnp.percentile(unit, 50),
    "unit0_p85": jnp.percentile(unit, 85),
    "mean_of_channel_means": means.mean(),
    "mean_of_abs_channel_means": jnp.abs(means).mean(),
    "mean_of_channel_stds": stds.mean(),
  }


def _layer_name(path) -> str:
  keys = [getattr(k, "key", str(k)) for k in path]
  return next((k for k in reversed(keys) if k.startswith("NormAct")), "/".join(map(str, keys)))


def _probe(model, params, batch_stats, images):
  variables = {"params": params, "batch_stats": batch_stats}
  _, state = model.apply(
    variables,
    images,
    training=True,
    mutable=["batch_stats", "intermediates"],
    capture_intermediates=_is_activation_input,
  )
  flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
  out = {}
  for path, value in flat:
    for key, v in _summaries(value).items():
      out[f"{_layer_name(path)}/{key}"] = v
  return out


def make_probe(config, model, test_source) -> Optional[Callable[..., Dict[str, float]]]:
  """`probe(state) -> {"<layer>/<statistic>": float}` if `config.track_activations`, else None."""
  if not config.get("track_activations", False):
    return None
  n = min(config.get("probe_examples", 256), len(test_source))
  images = jnp.asarray(input_pipeline.read_examples(test_source, config, np.arange(n))["image"])
  fn = jax.jit(functools.partial(_probe, model))

  def probe(state) -> Dict[str, float]:
    return {
      k: float(v) for k, v in jax.device_get(fn(state.params, state.batch_stats, images)).items()
    }

  return probe
