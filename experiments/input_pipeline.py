"""Input pipeline: prepared tfds data sources, shuffled and batched with grain, sharded per process.

Batch `i` of a run is a pure function of `(seed, i)`: grain shuffles the *indices* of the split with a
different permutation per epoch, groups them into global batches of `global_batch_size`, and process `p` of
`P` reads rows `[p * B/P, (p + 1) * B/P)` of each global batch, i.e. only its own shard. Hence

* a resumed run continues with exactly the batches an uninterrupted run would have seen (random access
  by step, no iterator state to checkpoint), and
* the global batch does not depend on the number of processes or devices, so one process with four
  devices sees the same global batches as two processes with two devices each.

Example:
  >>> train, test, info = get_datasets(config)
  >>> batches = train_batches(train, config, start_step=0, total_steps=num_steps(config, info))
  >>> batch = next(iter(batches))  # {"image": f32[B/P, H, W, C], "label": i32[B/P]}
"""

import dataclasses
import os
from typing import Any, Dict, Iterator, Sequence, Tuple

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from experiments import tfds_builders


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the models and the training loop need to know about a prepared dataset."""

  name: str
  image_shape: Tuple[int, ...]  # (H, W, C) of one image
  num_classes: int
  num_train: int
  num_test: int


def get_datasets(config) -> Tuple[Sequence[Dict[str, Any]], Sequence[Dict[str, Any]], DatasetInfo]:
  """Returns the train and test random-access sources and their `DatasetInfo`.

  `config.dataset` is one of `tfds_builders.BUILDERS` (prepared from `config.data_dir` into
  `config.cache_dir` on first use) or `"tfds:<name>"` for a tfds catalog dataset already prepared in
  ArrayRecord format under `config.cache_dir` (nothing is downloaded).

  Raises:
    FileNotFoundError, tfds_builders.DataFormatError: missing or malformed source files.
  """
  if config.dataset.startswith("tfds:"):
    name = config.dataset[len("tfds:") :]
    builder = tfds.builder(name, data_dir=config.cache_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(
        f"tfds catalog dataset {name!r} is not prepared under {config.cache_dir!r}; "
        "prepare it (ArrayRecord format) beforehand: experiments never download."
      )
    tfds_builders.check_prepared(builder)
  else:
    data_dir = config.get("data_dir") or None
    # One process prepares; the others wait, then read the same files.
    if jax.process_index() == 0:
      builder = tfds_builders.prepare(
        config.dataset, source_dir=data_dir, cache_dir=config.cache_dir
      )
    _sync_processes("prepare_" + config.dataset)
    if jax.process_index() != 0:
      builder = tfds_builders.prepare(
        config.dataset, source_dir=data_dir, cache_dir=config.cache_dir
      )
  train = builder.as_data_source(split=config.get("train_split", "train"))
  test = builder.as_data_source(split=config.get("test_split", "test"))
  features = builder.info.features
  num_classes = getattr(features["label"], "num_classes", None) or config.get("num_classes", 10)
  info = DatasetInfo(
    name=config.dataset,
    image_shape=tuple(features["image"].shape),
    num_classes=num_classes,
    num_train=len(train),
    num_test=len(test),
  )
  _check_counts(builder, info)
  return train, test, info


def _check_counts(builder, info: DatasetInfo) -> None:
  expected = getattr(builder, "SPLIT_SIZES", {})
  for split, n in (("train", info.num_train), ("test", info.num_test)):
    if split in expected and expected[split] != n:
      raise tfds_builders.DataFormatError(
        f"{builder.data_dir}: the prepared {split} split has {n} examples, expected {expected[split]}; "
        "delete the cache directory and prepare again"
      )


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def _local_rows(global_batch_size: int) -> slice:
  count, index = jax.process_count(), jax.process_index()
  if global_batch_size % count:
    raise ValueError(
      f"batch_size={global_batch_size} must be divisible by the process count {count}"
    )
  local = global_batch_size // count
  return slice(index * local, (index + 1) * local)


def _read_batch(source, indices: np.ndarray) -> Dict[str, np.ndarray]:
  try:
    records = source.__getitems__([int(i) for i in indices])
  except RuntimeError as e:  # ArrayRecord / Riegeli: a file of the prepared dataset is damaged
    where = getattr(getattr(source, "dataset_info", None), "data_dir", "the prepared dataset")
    raise tfds_builders.DataFormatError(
      f"{where}: reading examples {int(indices[0])}..{int(indices[-1])} failed ({e}); the prepared files are "
      f"damaged: delete {where} and run again to prepare it anew"
    ) from e
  return {
    "image": np.stack([r["image"] for r in records]),
    "label": np.asarray([r["label"] for r in records], np.int32),
  }


def _preprocess(
  batch: Dict[str, np.ndarray], mean: Sequence[float], std: Sequence[float]
) -> Dict[str, np.ndarray]:
  image = batch["image"].astype(np.float32) / 255.0
  image = (image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return {"image": image, "label": batch["label"]}


def read_examples(source, config, indices: np.ndarray) -> Dict[str, np.ndarray]:
  """The examples `indices` of `source`, preprocessed as training batches are (on this process, unsharded)."""
  return _preprocess(_read_batch(source, indices), config.data_mean, config.data_std)


def num_steps(config, info: DatasetInfo) -> int:
  """Training steps: `config.num_steps` if positive, else `config.num_epochs` epochs (last partial batch dropped)."""
  if config.get("num_steps", 0) > 0:
    return int(config.num_steps)
  return int(config.num_epochs * (info.num_train // config.batch_size))


def train_batches(source, config, *, start_step: int = 0, total_steps: int) -> grain.MapDataset:
  """This process's shard of the global training batches `start_step, …, total_steps - 1`.

  Returns:
    A grain `MapDataset` (random access and iterable) of `{"image": f32[B/P, H, W, C], "label": i32[B/P]}`.
  """
  n, bs = len(source), config.batch_size
  if bs > n:
    raise ValueError(f"batch_size={bs} exceeds the {n} training examples")
  epochs = -(-total_steps * bs // n) + 1
  rows = _local_rows(bs)
  ds = (
    grain.MapDataset.range(n)
    .shuffle(seed=config.seed)
    .repeat(epochs)
    .batch(bs, drop_remainder=True)[start_step:total_steps]
  )
  return (
    ds.map(lambda idx: idx[rows])
    .map(lambda idx: _read_batch(source, idx))
    .map(lambda b: _preprocess(b, config.data_mean, config.data_std))
  )


def eval_batches(source, config) -> grain.MapDataset:
  """This process's shard of the test set (or its first `config.eval_examples`), in order.

  Global batches hold `config.eval_batch_size` examples.

  The last batch is padded with repeated examples; its `"mask"` (f32[B/P]) is 0 for the padding, so
  metrics are exact over the whole split.
  """
  n, bs = len(source), config.eval_batch_size
  if config.get("eval_examples", 0) > 0:  # a prefix of the split, for quick runs
    n = min(n, config.eval_examples)
  num_batches = -(-n // bs)
  rows = _local_rows(bs)

  def read(i):
    idx = np.arange(i * bs, (i + 1) * bs)[rows]
    mask = (idx < n).astype(np.float32)
    batch = _preprocess(
      _read_batch(source, np.minimum(idx, n - 1)), config.data_mean, config.data_std
    )
    return {**batch, "mask": mask}

  return grain.MapDataset.range(num_batches).map(read)


def prefetch(ds: grain.MapDataset, buffer_size: int = 2) -> Iterator[Dict[str, np.ndarray]]:
  """Iterates `ds` with a background thread pool reading `buffer_size` batches ahead (deterministic order)."""
  if buffer_size <= 0:
    return iter(ds)
  options = grain.ReadOptions(
    num_threads=min(buffer_size, os.cpu_count() or 1), prefetch_buffer_size=buffer_size
  )
  return iter(ds.to_iter_dataset(read_options=options))
