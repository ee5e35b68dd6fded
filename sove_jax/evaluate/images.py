"""Image files of any size through a frozen backbone, sharded over the devices.

Retrieval, video label propagation and the PCA pictures read their own image files (JPEG, PNG)
rather than a TFDS split, at sizes and aspect ratios that vary from image to image. This module
holds what they share: reading files (local or gs://, through `etils.epath`, never TensorFlow),
resizing and normalizing them as the evaluation protocols do, and running a backbone over a list
of such images on the mesh. Images are grouped by shape; each group goes through in global
batches sharded over the devices, so a protocol compiles once per distinct shape, not once per
image.
"""
import concurrent.futures
import functools
import io
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from sove_jax import sharding as sharding_lib
from sove_jax.evaluate import features as features_lib

log = logging.getLogger(__name__)

LOAD_THREADS = 8


def read_image(path) -> Image.Image:
  """An RGB PIL image from a local or gs:// path (grayscale and CMYK files converted)."""
  with epath.Path(path).open("rb") as f:
    image = Image.open(io.BytesIO(f.read()))
    return image.convert("RGB")


def image_size(path) -> tuple[int, int]:
  """(width, height) of an image file from its header, without decoding the pixels."""
  with epath.Path(path).open("rb") as f:
    return Image.open(f).size


def read_label_map(path) -> tuple[np.ndarray, np.ndarray | None]:
  """A palette PNG of integer labels (DAVIS annotations): (uint8 [H, W] labels, palette [n, 3]
  or None). The labels are the palette indices, not the colors."""
  with epath.Path(path).open("rb") as f:
    image = Image.open(io.BytesIO(f.read()))
    image.load()
  palette = image.getpalette() if image.mode == "P" else None
  if image.mode not in ("P", "L"):
    raise ValueError(f"{path} is a {image.mode} image; label maps are palette or 8-bit PNGs")
  labels = np.asarray(image, np.uint8)
  if palette is not None:
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
  return labels, palette


def write_label_map(path, labels: np.ndarray, palette: np.ndarray | None):
  """Writes uint8 [H, W] labels as an indexed PNG with `palette` (DAVIS result format)."""
  image = Image.fromarray(np.asarray(labels, np.uint8), mode="L")
  if palette is not None:
    image = image.convert("P")
    image.putpalette(np.asarray(palette, np.uint8).ravel().tolist())
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  epath.Path(path).write_bytes(buffer.getvalue())


