r"""A synthetic ImageNet-shaped JPEG set, written by code: for benchmarks, tests and rehearsals
that need ImageNet's file sizes and formats but not its pictures (nothing is downloaded).

`write(root, images=N, classes=K)` writes N training JPEGs (and N // 10 test ones) of K classes
three ways, all holding the same JPEG bytes:

    ROOT/folder/{train,test}/class_000/000000.jpg ...   data.source="folder", data_dir=ROOT/folder
    ROOT/tfds_tfrecord/synthetic_imagenet/1.0.0/...      data.source="tfds", data.name=
    ROOT/tfds_array_record/synthetic_imagenet/1.0.0/...  "synthetic_imagenet", data_dir=...

The TFDS datasets are prepared by `SyntheticImagenet`, a TFDS builder that reads the folder
(`tfds build` of ImageNet reads its tar files the same way): one in TFRecord files, read as a
stream, one in ArrayRecord files, read by index (sove_jax/data/sources.py). A prepared dataset
reads without importing this module.

The pictures: ImageNet's size mix (most 500 x 375 or 375 x 500, about one in six larger, up to
2048 x 1536, about one in seven smaller, 2% grayscale), textured like photographs (smooth light
and color, gratings, fine grain, and a few shapes with edges, cut from a bank of textures drawn
once per seed), about ImageNet's bytes at JPEG quality 90 (~110 kB for 500 x 375). Every image
is a function of (seed, split, index) alone, so the set is the same whatever the number of
threads; a class sets the pictures' dominant colors. Paths may be gs:// buckets.

    python -m sove_jax.data.synthetic --out=/tmp/synthetic --images=2000 --classes=10
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from sove_jax import paths

NAME = "synthetic_imagenet"
FORMATS = ("folder", "tfrecord", "array_record")
# (height, width, weight): ImageNet's common sizes, then larger and smaller ones.
SIZES = ((375, 500, 30), (500, 375, 14), (333, 500, 12), (500, 333, 5), (500, 500, 6),
         (400, 500, 4), (480, 640, 6), (600, 800, 4), (768, 1024, 3), (1200, 1600, 1.5),
         (1536, 2048, 0.5), (300, 400, 5), (240, 320, 4), (150, 200, 3), (90, 120, 2))
TILE = 1024   # side of a texture of the bank
TEXTURES = 8  # textures in the bank
GRAY = 0.02   # fraction of grayscale JPEGs, as ImageNet has a few


def _smooth(rng, side: int, cells: int, channels: int) -> np.ndarray:
  """A smooth random field: `cells` x `cells` values, bilinearly upsampled to side x side."""
  coarse = rng.standard_normal((cells + 1, cells + 1, channels), dtype=np.float32)
  grid = np.linspace(0, cells, side, dtype=np.float32)
  weights = np.maximum(0, 1 - np.abs(grid[:, None] - np.arange(cells + 1)))  # [side, cells+1]
  return np.einsum("yi,ijc,xj->yxc", weights, coarse, weights, optimize=True)


def texture_bank(seed: int) -> np.ndarray:
  """TEXTURES textures, int16 [T, TILE, TILE, 3] around 0: color fields, gratings and grain."""
  rng = np.random.default_rng([seed, 1])
  ramp = np.arange(TILE, dtype=np.float32) / TILE
  bank = np.empty((TEXTURES, TILE, TILE, 3), np.int16)
  for t in range(TEXTURES):
    img = 45 * _smooth(rng, TILE, int(rng.integers(3, 12)), 3)
    for _ in range(2):  # gratings: sin(a y + b x + c), from the rows' and columns' sines
      angle, cycles = rng.uniform(0, np.pi), rng.uniform(6, 90)
      a, b = 2 * np.pi * cycles * np.sin(angle) * ramp, 2 * np.pi * cycles * np.cos(angle) * ramp
      c = rng.uniform(0, 7)
      wave = np.outer(np.sin(a + c), np.cos(b)) + np.outer(np.cos(a + c), np.sin(b))
      img += rng.uniform(6, 22) * wave[..., None] * rng.uniform(0.5, 1, 3).astype(np.float32)
    img += rng.uniform(12, 18) * rng.standard_normal((TILE, TILE, 1), dtype=np.float32)  # grain
    img += 5 * rng.standard_normal((TILE, TILE, 3), dtype=np.float32)
    bank[t] = np.clip(img, -128, 127)
  return bank


def _crop(bank, rng, h: int, w: int) -> np.ndarray:
  """A random h x w window of a random texture, tiled (mirrored) where it is larger."""
  t = bank[rng.integers(len(bank))]
  if h > TILE or w > TILE:
    t = np.pad(t, ((0, max(h - TILE, 0)), (0, max(w - TILE, 0)), (0, 0)), mode="reflect")
  top, left = rng.integers(0, t.shape[0] - h + 1), rng.integers(0, t.shape[1] - w + 1)
  return t[top:top + h, left:left + w]


def class_colors(seed: int, classes: int) -> np.ndarray:
  """float32 [K, 2, 3]: each class's base color and the color of its objects (0..255)."""
  return np.random.default_rng([seed, 2]).uniform(40, 215, (classes, 2, 3)).astype(np.float32)


