"""experiments.tfds_builders and experiments.input_pipeline: real files in ../shared/data, errors, batching."""

import gzip
import os
import struct

import jax
import numpy as np
import pytest

from experiments import input_pipeline
from experiments import tfds_builders
from experiments.configs import default
from experiments_fixtures import SHARED_DATA

needs_shared_data = pytest.mark.skipif(
  not os.path.isdir(SHARED_DATA), reason=f"{SHARED_DATA} (../shared/data beside the repo) is absent"
)

MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
EXPECTED = {  # dataset: (image shape, train count, test count, train per class, test per class)
  "mnist": ((28, 28, 1), 60_000, 10_000, MNIST_TRAIN, MNIST_TEST),
  "fashion_mnist": ((28, 28, 1), 60_000, 10_000, [6000] * 10, [1000] * 10),
  "cifar10": ((32, 32, 3), 50_000, 10_000, [5000] * 10, [1000] * 10),
}


def _labels(source) -> np.ndarray:
  return np.asarray([r["label"] for r in source.__getitems__(list(range(len(source))))])


@needs_shared_data
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_reads_shared_data(name, data_cache):
  shape, n_train, n_test, train_counts, test_counts = EXPECTED[name]
  builder = tfds_builders.prepare(
    name, source_dir=os.path.join(SHARED_DATA, name), cache_dir=data_cache
  )
  train, test = builder.as_data_source(split="train"), builder.as_data_source(split="test")
  assert (len(train), len(test)) == (n_train, n_test)
  example = train[0]
  assert example["image"].shape == shape and example["image"].dtype == np.uint8
  assert isinstance(example["label"], (int, np.integer))
  assert np.bincount(_labels(train), minlength=10).tolist() == train_counts
  assert np.bincount(_labels(test), minlength=10).tolist() == test_counts


@needs_shared_data
def test_mnist_pixels_match_the_idx_file(data_cache):
  images, labels = tfds_builders.read_idx_split(os.path.join(SHARED_DATA, "mnist"), "t10k", 10_000)
  test = tfds_builders.prepare(
    "mnist", source_dir=os.path.join(SHARED_DATA, "mnist"), cache_dir=data_cache
  ).as_data_source(split="test")
  # tfds stores examples in its own order; compare as multisets via a per-image checksum.
  ours = sorted(
    (int(r["label"]), r["image"].tobytes()) for r in test.__getitems__(list(range(len(test))))
  )
  ref = sorted((int(label), im.tobytes()) for im, label in zip(images, labels))
  assert ours == ref


def test_digits_builder(data_cache):
  builder = tfds_builders.prepare("digits", cache_dir=data_cache)
  train, test = builder.as_data_source(split="train"), builder.as_data_source(split="test")
  assert (len(train), len(test)) == (1437, 360)
  assert train[0]["image"].shape == (8, 8, 1) and train[0]["image"].dtype == np.uint8
  assert np.bincount(_labels(test), minlength=10).min() >= 35  # stratified


# ---------------------------------------------------------------------------------------------------------
# Malformed or missing files: errors name the file and what was expected; nothing is written.


def _write_idx(path, array, magic_ndim=None, truncate=0):
  header = struct.pack(">HBB", 0, 8, magic_ndim or array.ndim) + struct.pack(
    f">{array.ndim}I", *array.shape
  )
  data = header + array.astype(np.uint8).tobytes()
  with gzip.open(path, "wb") as f:
    f.write(data[: len(data) - truncate])


def _fake_mnist(directory, n_train=60_000, n_test=10_000):
  os.makedirs(directory, exist_ok=True)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    _write_idx(
      os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), np.zeros((n, 28, 28), np.uint8)
    )
    _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), np.arange(n) % 10)


def test_idx_reader_errors(tmp_path):
  path = str(tmp_path / "x-images-idx3-ubyte.gz")
  with pytest.raises(FileNotFoundError, match="x-images-idx3-ubyte.gz: missing; expected a gzip"):
    tfds_builders.read_idx(path, expected_ndim=3)
  _write_idx(path, np.zeros((5, 28, 28)), truncate=10)
  with pytest.raises(
    tfds_builders.DataFormatError, match=r"x-images-idx3-ubyte.gz: the IDX header declares"
  ):
    tfds_builders.read_idx(path, expected_ndim=3)
  _write_idx(path, np.zeros((5, 28, 28)), magic_ndim=1)
  with pytest.raises(tfds_builders.DataFormatError, match="expected IDX magic"):
    tfds_builders.read_idx(path, expected_ndim=3)
  _write_idx(path, np.zeros((5, 28, 28)))
  with pytest.raises(tfds_builders.DataFormatError, match=r"expected shape \(6, 28, 28\)"):
    tfds_builders.read_idx(path, expected_ndim=3, expected_shape=(6, 28, 28))
  with open(path, "wb") as f:
    f.write(b"not gzip at all")
  with pytest.raises(tfds_builders.DataFormatError, match="could not decompress"):
    tfds_builders.read_idx(path, expected_ndim=3)


