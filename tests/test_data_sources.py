"""Data sources: Fashion-MNIST IDX files, image folders, TFDS by name, and their error messages."""
import gzip
import os

import numpy as np
import pytest

from configs import default
from sove_jax import configuration
from sove_jax.data import pipeline, sources


def test_fashion_mnist_loads_with_the_right_counts_and_labels():
  for split, n in (("train", 60000), ("test", 10000)):
    src = sources.fashion_mnist(split)
    assert len(src) == n and src.images.shape == (n, 28, 28, 1) and src.images.dtype == np.uint8
    assert src.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(src.labels), [n // 10] * 10)  # balanced classes 0..9
    assert 0.2 < src.images.mean() / 255 < 0.4  # real pictures (mean ~0.29), not zeros or noise
  train, test = sources.fashion_mnist("train"), sources.fashion_mnist("test")
  assert (train.images[:10] != test.images[:10]).any()


def _write_idx(path, array, magic, compress):
  header = np.array([magic, *array.shape], ">i4").tobytes()
  with (gzip.open if compress else open)(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_from_a_given_directory(tmp_path):
  rng = np.random.default_rng(0)
  images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x803, compress=True)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, 0x801, compress=False)  # plain files too
  src = sources.fashion_mnist("test", str(tmp_path))
  np.testing.assert_array_equal(src.images[..., 0], images)
  np.testing.assert_array_equal(src.labels, labels)
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    sources.fashion_mnist("train", str(tmp_path))


