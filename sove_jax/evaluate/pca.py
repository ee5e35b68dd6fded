r"""Pictures of patch features: their first three principal components as RGB (DINOv2's figure).

The teacher's last-layer tokens (after the final LayerNorm; a ViT's patches, a Swin's final-stage
grid, one token per `images.token_stride` pixels) of every image are pooled and
one PCA is fitted to all of them, so the same color means the same direction of feature space in
every picture: parts that the backbone represents alike look alike across images. Each
component is scaled to [0, 1] over all patches and becomes a color channel; each image is shown
beside its map, one row per image.

With `remove_background`, as DINOv2 shows them: the first component, scaled to [0, 1] and signed
so that the image borders lie low, is thresholded; patches below `threshold` are background
(black) and the PCA is fitted again on the foreground patches alone, whose three components give
the colors. The border rule is a heuristic: objects that fill the frame defeat it.

    python -m sove_jax.evaluate.pca --workdir=runs/vits --images=a.jpg,b.jpg,c.jpg \
        [--out=pca.png] [--image_size=448] [--remove_background]

Images are resized (shorter side, bicubic) and center-cropped to `image_size` (default twice
the training crop), floored to whole token strides. The PNG goes to `--out` (default
OUT_DIR/pca.png), the explained variance to OUT_DIR/pca.json.
"""
import json

import jax
import numpy as np
from etils import epath
from PIL import Image

from sove_jax import sharding as sharding_lib
from sove_jax.evaluate import images as images_lib
from sove_jax.evaluate import protocol

GAP = 4  # px between pictures


def principal_components(x, k=3):
  """(projections [n, k], explained-variance ratios [k]) of the rows of `x` in float64, each
  component's sign fixed so that its largest loading is positive (deterministic)."""
  x = np.asarray(x, np.float64)
  centered = x - x.mean(axis=0)
  _, s, vt = np.linalg.svd(centered, full_matrices=False)
  vt = vt[:k]
  signs = np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])
  vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
  proj = centered @ vt.T
  if proj.shape[1] < k:  # fewer rows or dimensions than components
    proj = np.pad(proj, ((0, 0), (0, k - proj.shape[1])))
    s = np.pad(s, (0, k - len(s)))
  total = np.sum(s ** 2)
  ratio = (s[:k] ** 2 / total) if total > 0 else np.zeros(k)
  return proj, ratio


def to_unit_range(proj, ratio):
  """Each component min-max scaled to [0, 1]; a component without variance (ratio ~ 0) is 0.5."""
  lo, hi = proj.min(axis=0), proj.max(axis=0)
  span = hi - lo
  live = (ratio > 1e-9) & (span > 0)
  return np.where(live, (proj - lo) / np.where(span > 0, span, 1.0), 0.5)


def border_mask(grid):
  """bool [h * w]: the patches on the border of an h x w grid."""
  h, w = grid
  m = np.zeros(grid, bool)
  m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
  return m.reshape(-1)


def pca_colors(grids, *, remove_background=False, threshold=0.5):
  """RGB float [n, h, w, 3] in [0, 1] of patch-feature grids [n, h, w, D], and a summary
  {"explained_variance", "foreground_fraction"} (see the module docstring)."""
  grids = np.asarray(grids)
  n, h, w, d = grids.shape
  x = grids.reshape(-1, d)
  proj, ratio = principal_components(x, 3)
  summary = {"explained_variance": ratio.tolist(), "foreground_fraction": 1.0}
  if not remove_background:
    return to_unit_range(proj, ratio).reshape(n, h, w, 3), summary
  first = to_unit_range(proj[:, :1], ratio[:1])[:, 0]
  if np.mean(first[np.tile(border_mask((h, w)), n)]) > np.mean(first):
    first = 1.0 - first  # the borders (background, by the heuristic) lie low
  foreground = first > threshold
  rgb = np.zeros((len(x), 3))
  if foreground.any():
    fg_proj, fg_ratio = principal_components(x[foreground], 3)
    rgb[foreground] = to_unit_range(fg_proj, fg_ratio)
    summary["explained_variance"] = fg_ratio.tolist()
  summary["foreground_fraction"] = float(np.mean(foreground))
  return rgb.reshape(n, h, w, 3), summary


