r"""Video object segmentation by label propagation on DAVIS-2017 (the paper's Table 4).

DINO's protocol, with frozen teacher patch features and no training:
- Frames are resized to `frame_size` (480) on the shorter side, the longer side floored to a
  multiple of 64; the backbone's last-layer tokens (after the final LayerNorm, [CLS] dropped),
  L2-normalized, are the features of a frame's token grid: the patch grid of a ViT, the final
  stage's grid of a Swin (one token per 32 px of Swin-T: `images.token_stride`).
- The first frame's annotation, resized to the patch grid (nearest), gives one-hot labels
  (background and one channel per object).
- Each later frame takes its labels from a context: the first frame and the `n_last_frames`
  previous frames (with the soft labels propagated to them). For every target patch, the
  similarities to the context patches within `radius` grid cells (a square window; 0 lifts the
  restriction) are computed, the `topk` most similar are kept, and their labels are averaged
  with softmax(similarity / `temperature`) weights.
- The soft labels are upsampled bilinearly by the token stride, each channel is min-max
  normalized over the frame, the argmax is taken and resized (nearest) to the frame's original
  size.
- Scores are the DAVIS semi-supervised ones (davis2017-evaluation): per object and frame, J is
  the region IoU (1 when both masks are empty) and F the boundary F-measure, boundary pixels
  matched within a disk of ceil(0.008 x image diagonal) pixels; the first and last frames are
  not scored; void pixels (255) count as background. Per object: the mean, the recall (fraction
  of frames above 0.5) and the decay (first quarter of the frames minus the last); the table
  averages over all objects of all sequences, and J&F-Mean is the mean of J-Mean and F-Mean.

The data are the DAVIS-2017 layout: DATA_DIR/JPEGImages/480p/<seq>/*.jpg,
DATA_DIR/Annotations/480p/<seq>/*.png (palette PNGs) and DATA_DIR/ImageSets/2017/val.txt.

    python -m sove_jax.evaluate.video --workdir=runs/vits --data_dir=/data/DAVIS \
        [--n_last_frames=7 --topk=5 --radius=12 --temperature=0.1] [--output_dir=DIR]

With `--output_dir`, the predicted masks are written as indexed PNGs in the layout that the
official davis2017-evaluation reads. Results go to OUT_DIR/video.json.
"""
import functools
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image
from scipy import ndimage

from sove_jax import sharding as sharding_lib
from sove_jax.evaluate import images as images_lib
from sove_jax.evaluate import protocol

log = logging.getLogger(__name__)

LONG_SIDE_MULTIPLE = 64  # DINO's frame sizes: 480 x (a multiple of 64)
BOUNDARY_TOLERANCE = 0.008  # of the image diagonal (DAVIS)
VOID = 255
# DINO's propagation settings (eval_video_segmentation.py defaults).
SETTINGS = {"n_last_frames": 7, "topk": 5, "radius": 12, "temperature": 0.1, "frame_size": 480}
MEASURES = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


# --- J and F (the DAVIS metrics) ------------------------------------------------------------------

def region_similarity(gt, pred) -> float:
  """J: |gt & pred| / |gt | pred| of two binary masks; 1 when both are empty."""
  gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
  union = np.sum(gt | pred)
  return 1.0 if union == 0 else float(np.sum(gt & pred) / union)


def boundary_map(mask) -> np.ndarray:
  """One-pixel-wide boundary of a binary mask: pixels whose right, lower or lower-right
  neighbor differs from them (the last row compares right neighbors only, the last column
  lower ones, the corner never). The standard `seg2bmap` of the DAVIS and BSDS benchmarks."""
  m = np.asarray(mask, bool)
  right = np.zeros_like(m)
  down = np.zeros_like(m)
  diag = np.zeros_like(m)
  right[:, :-1] = m[:, 1:]
  down[:-1, :] = m[1:, :]
  diag[:-1, :-1] = m[1:, 1:]
  b = (m ^ right) | (m ^ down) | (m ^ diag)
  b[-1, :] = m[-1, :] ^ right[-1, :]
  b[:, -1] = m[:, -1] ^ down[:, -1]
  b[-1, -1] = False
  return b


def _disk(radius: int) -> np.ndarray:
  r = int(radius)
  y, x = np.mgrid[-r:r + 1, -r:r + 1]
  return x * x + y * y <= r * r


