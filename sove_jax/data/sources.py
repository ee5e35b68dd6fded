"""Where images come from: Fashion-MNIST IDX files, an image folder, or any TFDS dataset.

Three kinds of source, by how they can be read:
- `ArraySource`: decoded images of one size, held in memory (Fashion-MNIST: 47 MB). Read by index.
- `FileSource`: encoded JPEG/PNG files listed once (an image folder). Read by index.
- `TfdsSource`: a prepared TFDS split, read as a stream of encoded records (ImageNet is TFRecord
  files, which cannot be read by index).
Reading by index lets the pipeline shuffle a whole epoch exactly and resume by skipping indices;
the stream is shuffled at file level plus a buffer and resumes by skipping undecoded records.

ImageNet for TFDS is prepared once from the manual download (ILSVRC2012_img_{train,val}.tar in
MANUAL_DIR):  tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR
On TPU hosts DATA_DIR may be a gs:// bucket.
"""
from __future__ import annotations

import functools
import gzip

import numpy as np
import tensorflow as tf

from sove_jax import paths

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class ArraySource:
  """Decoded images of one size in host memory: uint8 [N, H, W, C] (C = 1 or 3), int32 labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "arrays"):
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
      raise ValueError(f"{name}: images must be uint8 [N, H, W, 1|3], got {images.dtype} "
                       f"{images.shape}")
    if len(labels) != len(images):
      raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
      raise ValueError(f"{name}: the dataset is empty")
    self.images = images
    self.labels = np.asarray(labels, np.int32)
    self.name = name

  def __len__(self) -> int:
    return len(self.images)

  def describe(self, index: int) -> str:
    return f"{self.name}[{index}]"


class FileSource:
  """Encoded image files (JPEG/PNG) with integer labels; decoded in the pipeline."""

  def __init__(self, paths: list[str], labels: list[int], class_names: list[str], name: str):
    self.paths = np.asarray(paths, dtype=object)
    self.labels = np.asarray(labels, np.int32)
    self.class_names = list(class_names)
    self.name = name

  def __len__(self) -> int:
    return len(self.paths)

  def describe(self, index: int) -> str:
    return str(self.paths[index])


class TfdsSource:
  """A prepared TFDS split read as a stream of (encoded image, label) records."""

  def __init__(self, name: str, split: str, data_dir: str = "", image_key: str = "image",
               label_key: str = "label"):
    import tensorflow_datasets as tfds  # slow to import; only this source needs it

    self._tfds = tfds
    where = f"data_dir={data_dir!r}" if data_dir else "the default TFDS data_dir"
    try:
      self.builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.DatasetNotFoundError:
      raise ValueError(f"Unknown TFDS dataset {name!r} (looked for it in the TFDS registry, "
                       f"{where}).") from None
    features = self.builder.info.features
    if image_key not in features:
      raise ValueError(f"TFDS dataset {name!r} has no image feature {image_key!r} (features: "
                       f"{sorted(features)}); set data.image_key.")
    if label_key and label_key not in features:
      raise ValueError(f"TFDS dataset {name!r} has no label feature {label_key!r} (features: "
                       f"{sorted(features)}); set data.label_key, or '' for no labels.")
    self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
    self._where = where
    self._num_examples = self._count(split)
    if self._num_examples == 0:
      raise ValueError(f"TFDS dataset {name!r} split {split!r} ({where}) is empty.")

  def _count(self, split: str) -> int:
    try:
      return self.builder.info.splits[split].num_examples
    except (KeyError, ValueError):
      pass  # not generated yet, or mocked in tests: ask the reader, which says which it is
    try:
      n = int(self._as_dataset(split, shuffle_seed=None).cardinality())
    except AssertionError:  # TFDS's "could not find data in ..."
      raise FileNotFoundError(
          f"TFDS dataset {self.name!r} is not prepared in {self._where} (looked in "
          f"{self.builder.data_dir}); prepare it once with `tfds build {self.name} "
          f"--data_dir=...` (ImageNet: add --manual_dir=...).") from None
    except (KeyError, ValueError) as e:
      raise ValueError(f"TFDS dataset {self.name!r} has no split {split!r} in {self._where} "
                       f"({e}).") from None
    if n < 0:
      raise ValueError(f"TFDS dataset {self.name!r} split {split!r}: unknown size.")
    return n

  def __len__(self) -> int:
    return self._num_examples

  def describe(self, index: int) -> str:
    return f"{self.name}/{self.split} record {index}"

  def _as_dataset(self, split, shuffle_seed):
    tfds = self._tfds
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False,
                                  try_autocache=False)
    return self.builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                                   decoders={self.image_key: tfds.decode.SkipDecoding()},
                                   read_config=read_config)

  def host_records(self, process_index: int, process_count: int, *, drop_remainder: bool,
                   shuffle_seed: int | None = None, shuffle_buffer: int = 0,
                   max_examples: int = -1) -> tf.data.Dataset:
    """This process's contiguous share of the split as (encoded image, int32 label) records.

    `drop_remainder` gives every process N // P records (training keeps the processes in
    step); without it the shares differ by at most one and cover the split (evaluation).
    With a seed, file order and a buffer of records are shuffled, deterministically.
    """
    split = self.split
    if max_examples >= 0:
      if "[" in split:
        raise ValueError(f"max_examples needs a plain split name, got {split!r}")
      split = f"{split}[:{max_examples}]"
    shares = self._tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)
    host_split = shares[process_index]
    ds = self._as_dataset(host_split, shuffle_seed)
    image_key, label_key = self.image_key, self.label_key

    def record(ex):
      label = tf.cast(ex[label_key], tf.int32) if label_key else tf.constant(-1, tf.int32)
      return ex[image_key], label

    ds = ds.map(tf.autograph.experimental.do_not_convert(record))
    if shuffle_seed is not None and shuffle_buffer > 1:
      ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return ds


# --- Fashion-MNIST from IDX files -----------------------------------------------------------------

def _read_idx(path_stem: str, magic: int) -> np.ndarray:
  """One IDX array from `stem` or `stem.gz`: big-endian header (magic, dims), then uint8 data."""
  for path in (path_stem + ".gz", path_stem):
    if tf.io.gfile.exists(path):
      break
  else:
    raise FileNotFoundError(f"Fashion-MNIST file not found: looked for {path_stem}.gz and "
                            f"{path_stem}")
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  if path.endswith(".gz"):
    data = gzip.decompress(data)
  header = np.frombuffer(data, ">i4", count=1)[0]
  if header != magic:
    raise ValueError(f"{path}: not an IDX uint8 file of rank {magic & 0xFF} (magic {header:#x})")
  ndim = magic & 0xFF
  shape = tuple(int(s) for s in np.frombuffer(data, ">i4", count=ndim, offset=4))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says {shape}, file holds {array.size} values")
  return array.reshape(shape)


@functools.lru_cache(maxsize=4)
def _fashion_mnist_arrays(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Read once per process: the trainer opens the train split for training and for k-NN."""
  if not tf.io.gfile.isdir(directory):
    raise FileNotFoundError(f"Fashion-MNIST directory not found: {directory} (install the Debian "
                            "package dataset-fashion-mnist, or set data.data_dir)")
  stem = paths.join(directory, _IDX_PREFIX[split])
  images = _read_idx(stem + "-images-idx3-ubyte", 0x803)
  labels = _read_idx(stem + "-labels-idx1-ubyte", 0x801)
  if len(images) != len(labels):
    raise ValueError(f"Fashion-MNIST {split} in {directory}: {len(images)} images, "
                     f"{len(labels)} labels")
  images.flags.writeable = False
  return images, labels.astype(np.int32)