def square_crop(image: Image.Image, size: int) -> Image.Image:
  """Shorter side resized to `size` (bicubic), center crop size x size."""
  w, h = image.size
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  image = image.resize((nw, nh), Image.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  return image.crop((left, top, left + size, top + size))


def layout(pictures, maps, stride):
  """uint8 [n * size + gaps, 2 * size + gap, 3]: each picture with its map (each token a block
  of stride x stride pixels) on its right, on white."""
  n, size = len(pictures), pictures[0].shape[0]
  canvas = np.full((n * size + (n - 1) * GAP, 2 * size + GAP, 3), 255, np.uint8)
  for i, (picture, rgb) in enumerate(zip(pictures, maps)):
    top = i * (size + GAP)
    canvas[top:top + size, :size] = picture
    blocks = np.repeat(np.repeat(rgb, stride, axis=0), stride, axis=1)
    canvas[top:top + size, size + GAP:] = np.round(255 * blocks).astype(np.uint8)
  return canvas


def pca_picture(config, model, paths, *, image_size=0, remove_background=False, threshold=0.5,
                batch_size=0, mesh=None):
  """(uint8 canvas, summary) for the images at `paths` (see the module docstring)."""
  if not paths:
    raise ValueError("--images needs at least one image path")
  stride = images_lib.token_stride(model)
  size = image_size or 2 * int(config.data.global_size)
  size = size // stride * stride
  if size < stride:
    raise ValueError(f"image_size {image_size} is smaller than one {stride}-px token stride")
  mesh = sharding_lib.batch_mesh() if mesh is None else mesh
  pictures = [np.asarray(square_crop(images_lib.read_image(p), size)) for p in paths]
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  apply_fn = images_lib.patch_features(model, mesh=mesh, normalize=False)
  grids = images_lib.map_images(
      apply_fn, list(range(len(pictures))),
      load=lambda i: images_lib.to_array(Image.fromarray(pictures[i]), mean, std),
      shape_of=lambda i: pictures[i].shape, mesh=mesh, batch_size=batch_size)
  rgb, summary = pca_colors(grids, remove_background=remove_background, threshold=threshold)
  summary.update(image_size=size, grid=list(grids.shape[1:3]))
  return layout(pictures, rgb, stride), summary


# --- the protocol ---------------------------------------------------------------------------------

def _evaluate(loaded, out_dir, *, images, out="", **options):
  """The picture of `loaded`'s backbone, written to `out` (default OUT_DIR/pca.png, process 0)."""
  canvas, summary = pca_picture(*loaded, list(images), **options)
  out = out or str(epath.Path(out_dir) / "pca.png")
  if jax.process_index() == 0:
    epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
    images_lib.write_png(out, canvas)
  return {**summary, "images": [str(p) for p in images], "out": out}


def _table(results, baselines):
  del baselines
  ratios = " ".join(f"{r:.3f}" for r in results["explained_variance"])
  return (f"PCA of {len(results['images'])} images at {results['image_size']} px: explained "
          f"variance {ratios}, foreground {results['foreground_fraction']:.2f} -> "
          f"{results['out']}")


def _check(options):
  missing = [str(p) for p in options["images"] if not epath.Path(p).exists()]
  if missing:
    raise FileNotFoundError(f"no image at {', '.join(missing)}")


def _options(f) -> dict:
  return dict(images=f.images, out=f.out, image_size=f.image_size,
              remove_background=f.remove_background, threshold=f.threshold,
              batch_size=f.batch_size)


def _define_flags(flags):
  flags.DEFINE_list("images", None, "Image files (local or gs://), comma-separated.",
                    required=True)
  flags.DEFINE_string("out", "", "Output PNG (default OUT_DIR/pca.png).")
  flags.DEFINE_integer("image_size", 0, "Square side, px (default twice the training crop).")
  flags.DEFINE_bool("remove_background", False, "Black out patches whose first component is "
                    "below --threshold and fit the colors on the rest (DINOv2's pictures).")
  flags.DEFINE_float("threshold", 0.5, "Background threshold on the first component, scaled "
                     "to [0, 1].")


PROTOCOL = protocol.Protocol(
    name="pca", title="patch-feature PCA", evaluate=_evaluate, define_flags=_define_flags,
    options=_options, table=_table,
    record=lambda results, options: {"protocol": "pca_dinov2", **results}, check=_check)


if __name__ == "__main__":
  protocol.main(PROTOCOL)