def contour_accuracy(gt, pred, bound_th: float = BOUNDARY_TOLERANCE) -> float:
  """F: the F-measure of boundary precision and recall, a boundary pixel of one mask counting
  as matched when the other's boundary lies within a disk of radius `bound_th` pixels
  (`bound_th` >= 1) or ceil(bound_th x diagonal) pixels (< 1). An empty boundary on one side
  gives precision 1 / recall 0 (or the reverse), empty on both sides gives F = 1."""
  gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
  radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
  gt_b, pred_b = boundary_map(gt), boundary_map(pred)
  disk = _disk(radius)
  gt_near = ndimage.binary_dilation(gt_b, structure=disk)
  pred_near = ndimage.binary_dilation(pred_b, structure=disk)
  n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
  if n_pred == 0 and n_gt == 0:
    precision = recall = 1.0
  elif n_pred == 0:
    precision, recall = 1.0, 0.0
  elif n_gt == 0:
    precision, recall = 0.0, 1.0
  else:
    precision = np.sum(pred_b & gt_near) / n_pred
    recall = np.sum(gt_b & pred_near) / n_gt
  if precision + recall == 0:
    return 0.0
  return float(2 * precision * recall / (precision + recall))


def statistics(values) -> tuple[float, float, float]:
  """(mean, recall, decay) of one object's per-frame scores: recall is the fraction above 0.5,
  decay the mean of the first of four equal bins of frames minus that of the last (the bins'
  edges as the DAVIS toolkit rounds them)."""
  v = np.asarray(values, np.float64)
  if not v.size:
    return float("nan"), float("nan"), float("nan")
  edges = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.int64)
  first, last = v[edges[0]:edges[1] + 1], v[edges[3]:edges[4] + 1]
  return (float(np.nanmean(v)), float(np.nanmean(v > 0.5)),
          float(np.nanmean(first) - np.nanmean(last)))


def score_sequence(gt_maps, pred_maps, num_objects: int):
  """J and F [num_objects, frames] of predicted label maps against annotated ones (void pixels
  counted as background)."""
  j = np.zeros((num_objects, len(gt_maps)))
  f = np.zeros((num_objects, len(gt_maps)))
  for t, (gt, pred) in enumerate(zip(gt_maps, pred_maps)):
    gt = np.where(gt == VOID, 0, gt)
    for k in range(num_objects):
      j[k, t] = region_similarity(gt == k + 1, pred == k + 1)
      f[k, t] = contour_accuracy(gt == k + 1, pred == k + 1)
  return j, f


def summarize(per_object):
  """The DAVIS table (%) from {name: (J per frame, F per frame)} of every object."""
  rows = {"J": [statistics(j) for j, _ in per_object.values()],
          "F": [statistics(f) for _, f in per_object.values()]}
  out = {}
  for m in ("J", "F"):
    stats = np.asarray(rows[m], np.float64).reshape(-1, 3)
    for i, name in enumerate(("Mean", "Recall", "Decay")):
      out[f"{m}-{name}"] = 100.0 * float(np.nanmean(stats[:, i])) if len(stats) else float("nan")
  out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2
  return {k: out[k] for k in MEASURES}


# --- label propagation ------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("grid", "topk", "radius", "temperature"))
def propagate(target, context_features, context_labels, context_valid, *, grid, topk, radius,
              temperature):
  """Soft labels [L, C] of a target frame's patches from its context.

  target: [L, D] L2-normalized patch features (L = grid[0] * grid[1], row-major);
  context_features [S, L, D], context_labels [S, L, C], context_valid bool [S] (unused slots
  never count). Each target patch keeps the `topk` most similar valid context patches within
  `radius` cells (square window; 0: anywhere), weighted by softmax(similarity / temperature).
  """
  s, l, _ = context_features.shape
  sim = jnp.einsum("ld,smd->lsm", target, context_features,
                   precision=jax.lax.Precision.HIGHEST)
  allowed = jnp.broadcast_to(context_valid[None, :, None], sim.shape)
  if radius > 0:
    row, col = jnp.divmod(jnp.arange(l), grid[1])
    near = ((jnp.abs(row[:, None] - row[None, :]) <= radius)
            & (jnp.abs(col[:, None] - col[None, :]) <= radius))
    allowed = allowed & near[:, None, :]
  sim = jnp.where(allowed, sim, -jnp.inf).reshape(l, s * l)
  values, index = jax.lax.top_k(sim, topk)
  weights = jax.nn.softmax(values / temperature, axis=-1)
  weights = jnp.where(jnp.isfinite(values), weights, 0.0)
  labels = context_labels.reshape(s * l, -1)[index]  # [L, k, C]
  return jnp.einsum("lk,lkc->lc", weights, labels)


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def _remember(features, labels, valid, slot, new_features, new_labels):
  """Writes a frame's features and soft labels into context slot `slot`."""
  return (features.at[slot].set(new_features), labels.at[slot].set(new_labels),
          valid.at[slot].set(True))