def fashion_mnist(split: str, data_dir: str = "") -> ArraySource:
  """Fashion-MNIST `train` (60000) or `test` (10000): uint8 [N, 28, 28, 1], labels 0..9."""
  if split not in _IDX_PREFIX:
    raise ValueError(f"Fashion-MNIST has splits {sorted(_IDX_PREFIX)}, not {split!r}")
  directory = data_dir or FASHION_MNIST_DIR
  images, labels = _fashion_mnist_arrays(paths.absolute(directory), split)
  if len(images) == 0:
    raise ValueError(f"Fashion-MNIST {split} in {directory} is empty")
  return ArraySource(images, labels, name=f"fashion_mnist/{split}")


# --- image folders --------------------------------------------------------------------------------

# Folders are listed through tf.io.gfile, so a data_dir may be local or in a bucket (gs://...).

def _subdirs(path: str) -> list[str]:
  names = [n.rstrip("/") for n in tf.io.gfile.listdir(path)]
  return sorted(n for n in names
                if not n.startswith(".") and tf.io.gfile.isdir(paths.join(path, n)))


def image_folder(root: str, split: str) -> FileSource:
  """Files root/<split>/<class>/*.{jpg,jpeg,png}; labels index the sorted class names.

  Class names are the union over every split folder under `root`, so a class missing from one
  split does not shift the labels of the others. Files are only listed here; one that does not
  decode is skipped (and counted) by the pipeline.
  """
  split_dir = paths.join(root, split)
  if not tf.io.gfile.isdir(split_dir):
    raise FileNotFoundError(f"Image folder not found: {split_dir} "
                            f"(expected {root}/{split}/<class>/*.jpg)")
  classes = sorted({c for s in _subdirs(root) for c in _subdirs(paths.join(root, s))})
  label_of = {c: i for i, c in enumerate(classes)}
  files, labels = [], []
  for c in sorted(_subdirs(split_dir)):
    class_dir = paths.join(split_dir, c)
    names = sorted(n for n in tf.io.gfile.listdir(class_dir)
                   if not n.endswith("/") and n.lower().endswith(IMAGE_EXTENSIONS))
    files += [paths.join(class_dir, n) for n in names]
    labels += [label_of[c]] * len(names)
  if not files:
    raise ValueError(f"Image folder {split_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} files in "
                     "class subfolders")
  return FileSource(files, labels, classes, name=split_dir)