def photograph(bank, colors, rng, h: int, w: int, label: int) -> np.ndarray:
  """uint8 [h, w, 3]: textured background of the class's color, light, and a few objects."""
  base, accent = colors[label]
  img = _crop(bank, rng, h, w).astype(np.float32) * rng.uniform(0.7, 1.3)
  img += base + rng.normal(0, 15, 3).astype(np.float32)
  light = (np.linspace(-1, 1, h, dtype=np.float32)[:, None] * rng.uniform(-30, 30) +
           np.linspace(-1, 1, w, dtype=np.float32)[None, :] * rng.uniform(-30, 30))
  img += light[..., None]
  for _ in range(int(rng.integers(2, 6))):  # objects: ellipses and boxes with edges
    oh, ow = int(rng.uniform(0.15, 0.6) * h) + 1, int(rng.uniform(0.15, 0.6) * w) + 1
    top, left = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
    fill = _crop(bank, rng, oh, ow).astype(np.float32) + accent * rng.uniform(0.6, 1.2)
    region = img[top:top + oh, left:left + ow]
    if rng.uniform() < 0.6:
      yy, xx = np.ogrid[-1:1:oh * 1j, -1:1:ow * 1j]
      inside = (yy ** 2 + xx ** 2 <= 1)[..., None]
      region[...] = np.where(inside, 0.25 * region + 0.75 * fill, region)
    else:
      region[...] = 0.25 * region + 0.75 * fill
  return np.clip(img, 0, 255).astype(np.uint8)


def _size(rng) -> tuple[int, int]:
  weights = np.array([s[2] for s in SIZES], np.float64)
  h, w, _ = SIZES[rng.choice(len(SIZES), p=weights / weights.sum())]
  return h, w


def jpeg(seed: int, split: str, index: int, classes: int, bank, colors,
         quality: int = 90) -> tuple[int, bytes]:
  """(label, JPEG bytes) of image `index` of `split`: a function of these arguments alone."""
  rng = np.random.default_rng([seed, 3, 0 if split == "train" else 1, index])
  label = index % classes
  h, w = _size(rng)
  picture = Image.fromarray(photograph(bank, colors, rng, h, w, label))
  if rng.uniform() < GRAY:
    picture = picture.convert("L")
  out = io.BytesIO()
  picture.save(out, format="JPEG", quality=quality)
  return label, out.getvalue()


def class_name(label: int) -> str:
  return f"class_{label:03d}"


def write_folder(folder: str, splits: dict[str, int], *, classes: int, seed: int = 0,
                 quality: int = 90, threads: int = 0, progress=print) -> dict[str, list[str]]:
  """Writes FOLDER/<split>/class_XXX/NNNNNN.jpg for {split: count}; returns the paths by split.
  Existing files of the same names are overwritten."""
  bank, colors = texture_bank(seed), class_colors(seed, classes)
  for split in splits:
    for c in range(classes):
      tf.io.gfile.makedirs(paths.join(folder, split, class_name(c)))
  written = {}
  start, done, total = time.time(), 0, sum(splits.values())

  def one(split, i):
    label, data = jpeg(seed, split, i, classes, bank, colors, quality)
    path = paths.join(folder, split, class_name(label), f"{i:06d}.jpg")
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(data)
    return path, len(data)

  with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
    for split, count in splits.items():
      written[split], nbytes = [], 0
      for path, size in pool.map(lambda i: one(split, i), range(count)):
        written[split].append(path)
        nbytes += size
        done += 1
        if progress and done % 500 == 0:
          progress(f"synthetic: {done}/{total} JPEGs ({time.time() - start:.0f} s)")
      if progress and count:
        progress(f"synthetic: {split}: {count} JPEGs, {nbytes / count / 1e3:.0f} kB each on "
                 f"average, in {folder}")
  return written


