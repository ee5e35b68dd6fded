"""Where images come from: Fashion-MNIST IDX files, an image folder, or any TFDS dataset.

Kinds of source, by how they can be read:
- `ArraySource`: decoded images of one size, held in memory (Fashion-MNIST: 47 MB). Read by index.
- `FileSource`: encoded JPEG/PNG files listed once (an image folder). Read by index.
- `EncodedSource`: encoded images held in memory (a TFDS subset read once). Read by index.
- `TfdsSource`: a prepared TFDS split in TFRecord files, read as a stream of encoded records
  (TFRecord files cannot be read by index).
- `indexed.ArrayRecordSource`: a prepared TFDS split in ArrayRecord files, read by index inside
  tf.data. `open_source` picks it for data.source="tfds" when the dataset was prepared with
  `--file_format=array_record`.
Reading by index lets the pipeline shuffle a whole epoch exactly and resume where it stopped
without reading what came before; the stream is shuffled at file level plus a buffer and resumes
by skipping records, so a restart late in an epoch reads that epoch again up to there.

ImageNet for TFDS is prepared once from the manual download (ILSVRC2012_img_{train,val}.tar in
MANUAL_DIR):  tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR
On TPU hosts DATA_DIR may be a gs:// bucket.

Every source also has two splits carved from its "train" split (`carve`, docs/input.md):
"minival", `data.minival_examples` examples held out for choosing settings, and "train-minival",
the rest. A source read by index carves them by index, class-balanced, chosen by
`data.minival_seed`; a TFDS split is carved by TFDS slicing: a block of consecutive records at an
offset drawn from the seed (TFDS writes a split's records shuffled, so the block is a random
sample, but not class-balanced).
"""
from __future__ import annotations

import functools
import gzip

import numpy as np
import tensorflow as tf

from sove_jax import configuration, paths
from sove_jax.data import indexed

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class ArraySource:
  """Decoded images of one size in host memory: uint8 [N, H, W, C] (C = 1 or 3), int32 labels."""

  by_index = True

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

  by_index = True

  def __init__(self, paths: list[str], labels: list[int], class_names: list[str], name: str):
    self.paths = np.asarray(paths, dtype=object)
    self.labels = np.asarray(labels, np.int32)
    self.class_names = list(class_names)
    self.name = name

  def __len__(self) -> int:
    return len(self.paths)

  def describe(self, index: int) -> str:
    return str(self.paths[index])


class EncodedSource:
  """Encoded images (JPEG/PNG bytes) with integer labels held in host memory; read by index
  (a TFDS subset read once: `labeled.subset`)."""

  by_index = True

  def __init__(self, encoded: list[bytes], labels, name: str):
    if len(encoded) != len(labels):
      raise ValueError(f"{name}: {len(encoded)} images but {len(labels)} labels")
    if not encoded:
      raise ValueError(f"{name}: the subset is empty")
    self.encoded = np.asarray(encoded, dtype=object)
    self.labels = np.asarray(labels, np.int32)
    self.name = name

  def __len__(self) -> int:
    return len(self.encoded)

  def describe(self, index: int) -> str:
    return f"{self.name}[{index}]"