@functools.partial(jax.jit, static_argnums=(1,))
def label_map(soft, stride: int):
  """Soft labels [h, w, C] -> uint8 [h * stride, w * stride] labels: bilinear upsampling
  (half-pixel centers, edges clamped), each channel min-max normalized when its maximum is
  positive, argmax."""
  h, w, c = soft.shape
  up = jax.image.resize(soft, (h * stride, w * stride, c), "linear")
  lo = up.min(axis=(0, 1))
  hi = up.max(axis=(0, 1))
  span = jnp.where(hi - lo > 0, hi - lo, 1.0)
  up = jnp.where(hi > 0, (up - lo) / span, up)
  return jnp.argmax(up, axis=-1).astype(jnp.uint8)


class Context:
  """The context of DAVIS propagation: slot 0 holds the first frame, slots 1..n a ring of the
  n previous frames, on device."""

  def __init__(self, first_features, first_labels, n_last_frames: int):
    l, d = first_features.shape
    slots = 1 + n_last_frames
    self.features = jnp.zeros((slots, l, d), jnp.float32).at[0].set(first_features)
    self.labels = jnp.zeros((slots, l, first_labels.shape[-1]),
                            jnp.float32).at[0].set(first_labels)
    self.valid = jnp.zeros((slots,), bool).at[0].set(True)
    self.n_last_frames = n_last_frames
    self.count = 0

  def push(self, features, labels):
    if not self.n_last_frames:
      return
    slot = 1 + self.count % self.n_last_frames
    self.features, self.labels, self.valid = _remember(self.features, self.labels, self.valid,
                                                       slot, features, labels)
    self.count += 1


def one_hot_grid(labels: np.ndarray, grid, num_classes: int) -> np.ndarray:
  """float32 [gh * gw, C]: a label map resized to the patch grid (nearest), one-hot."""
  small = Image.fromarray(np.asarray(labels, np.uint8)).resize((grid[1], grid[0]),
                                                               Image.NEAREST)
  return np.eye(num_classes, dtype=np.float32)[np.asarray(small).reshape(-1)]


def propagate_video(frames, first_labels, num_classes: int, *, stride: int, n_last_frames=7,
                    topk=5, radius=12, temperature=0.1):
  """Label maps (uint8, at the frames' resolution, cut to whole strides) of every frame but the
  first, from `frames` = an iterable of [h, w, D] normalized token-feature grids (first frame
  first) and the first frame's one-hot labels [h * w, C]."""
  frames = iter(frames)
  first = jnp.asarray(next(frames))
  grid = first.shape[:2]
  context = Context(first.reshape(-1, first.shape[-1]), jnp.asarray(first_labels),
                    n_last_frames)
  step = functools.partial(propagate, grid=grid, topk=topk, radius=radius,
                           temperature=temperature)
  for grid_features in frames:
    target = jnp.asarray(grid_features).reshape(-1, first.shape[-1])
    soft = step(target, context.features, context.labels, context.valid)
    context.push(target, soft)
    yield np.asarray(label_map(soft.reshape(*grid, num_classes), stride))


# --- DAVIS ------------------------------------------------------------------------------------

def sequence_names(data_dir, split="val", year="2017"):
  path = epath.Path(data_dir) / "ImageSets" / year / f"{split}.txt"
  if not path.exists():
    raise FileNotFoundError(f"no {path}: is {data_dir} a DAVIS-{year} folder?")
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class Frame:
  """A frame file resized as DINO's video evaluation does; knows its shape without decoding."""

  def __init__(self, path, size, mean, std):
    self.path, self.size, self.mean, self.std = path, size, mean, std
    self.shape = (size[1], size[0], 3)

  def load(self):
    image = images_lib.read_image(self.path)
    if image.size != self.size:
      image = image.resize(self.size, Image.BILINEAR)
    return images_lib.to_array(image, self.mean, self.std)