def write_image_folder(root: str, split: str, images, labels, class_names=None,
                       image_format: str = "png", quality: int = 95) -> list[str]:
  """Writes uint8 HxWxC images as root/split/<class>/<n>.<ext>; the inverse of `image_folder`.

  For exporting a dataset to the folder layout, and for the tests and benchmark, which need real
  encoded files. Files already in a class folder are kept: new ones get the next free numbers.
  """
  if image_format not in ("png", "jpeg"):
    raise ValueError(f"image_format must be 'png' or 'jpeg', not {image_format!r}")
  ext = "png" if image_format == "png" else "jpg"
  files = []
  for image, label in zip(images, labels):
    name = class_names[label] if class_names is not None else f"{int(label):04d}"
    folder = paths.join(root, split, name)
    tf.io.gfile.makedirs(folder)
    n = len(tf.io.gfile.listdir(folder))
    while tf.io.gfile.exists(paths.join(folder, f"{n:06d}.{ext}")):
      n += 1
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if image_format == "png":
      data = tf.io.encode_png(image)
    else:
      data = tf.io.encode_jpeg(image, quality=quality)
    path = paths.join(folder, f"{n:06d}.{ext}")
    tf.io.write_file(path, data)
    files.append(path)
  return files


# --- by config ------------------------------------------------------------------------------------

def open_source(data_config, split: str):
  """The source named by the `data` config block, for one split."""
  kind = data_config.source
  if kind == "fashion_mnist":
    return fashion_mnist(split, data_config.data_dir)
  if kind == "folder":
    if not data_config.data_dir:
      raise ValueError("data.source='folder' needs data.data_dir (the folder with "
                       "<split>/<class>/ inside)")
    return image_folder(data_config.data_dir, split)
  if kind == "tfds":
    return TfdsSource(data_config.name, split, data_config.data_dir, data_config.image_key,
                      data_config.label_key)
  raise ValueError(f"Unknown data.source {kind!r}; expected 'fashion_mnist', 'folder' or 'tfds'.")