def test_cifar_reader_errors(tmp_path):
  path = str(tmp_path / "data_batch_1.bin")
  with pytest.raises(FileNotFoundError, match="data_batch_1.bin: missing"):
    tfds_builders.read_cifar10_bin(path, 4)
  record = np.zeros((4, 3073), np.uint8)
  record[:, 0] = [0, 1, 2, 3]
  record[:3].tofile(path)
  with pytest.raises(
    tfds_builders.DataFormatError, match=r"data_batch_1.bin: expected 4 records of 3073 bytes"
  ):
    tfds_builders.read_cifar10_bin(path, 4)
  record[2, 0] = 12
  record.tofile(path)
  with pytest.raises(tfds_builders.DataFormatError, match="record 2 has label 12"):
    tfds_builders.read_cifar10_bin(path, 4)
  record[2, 0] = 2
  record[1, 1 + 1024 + 5] = 7  # G channel, row 0, column 5
  record.tofile(path)
  images, labels = tfds_builders.read_cifar10_bin(path, 4)
  assert (
    images.shape == (4, 32, 32, 3) and labels.tolist() == [0, 1, 2, 3] and images[1, 0, 5, 1] == 7
  )


def test_malformed_file_prepares_nothing(tmp_path):
  source = str(tmp_path / "mnist")
  _fake_mnist(source, n_test=9_999)  # test split one example short
  cache = str(tmp_path / "cache")
  with pytest.raises(
    tfds_builders.DataFormatError, match=r"t10k-images-idx3-ubyte.gz: expected shape \(10000"
  ):
    tfds_builders.prepare("mnist", source_dir=source, cache_dir=cache)
  assert not os.path.exists(os.path.join(cache, "normjax_mnist", "1.1.0", "dataset_info.json"))
  os.remove(os.path.join(source, "train-labels-idx1-ubyte.gz"))
  with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte.gz: missing"):
    tfds_builders.prepare("mnist", source_dir=source, cache_dir=cache)
  with pytest.raises(
    FileNotFoundError, match="expected the directory of the original cifar10 files"
  ):
    tfds_builders.prepare("cifar10", source_dir=str(tmp_path / "nowhere"), cache_dir=cache)


# ---------------------------------------------------------------------------------------------------------
# Batching: deterministic, resumable by step, per-process shards of the same global batches.


def _config(data_cache, **overrides):
  c = default.get_config()
  c.cache_dir = data_cache
  c.update(overrides)
  return c


def test_batches_are_deterministic_and_resumable(data_cache):
  config = _config(data_cache, batch_size=100)
  train, _, info = input_pipeline.get_datasets(config)
  assert info.image_shape == (8, 8, 1) and info.num_classes == 10
  full = list(input_pipeline.train_batches(train, config, total_steps=30))
  again = list(input_pipeline.prefetch(input_pipeline.train_batches(train, config, total_steps=30)))
  resumed = list(input_pipeline.train_batches(train, config, start_step=17, total_steps=30))
  assert (
    len(full) == 30
    and full[0]["image"].shape == (100, 8, 8, 1)
    and full[0]["image"].dtype == np.float32
  )
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  for a, b in zip(full[17:], resumed):
    np.testing.assert_array_equal(a["label"], b["label"])
  other_seed = next(
    iter(
      input_pipeline.train_batches(
        train, _config(data_cache, batch_size=100, seed=1), total_steps=1
      )
    )
  )
  assert not np.array_equal(other_seed["label"], full[0]["label"])
  # Each epoch (14 batches of 100 from 1437) is a fresh permutation without repeats.
  epoch = np.concatenate([b["image"].reshape(100, -1) for b in full[:14]])
  assert len(np.unique(epoch, axis=0)) > 1300


def test_process_shards_concatenate_to_the_global_batch(data_cache, monkeypatch):
  config = _config(data_cache, batch_size=64, eval_batch_size=128)
  train, test, _ = input_pipeline.get_datasets(config)
  whole = input_pipeline.train_batches(train, config, total_steps=3)[2]
  whole_eval = list(input_pipeline.eval_batches(test, config))
  shards, eval_shards = [], []
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  for p in range(4):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    shards.append(input_pipeline.train_batches(train, config, total_steps=3)[2])
    eval_shards.append(list(input_pipeline.eval_batches(test, config)))
  np.testing.assert_array_equal(np.concatenate([s["image"] for s in shards]), whole["image"])
  assert len(whole_eval) == 3 and sum(b["mask"].sum() for b in whole_eval) == 360
  for i, b in enumerate(whole_eval):
    np.testing.assert_array_equal(np.concatenate([s[i]["label"] for s in eval_shards]), b["label"])
