"""The synthetic ImageNet-shaped JPEG set (sove_jax/data/synthetic.py): deterministic by seed,
ImageNet's size mix and bytes, textured pictures, and the same JPEGs as an image folder and as a
TFDS dataset in TFRecord and in ArrayRecord files, each readable by its data.source."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import default
from sove_jax.data import pipeline, sources, synthetic


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  return synthetic.write(root, images=36, classes=3, test_images=6, seed=7, progress=None)


def _folder_bytes(folder, split):
  src = sources.image_folder(folder, split)
  return {tf.io.read_file(p).numpy(): int(l) for p, l in zip(src.paths, src.labels)}


def test_the_same_seed_writes_the_same_jpegs_and_another_seed_others(tmp_path, written):
  again = synthetic.write_folder(str(tmp_path / "again"), {"train": 36}, classes=3, seed=7,
                                 progress=None)
  other = synthetic.write_folder(str(tmp_path / "other"), {"train": 4}, classes=3, seed=8,
                                 progress=None)
  first = sources.image_folder(written["folder"], "train")
  assert sorted(p.split("/train/")[1] for p in again["train"]) == sorted(
      p.split("/train/")[1] for p in first.paths)
  for path in again["train"]:
    mine = path.split("/train/")[1]
    assert tf.io.read_file(path).numpy() == tf.io.read_file(
        f"{written['folder']}/train/{mine}").numpy()
  assert tf.io.read_file(other["train"][0]).numpy() != tf.io.read_file(again["train"][0]).numpy()


def test_sizes_bytes_and_texture_are_imagenet_like():
  """Sizes drawn from the mix, about ImageNet's bytes per image at quality 90, and pictures
  with detail at every scale (not flat color): 200 images of one seed, without the disk."""
  bank, colors = synthetic.texture_bank(0), synthetic.class_colors(0, 10)
  shapes, nbytes, gray, detail = [], [], 0, []
  for i in range(200):
    label, data = synthetic.jpeg(0, "train", i, 10, bank, colors)
    assert label == i % 10
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "JPEG"
    gray += picture.mode == "L"
    shapes.append(picture.size[::-1])
    nbytes.append(len(data))
    if i < 40:
      x = np.asarray(picture.convert("L"), np.float32)
      detail.append(np.abs(np.diff(x, axis=1)).mean())  # neighbor differences: grain, edges
  shapes = np.array(shapes)
  typical = np.isin(shapes.max(1), [500]) & np.isin(shapes.min(1), [333, 375, 400, 500])
  assert 0.6 < typical.mean() < 0.85  # most are ImageNet's 500 px
  assert (shapes.max(1) >= 1024).sum() >= 3 and (shapes.max(1) <= 200).sum() >= 3
  assert 0 < gray < 20
  at_500x375 = [b for b, s in zip(nbytes, shapes) if tuple(sorted(s)) == (375, 500)]
  assert 70e3 < np.median(at_500x375) < 160e3, np.median(at_500x375)
  assert 80e3 < np.mean(nbytes) < 160e3, np.mean(nbytes)
  assert min(detail) > 3.0, detail


def test_folder_and_tfds_hold_the_same_jpegs_and_read_through_the_sources(written):
  """The folder's files are the TFDS records' bytes, in both file formats; data.source
  "folder" and "tfds" (TFRecord) train and evaluate on them."""
  import tensorflow_datasets as tfds
  for split, count in (("train", 36), ("test", 6)):
    folder = _folder_bytes(written["folder"], split)
    assert len(folder) == count and sorted(set(folder.values())) == [0, 1, 2]
    ds = tfds.builder(synthetic.NAME, data_dir=written["tfrecord"]).as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()})
    assert {ex["image"]: int(ex["label"]) for ex in tfds.as_numpy(ds)} == folder
    array_record = tfds.data_source(synthetic.NAME, split=split, data_dir=written["array_record"],
                                    decoders={"image": tfds.decode.SkipDecoding()})
    assert {array_record[i]["image"]: int(array_record[i]["label"])
            for i in range(len(array_record))} == folder
  d = default.get_config().data
  d.update(global_size=28, canvas_size=64, augment="device", eval_resize=32, eval_crop=28)
  for source, data_dir, name in (("folder", written["folder"], ""),
                                 ("tfds", written["tfrecord"], synthetic.NAME)):
    d.update(source=source, data_dir=data_dir, name=name)
    train = pipeline.train_input(d, patch_size=7, global_batch_size=6, seed=0, process_index=0,
                                 process_count=1)
    assert train.steps_per_epoch == 6
    batch = next(train)
    assert batch["canvas"].shape == (6, 64, 64, 3) and (batch["size"] == 64).any()
    ev = pipeline.eval_input(d, split="test", global_batch_size=4, process_index=0,
                             process_count=1)
    assert sum(int(b["valid"].sum()) for b in ev) == 6


def test_the_folder_writes_to_a_bucket_path():
  """Paths go through tf.io.gfile: TensorFlow's in-memory filesystem stands in for gs://."""
  root = "ram://sove_jax_test_synthetic"
  written = synthetic.write_folder(f"{root}/folder", {"train": 3}, classes=3, seed=1,
                                   progress=None)
  assert all(p.startswith(f"{root}/folder/train/class_00") for p in written["train"])
  src = sources.image_folder(f"{root}/folder", "train")
  assert len(src) == 3 and src.class_names == ["class_000", "class_001", "class_002"]