def write_png(path, rgb: np.ndarray):
  """Writes uint8 [H, W, 3] as a PNG (local or gs://)."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(rgb, np.uint8), mode="RGB").save(buffer, format="PNG")
  epath.Path(path).write_bytes(buffer.getvalue())


def longer_side_size(width: int, height: int, size: int) -> tuple[int, int]:
  """(width, height) with the longer side brought down to `size`, the aspect ratio kept and the
  shorter side rounded; never enlarged (the sizes of PIL's `thumbnail`, which DINO's retrieval
  evaluation uses)."""
  if width <= size and height <= size:
    return width, height
  if width >= height:
    return size, max(1, round(height * size / width))
  return max(1, round(width * size / height)), size


def shorter_side_size(width: int, height: int, size: int, multiple: int = 1) -> tuple[int, int]:
  """(width, height) with the shorter side at `size` and the longer side scaled with it, then
  floored to a multiple of `multiple` (DINO's video frames: 480 and a multiple of 64)."""
  if width <= height:
    long = int(height * size / width) // multiple * multiple
    return size, max(long, multiple)
  long = int(width * size / height) // multiple * multiple
  return max(long, multiple), size


def to_array(image: Image.Image, mean, std) -> np.ndarray:
  """float32 [H, W, 3]: pixels in [0, 1] standardised with the run's `data.mean` / `data.std`."""
  x = np.asarray(image, np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def token_stride(model) -> int:
  """Input pixels per output token, per side: a ViT's patch size; a Swin's patch size doubled by
  each patch merging (Swin-T, patch 4: 32). Patch features sit on the grid of this stride, not of
  the patch size."""
  return int(getattr(model, "stride", model.patch_size))


def patch_multiple(width: int, height: int, patch: int) -> tuple[int, int]:
  """The largest (width, height) of whole patches: what the patch embedding (a VALID
  convolution with stride `patch`) reads of an image; the rest is never seen."""
  if width < patch or height < patch:
    raise ValueError(f"a {width}x{height} image is smaller than one {patch}x{patch} patch")
  return width // patch * patch, height // patch * patch


def replicated_state(model, mesh):
  """(graphdef, state) of `model` with every parameter replicated on `mesh`, so that a jitted
  forward over mesh-sharded images accepts them."""
  graphdef, state = nnx.split(model)
  replicated = jax.NamedSharding(mesh, jax.P())

  def place(x):
    s = getattr(x, "sharding", None)
    on_mesh = isinstance(s, jax.NamedSharding) and s.mesh == mesh
    return x if on_mesh else jax.device_put(x, replicated)

  return graphdef, jax.tree.map(place, state)


def _chunk_rows(remaining: int, batch_size: int, multiple: int) -> int:
  """Rows of the next global batch: `batch_size`, or for the last chunk of a group the smallest
  `multiple * 2^k` that holds the rest (few distinct shapes, little padding)."""
  if remaining >= batch_size:
    return batch_size
  rows = multiple
  while rows < remaining:
    rows *= 2
  return min(rows, batch_size)


def _host_batches(items, load, shapes, *, batch_size, multiple, description):
  """Host batches in the shape of the data package's eval input: {"image", "label" (the item's
  index, -1 for padding), "valid"}, this process's rows of each global batch only. Rows are
  loaded by a few threads (decoding and resizing release the GIL). Logs progress about every
  tenth of the items."""
  groups = {}
  for index, shape in enumerate(shapes):
    groups.setdefault(tuple(shape), []).append(index)
  procs, me = jax.process_count(), jax.process_index()
  done, next_report = 0, len(items) / 10
  with concurrent.futures.ThreadPoolExecutor(LOAD_THREADS) as pool:
    for shape, members in groups.items():
      for start in _chunk_starts(len(members), batch_size, multiple):
        rows = _chunk_rows(len(members) - start, batch_size, multiple)
        chunk = members[start:start + rows]
        local = rows // procs
        mine = [(row, chunk[g]) for row, g in enumerate(range(me * local, (me + 1) * local))
                if g < len(chunk)]
        image = np.zeros((local,) + shape, np.float32)
        label = np.full((local,), -1, np.int32)
        for (row, index), array in zip(mine, pool.map(lambda m: load(items[m[1]]), mine)):
          image[row], label[row] = array, index
        yield {"image": image, "label": label, "valid": label >= 0}
        done += len(chunk)
        if description and (done >= next_report or done == len(items)):
          log.info("%s: %d/%d images, %d distinct shapes", description, done, len(items),
                   len(groups))
          next_report = done + len(items) / 10


def _chunk_starts(count, batch_size, multiple):
  start = 0
  while start < count:
    yield start
    start += _chunk_rows(count - start, batch_size, multiple)


def map_images(apply_fn: Callable, items: Sequence, *, load: Callable, shape_of: Callable,
               mesh=None, batch_size: int = 0, description: str = "") -> np.ndarray:
  """`apply_fn` ([b, H, W, 3] images -> [b, ...] outputs of one trailing shape) over every item,
  returned in item order as one float32 array.

  `shape_of(item)` gives the item's array shape ([H, W, 3]) without decoding it; `load(item)`
  the float32 array. Items are grouped by shape and run in global batches of `batch_size` rows
  (default 8 per device; a multiple of the device count), sharded over the "data" axis of
  `mesh`; each process loads only its own rows. With a `description`, progress is logged.
  """
  mesh = sharding_lib.batch_mesh() if mesh is None else mesh
  devices = mesh.devices.size
  batch_size = batch_size or 8 * devices
  if batch_size % devices:
    raise ValueError(f"batch_size {batch_size} is not a multiple of the {devices} devices")
  if not items:
    raise ValueError("no images to run the backbone on")
  sharding = jax.NamedSharding(mesh, jax.P(tuple(mesh.axis_names)))
  shapes = [tuple(shape_of(item)) for item in items]
  batches = _host_batches(items, load, shapes, batch_size=batch_size, multiple=devices,
                          description=description)
  outputs, order = features_lib.extract_features(apply_fn, batches, sharding=sharding)
  result = np.empty_like(outputs)
  result[order] = outputs
  return result


@functools.partial(jax.jit, static_argnums=(0,))
def _tokens(graphdef, state, images):
  return nnx.merge(graphdef, state)(images).astype(jnp.float32)


def patch_features(model, *, mesh, normalize: bool = True):
  """images [b, H, W, 3] -> the final tokens (after the final LayerNorm; [CLS] or the Swin's
  pooled token dropped) on their grid, [b, H/s, W/s, D] for the token stride s
  (`token_stride`), L2-normalized per token when `normalize`. Images whose sides are not
  multiples of the stride are cropped to whole strides first."""
  graphdef, state = replicated_state(model, mesh)
  stride = token_stride(model)

  def apply(images):
    b, h, w, _ = images.shape
    gh, gw = h // stride, w // stride
    tokens = _tokens(graphdef, state, images[:, :gh * stride, :gw * stride])
    if tokens.shape[1] != 1 + gh * gw:
      raise ValueError(f"{tokens.shape[1] - 1} tokens for a {gh}x{gw} grid of stride {stride}")
    grid = tokens[:, 1:].reshape(b, gh, gw, -1)
    return _normalized(grid) if normalize else grid

  return apply


_normalized = jax.jit(features_lib.l2_normalize)