def test_missing_or_empty_sources_name_what_was_looked_for(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    sources.fashion_mnist("train", str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="validation"):
    sources.fashion_mnist("validation")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
    sources.image_folder(str(tmp_path), "train")
  os.makedirs(tmp_path / "train" / "cat")
  (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
  with pytest.raises(ValueError, match=f"{tmp_path / 'train'}.*holds no"):
    sources.image_folder(str(tmp_path), "train")
  d = default.get_config().data
  d.source = "pictures"
  with pytest.raises(ValueError, match="pictures"):
    sources.open_source(d, "train")


def test_image_folder_labels_come_from_sorted_class_names(tmp_path):
  img = np.zeros((3, 8, 8, 3), np.uint8)
  sources.write_image_folder(str(tmp_path), "train", img, [1, 0, 1], class_names=["dog", "cat"])
  sources.write_image_folder(str(tmp_path), "val", img[:1], [0], class_names=["emu"],
                             image_format="jpeg")
  train = sources.image_folder(str(tmp_path), "train")
  assert train.class_names == ["cat", "dog", "emu"]  # the union over splits, sorted
  assert sorted(train.labels.tolist()) == [0, 0, 1] and len(train) == 3  # two "cat", one "dog"
  assert all(os.path.basename(os.path.dirname(p)) == train.class_names[l]
             for p, l in zip(train.paths, train.labels))
  assert sources.image_folder(str(tmp_path), "val").labels.tolist() == [2]


@pytest.mark.slow
def test_tfds_dataset_by_name_feeds_train_and_eval(tmp_path):
  import tensorflow_datasets as tfds
  d = default.get_config().data
  d.update(source="tfds", name="mnist", data_dir=str(tmp_path), global_size=16, local_size=8,
           num_local=2, eval_resize=16, eval_crop=16, shuffle_buffer=8)
  with tfds.testing.mock_data(num_examples=12):
    train = pipeline.train_input(d, patch_size=4, global_batch_size=4, seed=0, process_index=0,
                                 process_count=1)
    assert train.num_examples == 12 and train.steps_per_epoch == 3
    batches = [next(train) for _ in range(4)]  # into the second epoch
    b = batches[0]
    assert b["global"].shape == (4, 2, 16, 16, 3) and b["local"].shape == (4, 2, 8, 8, 3)
    assert b["mask"].shape == (4, 2, 16) and b["label"].dtype == np.int32
    assert train.get_state() == {"epoch": 1, "position": 4, "process_count": 1}
    ev = pipeline.eval_input(d, split="test", global_batch_size=5, process_index=0, process_count=1)
    out = list(ev)
    assert ev.num_examples == 12 and len(out) == 3
    assert sum(x["valid"].sum() for x in out) == 12 and out[0]["image"].shape == (5, 16, 16, 3)


def test_unknown_or_unprepared_tfds_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_dataset_xyz'"):
    sources.TfdsSource("no_such_dataset_xyz", "train")
  with pytest.raises(FileNotFoundError, match=f"'mnist' is not prepared in data_dir='{tmp_path}'"):
    sources.TfdsSource("mnist", "train", data_dir=str(tmp_path))


def test_sources_read_data_dirs_on_a_non_local_filesystem():
  """data_dir may be a bucket URL (gs://...): sources list and read through tf.io.gfile, never
  os.path or open. TensorFlow's in-memory filesystem (ram://) stands in for the bucket here:
  a path that only os.path would accept fails, so this fails if any local-only call remains."""
  import tensorflow as tf
  root = "ram://sove_jax_test_sources"
  rng = np.random.default_rng(1)
  images, labels = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6)
  for name, array, magic in (("t10k-images-idx3-ubyte.gz", images, 0x803),
                             ("t10k-labels-idx1-ubyte.gz", labels, 0x801)):
    header = np.array([magic, *array.shape], ">i4").tobytes()
    tf.io.gfile.makedirs(f"{root}/fmnist")
    with tf.io.gfile.GFile(f"{root}/fmnist/{name}", "wb") as f:
      f.write(gzip.compress(header + array.astype(np.uint8).tobytes()))
  src = sources.fashion_mnist("test", f"{root}/fmnist")
  np.testing.assert_array_equal(src.images[..., 0], images)
  np.testing.assert_array_equal(src.labels, labels)

  pictures = rng.integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
  written = sources.write_image_folder(f"{root}/folder", "train", pictures, [1, 0, 1],
                                       class_names=["dog", "cat"])
  assert all(p.startswith(f"{root}/folder/train/") for p in written)
  train = sources.image_folder(f"{root}/folder", "train")
  assert train.class_names == ["cat", "dog"] and sorted(train.labels.tolist()) == [0, 0, 1]
  assert all(p.startswith(root) for p in train.paths)
  d = default.get_config().data
  d.update(source="folder", data_dir=f"{root}/folder", eval_resize=8, eval_crop=8)
  batch = next(iter(pipeline.eval_input(d, split="train", global_batch_size=3, process_index=0,
                                        process_count=1)))  # the pipeline reads the files
  assert batch["image"].shape == (3, 8, 8, 3) and batch["valid"].sum() == 3
  with pytest.raises(FileNotFoundError, match=f"{root}/folder/val"):
    sources.image_folder(f"{root}/folder", "val")


# --- splits carved from "train": minival and train-minival ---------------------------------------

def _carved_config(**overrides):
  d = default.get_config().data
  d.update(**overrides)
  return d


def test_minival_is_a_class_balanced_seeded_part_of_train_and_train_minival_the_rest():
  """Fashion-MNIST: 1,000 examples of each class held out by the seed, 50,000 left."""
  train = sources.fashion_mnist("train")
  minival, rest = sources.carve(train.labels, 10_000, seed=0)
  assert len(minival) == 10_000 and len(rest) == 50_000
  assert not set(minival) & set(rest)
  np.testing.assert_array_equal(np.sort(np.concatenate([minival, rest])), np.arange(60_000))
  np.testing.assert_array_equal(np.bincount(train.labels[minival]), [1000] * 10)
  np.testing.assert_array_equal(np.bincount(train.labels[rest]), [5000] * 10)
  again, _ = sources.carve(train.labels, 10_000, seed=0)
  other, _ = sources.carve(train.labels, 10_000, seed=1)
  np.testing.assert_array_equal(again, minival)
  assert len(set(other) & set(minival)) < 3_000  # another draw: about 1/6 in common
  d = _carved_config()
  held, kept = sources.open_source(d, "minival"), sources.open_source(d, "train-minival")
  assert len(held) == 10_000 and len(kept) == 50_000
  np.testing.assert_array_equal(held.images, train.images[minival])  # in split order
  np.testing.assert_array_equal(kept.labels, train.labels[rest])
  d.minival_seed = 1
  np.testing.assert_array_equal(sources.open_source(d, "minival").labels, train.labels[other])


def test_an_image_folder_carves_by_file_and_class(tmp_path):
  images = np.zeros((15, 8, 8, 3), np.uint8)
  labels = [0] * 4 + [1] * 5 + [2] * 6
  sources.write_image_folder(str(tmp_path), "train", images, labels,
                             class_names=["ant", "bee", "cow"])
  d = _carved_config(source="folder", data_dir=str(tmp_path), minival_examples=6)
  train = sources.image_folder(str(tmp_path), "train")
  held, kept = sources.open_source(d, "minival"), sources.open_source(d, "train-minival")
  assert not set(held.paths) & set(kept.paths)
  assert sorted(set(held.paths) | set(kept.paths)) == sorted(train.paths)
  np.testing.assert_array_equal(np.bincount(held.labels), [2, 2, 2])
  assert held.class_names == kept.class_names == ["ant", "bee", "cow"]
  assert list(sources.open_source(d, "minival").paths) == list(held.paths)  # the same seed
  d.minival_seed = 5
  assert list(sources.open_source(d, "minival").paths) != list(held.paths)
  for examples, message in ((7, "multiple of the 3 classes"),
                            (12, "takes 4 examples of each class, but a class .* has only 4"),
                            (15, "must be fewer than the 15 examples")):
    d.minival_examples = examples
    with pytest.raises(configuration.ConfigError, match=message):
      sources.open_source(d, "train-minival")


@pytest.mark.parametrize("overrides,message", [
    (dict(minival_examples=0), "data.minival_examples=0 must be >= 1"),
    (dict(minival_seed=-1), "data.minival_seed=-1 >= 0"),
    (dict(minival_examples=60_000), "must be fewer than the 60000 examples of Fashion-MNIST"),
    (dict(minival_examples=10_005), "multiple of the 10 classes of Fashion-MNIST"),
])
def test_minival_checks_reject_what_cannot_be_carved(overrides, message):
  with pytest.raises(configuration.ConfigError, match=message):
    configuration.validate_data(_carved_config(**overrides), patch_size=7, global_batch_size=8)


def test_the_train_and_eval_inputs_read_the_carved_splits():
  d = _carved_config(train_split="train-minival", eval_split="minival")
  train = pipeline.train_input(d, patch_size=7, global_batch_size=64, seed=0, process_index=0,
                               process_count=1)
  assert train.num_examples == 50_000 and train.steps_per_epoch == 50_000 // 64
  everything = sources.fashion_mnist("train")
  minival, rest = sources.carve(everything.labels, 10_000, seed=0)
  np.testing.assert_array_equal(train.source.images, everything.images[rest])
  assert next(train)["global"].shape == (64, 2, 28, 28, 3)
  ev = pipeline.eval_input(d, split=d.eval_split, global_batch_size=256, process_index=0,
                           process_count=1, max_examples=1000)
  labels = np.concatenate([b["label"][b["valid"]] for b in ev])
  np.testing.assert_array_equal(labels, everything.labels[minival[:1000]])