class TfdsSource:
  """A prepared TFDS split read as a stream of (encoded image, label) records.

  `ranges`: read only these [start, stop) record ranges of the split, in this order (how a split
  is carved: `carve`); None reads it whole.
  """

  by_index = False

  def __init__(self, name: str, split: str, data_dir: str = "", image_key: str = "image",
               label_key: str = "label", ranges: list[tuple[int, int]] | None = None,
               label: str = ""):
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
    self.split, self.image_key, self.label_key = split, image_key, label_key
    self.name = f"{name}/{label or split}"
    self._dataset, self._where = name, where
    self.split_size = self._count(split)
    if self.split_size == 0:
      raise ValueError(f"TFDS dataset {name!r} split {split!r} ({where}) is empty.")
    self.ranges = [(0, self.split_size)] if ranges is None else [(int(a), int(b))
                                                                 for a, b in ranges]
    if any(not 0 <= a <= b <= self.split_size for a, b in self.ranges):
      raise ValueError(f"Record ranges {self.ranges} do not lie within the {self.split_size} "
                       f"records of {name!r} split {split!r}.")
    self._num_examples = sum(b - a for a, b in self.ranges)

  def _count(self, split: str) -> int:
    try:
      return self.builder.info.splits[split].num_examples
    except (KeyError, ValueError):
      pass  # not generated yet, or mocked in tests: ask the reader, which says which it is
    try:
      n = int(self._as_dataset(split, shuffle_seed=None).cardinality())
    except AssertionError:  # TFDS's "could not find data in ..."
      raise FileNotFoundError(
          f"TFDS dataset {self._dataset!r} is not prepared in {self._where} (looked in "
          f"{self.builder.data_dir}); prepare it once with `tfds build {self._dataset} "
          f"--data_dir=...` (ImageNet: add --manual_dir=...).") from None
    except (KeyError, ValueError) as e:
      raise ValueError(f"TFDS dataset {self._dataset!r} has no split {split!r} in {self._where} "
                       f"({e}).") from None
    if n < 0:
      raise ValueError(f"TFDS dataset {self._dataset!r} split {split!r}: unknown size.")
    return n

  def __len__(self) -> int:
    return self._num_examples

  def describe(self, index: int) -> str:
    return f"{self.name} record {index}"

  def _slice(self, start: int, stop: int) -> str:
    """Examples [start, stop) of this source (its ranges laid end to end) as a TFDS split."""
    parts, offset = [], 0
    for a, b in self.ranges:
      lo, hi = max(start - offset, 0), min(stop - offset, b - a)
      if lo < hi:
        parts.append(f"{self.split}[{a + lo}:{a + hi}]")
      offset += b - a
    return "+".join(parts)

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
    step); without it the shares differ by at most one, the first processes taking the extra
    ones, and cover the split (evaluation). With a seed, file order and a buffer of records are
    shuffled, deterministically. `max_examples` >= 0: only the first ones of the split.
    """
    n = len(self) if max_examples < 0 else min(max_examples, len(self))
    if drop_remainder:
      start, stop = process_index * (n // process_count), (process_index + 1) * (n // process_count)
    else:
      bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), process_count)])
      start, stop = bounds[process_index], bounds[process_index + 1]
    if start == stop:  # an empty share: no TFDS split names it
      return tf.data.Dataset.from_tensor_slices((tf.constant([], tf.string),
                                                 tf.constant([], tf.int32)))
    ds = self._as_dataset(self._slice(int(start), int(stop)), shuffle_seed)
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


# --- splits carved from "train" -------------------------------------------------------------------

def take(source, indices, name: str):
  """The examples `indices` (into the source, distinct) of a source read by index, in that
  order, as a source of the same kind named `name`."""
  indices = np.asarray(indices, np.int64)
  if isinstance(source, ArraySource):
    return ArraySource(source.images[indices], source.labels[indices], name=name)
  if isinstance(source, FileSource):
    return FileSource(list(source.paths[indices]), source.labels[indices], source.class_names,
                      name=name)
  if isinstance(source, EncodedSource):
    return EncodedSource(list(source.encoded[indices]), source.labels[indices], name=name)
  if isinstance(source, indexed.ArrayRecordSource):
    return source.subset(indices, label=name.split("/", 1)[-1])
  raise TypeError(f"{source.name}: {type(source).__name__} is not read by index")


def carve(labels, examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(minival, rest): indices into a split with these labels, each ascending. Minival holds
  `examples` / classes examples of every class, drawn by `seed`; the rest is everything else.
  """
  labels = np.asarray(labels)
  classes = np.unique(labels)
  per_class = examples // len(classes)
  rng = np.random.default_rng(seed)
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
  minival = np.sort(np.concatenate(chosen))
  rest = np.setdiff1d(np.arange(len(labels)), minival, assume_unique=True)
  return minival, rest


def _carved(data_config, split: str):
  """`split` ("minival" or "train-minival") of the source of `data_config`, from its "train"."""
  d = data_config
  examples, seed = d.minival_examples, d.minival_seed
  train = _open(d, "train")
  if isinstance(train, (TfdsSource, indexed.ArrayRecordSource)):
    n = len(train)
    configuration.validate_minival(examples, split_size=n, where=f"{train.name}")
    offset = int(np.random.default_rng(seed).integers(0, n - examples + 1))
    ranges = ([(offset, offset + examples)] if split == "minival" else
              [(0, offset), (offset + examples, n)])
    if isinstance(train, indexed.ArrayRecordSource):
      return train.subset(np.concatenate([np.arange(a, b) for a, b in ranges]), label=split)
    return TfdsSource(d.name, "train", d.data_dir, d.image_key, d.label_key, ranges=ranges,
                      label=split)
  counts = np.bincount(train.labels)
  configuration.validate_minival(examples, split_size=len(train),
                                 class_counts=counts[counts > 0], where=train.name)
  minival, rest = carve(train.labels, examples, seed)
  chosen = minival if split == "minival" else rest
  return take(train, chosen, f"{train.name} {split} ({len(chosen)} of {len(train)}, seed {seed})")


# --- by config ------------------------------------------------------------------------------------

def open_source(data_config, split: str):
  """The source named by the `data` config block, for one split: one of the source's own, or
  "minival" / "train-minival", carved from its "train" split (`carve`)."""
  if split in configuration.CARVED_SPLITS:
    return _carved(data_config, split)
  return _open(data_config, split)


def _open(data_config, split: str):
  kind = data_config.source
  if kind == "fashion_mnist":
    return fashion_mnist(split, data_config.data_dir)
  if kind == "folder":
    if not data_config.data_dir:
      raise ValueError("data.source='folder' needs data.data_dir (the folder with "
                       "<split>/<class>/ inside)")
    return image_folder(data_config.data_dir, split)
  if kind == "tfds":
    d = data_config
    stream = TfdsSource(d.name, split, d.data_dir, d.image_key, d.label_key)
    formats = {f.value for f in stream.builder.info.available_file_formats()}
    if "array_record" in formats:  # read by index: resumes without reading what came before
      return indexed.ArrayRecordSource(stream.builder, d.name, split, d.image_key, d.label_key)
    return stream
  raise ValueError(f"Unknown data.source {kind!r}; expected 'fashion_mnist', 'folder' or 'tfds'.")
