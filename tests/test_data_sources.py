"""Data sources: Fashion-MNIST IDX files, image folders, TFDS by name, and their error messages."""
import gzip
import os

import numpy as np
import pytest

from configs import default
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