class SyntheticImagenet(tfds.core.GeneratorBasedBuilder):
  """The synthetic set as a TFDS dataset: "image" (JPEG, the folder's bytes as they are) and
  "label" (ClassLabel of the folder's class names), splits as the folder's. Prepared from
  `folder`; read back without it."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Written by sove_jax.data.synthetic."}
  url_infos = {}  # nothing to download (TFDS would look for a checksums file beside the code)

  def __init__(self, *, folder: str = "", **kwargs):
    self._folder = folder
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    names = None
    if self._folder:
      train = paths.join(self._folder, "train")
      names = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(train))
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=names)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    splits = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(self._folder))
    return {split: self._generate_examples(split) for split in splits}

  def _generate_examples(self, split):
    root = paths.join(self._folder, split)
    for name in sorted(n.rstrip("/") for n in tf.io.gfile.listdir(root)):
      for file in sorted(tf.io.gfile.listdir(paths.join(root, name))):
        yield f"{name}/{file}", {"image": paths.join(root, name, file), "label": name}


def prepare_tfds(folder: str, data_dir: str, file_format: str) -> str:
  """Prepares the TFDS dataset from the folder in `data_dir`, in "tfrecord" or "array_record"
  files; returns its directory."""
  builder = SyntheticImagenet(folder=folder, data_dir=data_dir, file_format=file_format)
  reuse = tfds.GenerateMode.REUSE_DATASET_IF_EXISTS
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=reuse))
  return str(builder.data_dir)


def write(root: str, *, images: int, classes: int, test_images: int | None = None, seed: int = 0,
          formats=FORMATS, quality: int = 90, threads: int = 0, progress=print) -> dict[str, str]:
  """Writes the set under `root` in `formats` (see the module docstring); returns the data_dir
  of each: {"folder": ROOT/folder, "tfrecord": ROOT/tfds_tfrecord, ...}."""
  unknown = set(formats) - set(FORMATS)
  if unknown:
    raise ValueError(f"Unknown format(s) {sorted(unknown)}; expected some of {FORMATS}.")
  if images < classes or classes < 1:
    raise ValueError(f"{images} images cannot hold {classes} classes (need images >= classes "
                     ">= 1).")
  test_images = max(images // 10, classes) if test_images is None else test_images
  out = {"folder": paths.join(root, "folder")}
  write_folder(out["folder"], {"train": images, "test": test_images}, classes=classes,
               seed=seed, quality=quality, threads=threads, progress=progress)
  for file_format in ("tfrecord", "array_record"):
    if file_format in formats:
      out[file_format] = paths.join(root, f"tfds_{file_format}")
      start = time.time()
      prepare_tfds(out["folder"], out[file_format], file_format)
      if progress:
        progress(f"synthetic: TFDS {NAME} in {file_format} files in {out[file_format]} "
                 f"({time.time() - start:.0f} s)")
  if "folder" not in formats:
    out.pop("folder")
  return out


def main(argv):
  del argv
  start = time.time()
  dirs = write(FLAGS.out, images=FLAGS.images, classes=FLAGS.classes, seed=FLAGS.seed,
               test_images=None if FLAGS.test_images < 0 else FLAGS.test_images,
               formats=tuple(FLAGS.formats))
  print(f"synthetic: done in {time.time() - start:.0f} s; " +
        ", ".join(f"{k}: {v}" for k, v in dirs.items()))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("out", None, "Folder to write into (local or gs://).", required=True)
  flags.DEFINE_integer("images", 2000, "Training images.")
  flags.DEFINE_integer("test_images", -1, "Test images (-1: images // 10, at least one a class).")
  flags.DEFINE_integer("classes", 10, "Classes.")
  flags.DEFINE_integer("seed", 0, "Seed: the same seed writes the same bytes.")
  flags.DEFINE_list("formats", list(FORMATS), f"Some of {', '.join(FORMATS)}.")
  FLAGS = flags.FLAGS
  app.run(main)