def segment_sequence(apply_fn, stride, frame_paths, first_annotation, *, mean, std, frame_size,
                     mesh, batch_size, n_last_frames, topk, radius, temperature):
  """Predicted label maps (uint8, original frame size) of every frame of one sequence; the
  first is the annotation itself. `apply_fn` is `images.patch_features(model, mesh=mesh)`,
  whose grids have the token stride `stride`."""
  width, height = images_lib.image_size(frame_paths[0])
  size = images_lib.shorter_side_size(width, height, frame_size, LONG_SIDE_MULTIPLE)
  grid = (size[1] // stride, size[0] // stride)
  labels = np.where(first_annotation == VOID, 0, first_annotation)
  num_classes = int(labels.max()) + 1
  seed = one_hot_grid(labels, grid, num_classes)
  frames = [Frame(p, size, mean, std) for p in frame_paths]
  chunk = max(batch_size or 8 * mesh.devices.size, 1)

  def grids():
    for start in range(0, len(frames), chunk):
      feats = images_lib.map_images(apply_fn, frames[start:start + chunk],
                                    load=lambda f: f.load(), shape_of=lambda f: f.shape,
                                    mesh=mesh, batch_size=batch_size)
      yield from feats

  predictions = [np.asarray(first_annotation, np.uint8)]
  for labels_map in propagate_video(grids(), seed, num_classes, stride=stride,
                                    n_last_frames=n_last_frames, topk=topk, radius=radius,
                                    temperature=temperature):
    full = Image.fromarray(labels_map).resize((width, height), Image.NEAREST)
    predictions.append(np.asarray(full))
  return predictions


def check_settings(*, topk, n_last_frames, temperature, radius, frame_size):
  """One-sentence ValueError for propagation settings that cannot work."""
  if topk < 1 or n_last_frames < 0 or temperature <= 0 or radius < 0 or frame_size < 1:
    raise ValueError("video propagation needs topk >= 1, n_last_frames >= 0, temperature > 0, "
                     "radius >= 0 and frame_size >= 1")


def evaluate_video(config, model, *, data_dir, split="val", resolution="480p", sequences=None,
                   n_last_frames=7, topk=5, radius=12, temperature=0.1, frame_size=480,
                   batch_size=0, output_dir="", mesh=None):
  """DAVIS-2017 label propagation of `model`'s patch features. Returns {"J&F-Mean", ...,
  "sequences": {seq: {"J-Mean", "F-Mean", "objects"}}} (percentages)."""
  check_settings(topk=topk, n_last_frames=n_last_frames, temperature=temperature,
                 radius=radius, frame_size=frame_size)
  mesh = sharding_lib.batch_mesh() if mesh is None else mesh
  root = epath.Path(data_dir)
  names = list(sequences) if sequences else sequence_names(data_dir, split)
  apply_fn = images_lib.patch_features(model, mesh=mesh)
  per_object, per_sequence = {}, {}
  for i, name in enumerate(names):
    frame_dir = root / "JPEGImages" / resolution / name
    frame_paths = sorted(frame_dir.glob("*.jpg"))
    if not frame_paths:
      raise FileNotFoundError(f"no frames in {frame_dir}")
    annotation_dir = root / "Annotations" / resolution / name
    annotation_paths = [annotation_dir / f"{p.stem}.png" for p in frame_paths]
    first, palette = images_lib.read_label_map(annotation_paths[0])
    predictions = segment_sequence(
        apply_fn, images_lib.token_stride(model), frame_paths, first, mean=tuple(config.data.mean),
        std=tuple(config.data.std), frame_size=frame_size, mesh=mesh, batch_size=batch_size,
        n_last_frames=n_last_frames, topk=topk, radius=radius, temperature=temperature)
    if output_dir and jax.process_index() == 0:
      out = epath.Path(output_dir) / name
      out.mkdir(parents=True, exist_ok=True)
      for path, labels in zip(frame_paths, predictions):
        images_lib.write_label_map(out / f"{path.stem}.png", labels, palette)
    # Scored frames: all but the first and the last, where an annotation exists.
    scored = [t for t in range(1, len(frame_paths) - 1) if annotation_paths[t].exists()]
    num_objects = int(np.where(first == VOID, 0, first).max())
    gts = [images_lib.read_label_map(annotation_paths[t])[0] for t in scored]
    j, f = score_sequence(gts, [predictions[t] for t in scored], num_objects)
    for k in range(num_objects):
      per_object[f"{name}_{k + 1}"] = (j[k], f[k])
    per_sequence[name] = {"J-Mean": 100.0 * float(np.mean(j)) if j.size else float("nan"),
                          "F-Mean": 100.0 * float(np.mean(f)) if f.size else float("nan"),
                          "objects": num_objects, "frames": len(frame_paths)}
    log.info("video: %s (%d/%d) J %.1f F %.1f", name, i + 1, len(names),
             per_sequence[name]["J-Mean"], per_sequence[name]["F-Mean"])
  results = summarize(per_object)
  results["sequences"] = per_sequence
  return results


def format_table(results, baselines=None):
  """The DAVIS global row (each baseline's under it), then J-Mean and F-Mean per sequence (%)."""
  lines = [f"{'':<14}" + "".join(f"{m:>10}" for m in MEASURES)]
  for who, res in [("trained", results)] + [(protocol.BASELINE_NAMES[b], r)
                                            for b, r in (baselines or {}).items()]:
    lines.append(f"{who:<14}" + "".join(f"{res[m]:10.2f}" for m in MEASURES))
  lines += ["", f"{'sequence':<24}{'J-Mean':>8}{'F-Mean':>8}"]
  for name, row in results["sequences"].items():
    lines.append(f"{name:<24}{row['J-Mean']:8.2f}{row['F-Mean']:8.2f}")
  return "\n".join(lines)


# --- the protocol ---------------------------------------------------------------------------------

def _evaluate(loaded, out_dir, **options):
  del out_dir
  return evaluate_video(*loaded, **options)


def _check(options):
  check_settings(**{k: options.get(k, v) for k, v in SETTINGS.items()})
  if not options.get("sequences"):
    sequence_names(options["data_dir"], options.get("split", "val"))


def _record(results, options):
  return {"protocol": "video_dino", "split": options.get("split", "val"),
          **{k: options.get(k, v) for k, v in SETTINGS.items()}, **results}


def _options(f) -> dict:
  return dict(data_dir=f.data_dir, split=f.split, resolution=f.resolution,
              sequences=f.sequences or None, n_last_frames=f.n_last_frames, topk=f.topk,
              radius=f.radius, temperature=f.temperature, frame_size=f.frame_size,
              batch_size=f.batch_size, output_dir=f.output_dir)


def _define_flags(flags):
  flags.DEFINE_string("data_dir", None, "DAVIS root (JPEGImages/, Annotations/, ImageSets/).",
                      required=True)
  flags.DEFINE_string("split", "val", "Sequence list ImageSets/2017/<split>.txt.")
  flags.DEFINE_string("resolution", "480p", "Frame folder under JPEGImages/ and Annotations/.")
  flags.DEFINE_list("sequences", [], "Only these sequences (default: the whole split).")
  flags.DEFINE_integer("n_last_frames", 7, "Previous frames in the context (besides the first).")
  flags.DEFINE_integer("topk", 5, "Context patches each target patch takes labels from.")
  flags.DEFINE_integer("radius", 12, "Neighborhood, in tokens, a label can come from "
                       "(square window); 0: anywhere.")
  flags.DEFINE_float("temperature", 0.1, "Softmax temperature of the neighbor weights.")
  flags.DEFINE_integer("frame_size", 480, "Shorter frame side, px; the longer side is floored "
                       "to a multiple of 64.")
  flags.DEFINE_string("output_dir", "", "Write the predicted masks here as indexed PNGs "
                      "(<seq>/<frame>.png, the davis2017-evaluation layout).")


PROTOCOL = protocol.Protocol(
    name="video", title="DAVIS-2017 video segmentation", evaluate=_evaluate,
    define_flags=_define_flags, options=_options, table=format_table, record=_record,
    check=_check, baselines=("random_init",))


if __name__ == "__main__":
  protocol.main(PROTOCOL)
