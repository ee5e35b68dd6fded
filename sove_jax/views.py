"""Multi-crop views made on the accelerator, inside the jitted step: the host recipe in pure JAX.

The host path (`sove_jax.data.augment`, TensorFlow) costs ~30 ms of CPU per ImageNet image for
the paper's 2 x 224 + 10 x 96 views, far more than a small host can feed a GPU or TPU. Here the
host only decodes and fits each image to a fixed uint8 canvas (top-left, its true size
recorded); everything else runs on the device, per image, so it shards over the batch:

  draw(key, sizes, recipe)        -> parameters: crop boxes, flips, jitter factors and orders,
                                     which ops fire, blur sigmas (all from one PRNG key);
  apply(canvases, params, recipe) -> normalized float views "global" [B, 2, G, G, 3] and
                                     "local" [B, n, L, L, 3];
  make(canvases, sizes, key, recipe) = apply(canvases, draw(key, sizes, recipe), recipe).

Semantics are the host path's (torchvision's, as DINO/iBOT/SOVE use them), op for op, so the
same parameters give the same views (tests/test_views.py checks both to 1e-3):
RandomResizedCrop boxes (10 attempts, then the central crop clipped to the ratio range); the
antialiased bicubic resize (Keys' cubic, a = -0.5, widened by the downscale factor, weights
renormalized at the crop edges) as two matrix products per view, the natural form on TPUs and
GPUs; horizontal flip (the column weights run backwards); ColorJitter in a random order;
grayscale (ITU-R 601-2 luma); Gaussian blur, separable, edges replicated; solarize; mean/std
normalization. Each resize matrix spans only a window of the canvas that any box of the view's
scale range fits in (`crop_window`), not the whole canvas: the small local views cost a
fraction of a whole-canvas product.

Unlike the host path, which runs each op on the views that drew it only, every op here runs on
every view and a select keeps the views that drew it: the same views, with static shapes. An op
whose probability (or strength) is 0 in the recipe is not computed at all.

Importable without TensorFlow (GPU and TPU hosts may lack it): numpy and JAX only.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")
SOLARIZE_THRESHOLD = 128.0 / 255.0     # PIL ImageOps.solarize default
ATTEMPTS = 10                          # torchvision RandomResizedCrop's tries before the fallback
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The multi-crop recipe: the `data.*` fields of the config that shape the views (hashable).

  Field meanings are those of configs/default.py. `blur_prob` and `solarize_prob` hold one
  probability each for global view 1, global view 2 and every local view.
  """
  global_size: int
  local_size: int
  num_local: int
  global_scale: tuple[float, float]
  local_scale: tuple[float, float]
  aspect_ratio: tuple[float, float]
  flip: bool
  color_jitter_prob: float
  color_jitter: tuple[float, float, float, float]
  grayscale_prob: float
  blur_prob: tuple[float, float, float]
  blur_sigma: tuple[float, float]
  solarize_prob: tuple[float, float, float]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  @classmethod
  def from_config(cls, data_config) -> Recipe:
    """From the `data` config block (any object with these attributes)."""
    def plain(v):
      return tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else v
    return cls(**{f.name: plain(getattr(data_config, f.name)) for f in dataclasses.fields(cls)})

  def group(self, name: str) -> tuple[int, int, tuple, tuple, tuple]:
    """(views, size, scale, blur probabilities, solarize probabilities) of "global"/"local"."""
    if name == "global":
      return 2, self.global_size, self.global_scale, self.blur_prob[:2], self.solarize_prob[:2]
    n = self.num_local
    return n, self.local_size, self.local_scale, (self.blur_prob[2],) * n, \
        (self.solarize_prob[2],) * n

  @property
  def groups(self) -> tuple[str, ...]:
    return ("global", "local") if self.num_local else ("global",)

  @property
  def jitters(self) -> bool:
    return self.color_jitter_prob > 0 and max(self.color_jitter) > 0


class ViewParams(NamedTuple):
  """Everything random about a group of views [B, V] (a pytree; `draw` makes it from a key)."""
  boxes: jax.Array     # int32 [B, V, 4]: top, left, height, width, in the image's pixels
  flip: jax.Array      # bool [B, V]: mirrored left-right
  jitter: jax.Array    # bool [B, V]: ColorJitter fires
  factors: jax.Array   # float32 [B, V, 4]: brightness, contrast, saturation factors; hue shift
  order: jax.Array     # int32 [B, V, 4]: permutation of (0 brightness, 1 contrast, 2 sat., 3 hue)
  gray: jax.Array      # bool [B, V]: RandomGrayscale fires
  blur: jax.Array      # bool [B, V]: Gaussian blur fires...
  sigma: jax.Array     # float32 [B, V]: ...with this sigma
  solarize: jax.Array  # bool [B, V]: solarize fires


# --- drawing --------------------------------------------------------------------------------------

UNIFORMS = 4 * ATTEMPTS + 14  # per view: box attempts, flip, 13 photometric decisions


def _boxes(u, sizes, scale, ratio) -> jax.Array:
  """Boxes from uniforms u [B, V, attempts, 4] (see `draw_boxes`)."""
  H = sizes[:, 0].astype(jnp.float32)[:, None, None]
  W = sizes[:, 1].astype(jnp.float32)[:, None, None]
  area = H * W * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + u[..., 1] * (log_hi - log_lo))
  w = jnp.round(jnp.sqrt(area * aspect))
  h = jnp.round(jnp.sqrt(area / aspect))
  fits = (w > 0) & (h > 0) & (w <= W) & (h <= H)
  top = jnp.floor(u[..., 2] * (H - h + 1))
  left = jnp.floor(u[..., 3] * (W - w + 1))
  first = jnp.argmax(fits, axis=-1)[..., None]
  drawn = jnp.stack([jnp.take_along_axis(t, first, -1)[..., 0] for t in (top, left, h, w)], -1)
  # Fallback: the central crop with the aspect ratio clipped into range.
  H, W = H[..., 0], W[..., 0]
  in_ratio = W / H
  fw = jnp.where(in_ratio > ratio[1], jnp.round(H * ratio[1]), W)
  fh = jnp.where(in_ratio < ratio[0], jnp.round(W / ratio[0]), H)
  fallback = jnp.stack([jnp.floor((H - fh) / 2), jnp.floor((W - fw) / 2), fh, fw], -1)
  boxes = jnp.where(jnp.any(fits, axis=-1)[..., None], drawn, jnp.broadcast_to(fallback,
                                                                               drawn.shape))
  return boxes.astype(jnp.int32)


def draw_boxes(key, sizes, views: int, scale, ratio, attempts: int = ATTEMPTS) -> jax.Array:
  """torchvision RandomResizedCrop.get_params for `views` boxes per image: int32 [B, views, 4].

  sizes [B, 2]: each image's (height, width). Each box is (top, left, h, w): area fraction
  uniform in `scale`, log aspect ratio (w / h) uniform in log(`ratio`), w and h rounded (half to
  even, as Python's round); the first of `attempts` draws that fits the image wins, else the
  whole image clipped to the ratio range, centered.
  """
  u = jax.random.uniform(key, (sizes.shape[0], views, attempts, 4))
  return _boxes(u, sizes, scale, ratio)


def _group(u, sizes, recipe: Recipe, name: str) -> ViewParams:
  """A group's parameters from uniforms u [B, V, UNIFORMS]."""
  views, _, scale, blur_prob, solarize_prob = recipe.group(name)
  boxes = _boxes(u[..., :4 * ATTEMPTS].reshape(u.shape[:2] + (ATTEMPTS, 4)), sizes, scale,
                 recipe.aspect_ratio)
  flip = u[..., 4 * ATTEMPTS] < 0.5
  if not recipe.flip:
    flip = jnp.zeros_like(flip)
  # One uniform per decision, laid out as the host path's (augment.draw_photometric).
  u = u[..., 4 * ATTEMPTS + 1:]
  span = lambda v, r: (1.0 - min(v, 1.0)) + r * (min(v, 1.0) + v)  # uniform in [max(0, 1-v), 1+v]
  b, c, s, h = recipe.color_jitter
  factors = jnp.stack([span(b, u[..., 1]), span(c, u[..., 2]), span(s, u[..., 3]),
                       (2.0 * u[..., 4] - 1.0) * h], -1)
  lo, hi = recipe.blur_sigma
  return ViewParams(
      boxes=boxes, flip=flip,
      jitter=u[..., 0] < recipe.color_jitter_prob, factors=factors,
      order=jnp.argsort(u[..., 5:9], axis=-1).astype(jnp.int32),
      gray=u[..., 9] < recipe.grayscale_prob,
      blur=u[..., 10] < jnp.asarray(blur_prob, jnp.float32),
      sigma=lo + u[..., 11] * (hi - lo),
      solarize=u[..., 12] < jnp.asarray(solarize_prob, jnp.float32))


def draw_group(key, sizes, recipe: Recipe, name: str) -> ViewParams:
  """The parameters of the "global" or "local" views of each image, from `key`."""
  views = recipe.group(name)[0]
  return _group(jax.random.uniform(key, (sizes.shape[0], views, UNIFORMS)), sizes, recipe, name)


def draw(key, sizes, recipe: Recipe) -> dict[str, ViewParams]:
  """All views' parameters, {"global": ..., "local": ...}, from `key` and sizes int [B, 2].

  One array of uniforms, [B, 2 + n, UNIFORMS], feeds every decision (one generator to compile,
  not one per decision). A function of the key and the batch size only: the same key gives the
  same parameters on any number of devices (JAX's threefry draws are partitionable).
  """
  u = jax.random.uniform(key, (sizes.shape[0], 2 + recipe.num_local, UNIFORMS))
  out = {"global": _group(u[:, :2], sizes, recipe, "global")}
  if recipe.num_local:
    out["local"] = _group(u[:, 2:], sizes, recipe, "local")
  return out


# --- geometry -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def crop_window(canvas: tuple[int, int], scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[int, int]:
  """(rows, cols) of a canvas window that holds every box `draw_boxes` can return.

  Taken over every true image size the canvas can hold, from the extremes of the draws (area
  fraction up to scale[1], aspect ratio in `ratio`, sides rounded) and, where a draw can fail,
  torchvision's fallback box; one pixel of slack covers float32 rounding. Global views (scale up
  to 1) need the whole canvas; local views a fraction of it.
  """
  Hc, Wc = canvas
  H = np.arange(1, Hc + 1, dtype=np.float64)[:, None]
  W = np.arange(1, Wc + 1, dtype=np.float64)[None, :]
  s0, s1 = scale
  q0, q1 = ratio
  area_lo, area_hi = s0 * H * W, s1 * H * W
  h_hi, w_hi = np.sqrt(area_hi / q0), np.sqrt(area_hi * q1)  # before rounding
  h_lo, w_lo = np.sqrt(area_lo / q1), np.sqrt(area_lo * q0)
  eps = 1e-3  # conservative at the rounding edges: a wider window is only slower
  can_fail = ((h_lo < 0.5 + eps) | (w_lo < 0.5 + eps) | (h_hi > H - 0.5 - eps)
              | (w_hi > W - 0.5 - eps))
  in_ratio = W / H
  fw = np.where(in_ratio > q1, np.round(H * q1), W)
  fh = np.where(in_ratio < q0, np.round(W / q0), H)
  rows = np.maximum(np.minimum(H, np.round(h_hi) + 1), np.where(can_fail, fh, 0))
  cols = np.maximum(np.minimum(W, np.round(w_hi) + 1), np.where(can_fail, fw, 0))
  return int(min(Hc, rows.max())), int(min(Wc, cols.max()))


def _keys_cubic(x):
  """Keys' cubic convolution kernel with a = -0.5 (PIL's and TensorFlow's bicubic)."""
  x = jnp.abs(x)
  near = ((1.5 * x - 2.5) * x) * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resize_weights(start, length, window_start, window: int, out_size: int) -> jax.Array:
  """[..., out_size, window]: row o resamples pixels [start, start + length) to output pixel o.

  Columns are the canvas pixels window_start + [0, window). Antialiased bicubic as
  tf.image.resize(method="bicubic", antialias=True) and PIL compute it on the cut-out crop:
  kernel widened by max(1, length / out_size), weights outside the crop zero, rows renormalized.
  """
  start = start.astype(jnp.float32)[..., None, None]
  length = length.astype(jnp.float32)[..., None, None]
  out_pos = jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5
  pixel = window_start[..., None, None] + jnp.arange(window)[None, :]
  in_pos = pixel.astype(jnp.float32) + 0.5
  sample = start + out_pos * (length / out_size)
  kernel_scale = jnp.maximum(1.0, length / out_size)
  w = _keys_cubic((in_pos - sample) / kernel_scale)
  w = jnp.where((in_pos > start) & (in_pos < start + length), w, 0.0)
  return w / jnp.sum(w, axis=-1, keepdims=True)


def resized_crops(canvases, boxes, size: int, flip=None, window=None,
                  precision=HIGHEST) -> jax.Array:
  """Views cut from canvases uint8 [B, Hc, Wc, C], boxes [B, V, 4] -> float [B, V, s, s, C].

  Values in [0, 1]. `flip` [B, V] (bool) mirrors views left-right: their column weights run
  backwards. `window` (rows, cols) bounds every box (`crop_window`; default the whole canvas):
  each view's two resize matrices span the window placed over its box, not the canvas.
  `precision` of the two products: HIGHEST keeps float32 weights whole (TPUs and recent GPUs
  would otherwise round them to bfloat16 or TF32, ~1e-3 off).
  """
  B, Hc, Wc, C = canvases.shape
  Kh, Kw = window or (Hc, Wc)
  top, left, h, w = (boxes[..., i] for i in range(4))
  y0 = jnp.clip(top, 0, Hc - Kh)
  x0 = jnp.clip(left, 0, Wc - Kw)
  wy = resize_weights(top, h, y0, Kh, size)   # [B, V, s, Kh]
  wx = resize_weights(left, w, x0, Kw, size)  # [B, V, s, Kw]
  if flip is not None:
    wx = jnp.where(flip[..., None, None], wx[..., ::-1, :], wx)
  if (Kh, Kw) == (Hc, Wc):
    rows = jnp.einsum("bvsh,bhwc->bvswc", wy, canvases.astype(jnp.float32), precision=precision)
  else:
    cut = lambda image, y, x: jax.lax.dynamic_slice(image, (y, x, 0), (Kh, Kw, C))
    windows = jax.vmap(jax.vmap(cut, (None, 0, 0)))(canvases, y0, x0)  # [B, V, Kh, Kw, C]
    rows = jnp.einsum("bvsh,bvhwc->bvswc", wy, windows.astype(jnp.float32), precision=precision)
  out = jnp.einsum("bvtw,bvswc->bvstc", wx, rows, precision=precision)
  return jnp.clip(out, 0.0, 255.0) / 255.0


# --- photometric ----------------------------------------------------------------------------------
# Views x [..., S, S, C] in [0, 1] with per-view parameters [...]: every op is elementwise or a
# reduction within one view, so the leading (batch, view) axes shard freely.

def _per_view(t):
  return t[..., None, None, None]


def grayscale(x):
  """[..., C] -> [..., 1] luma; a gray image (C = 1) is its own luma."""
  if x.shape[-1] == 1:
    return x
  r, g, b = GRAY_WEIGHTS
  return x[..., :1] * r + x[..., 1:2] * g + x[..., 2:] * b


def blend(x, f, op):
  """Brightness (op 0), contrast (1) or saturation (2) per view: clip(f x + (1 - f) target).

  The target is black, the view's mean gray level, or each pixel's gray (torchvision/PIL).
  """
  gray = grayscale(x)
  mean = jnp.mean(gray, axis=(-3, -2, -1), keepdims=True)
  op, f = _per_view(op), _per_view(f)
  target = jnp.where(op == 0, 0.0, jnp.where(op == 1, mean, gray))
  return jnp.clip(f * x + (1.0 - f) * target, 0.0, 1.0)


def adjust_hue(x, shift):
  """Rotate hue by `shift` turns [...] in HSV, as torchvision's adjust_hue; x [..., S, S, 3]."""
  r, g, b = x[..., :1], x[..., 1:2], x[..., 2:]
  v = jnp.maximum(jnp.maximum(r, g), b)
  chroma = v - jnp.minimum(jnp.minimum(r, g), b)
  c = jnp.where(chroma > 0, chroma, 1.0)
  h = jnp.where(v == r, (g - b) / c, jnp.where(v == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c)) / 6.0
  h = jnp.where(chroma > 0, h, 0.0)
  s = jnp.where(v > 0, chroma / jnp.where(v > 0, v, 1.0), 0.0)
  h = jnp.mod(h + _per_view(shift), 1.0)
  # HSV -> RGB as piecewise-linear ramps of 6 h.
  dh = 6.0 * h
  ramps = (jnp.abs(dh - 3.0) - 1.0, 2.0 - jnp.abs(dh - 2.0), 2.0 - jnp.abs(dh - 4.0))
  return jnp.concatenate([((1.0 - s) + s * jnp.clip(d, 0.0, 1.0)) * v for d in ramps], -1)


def color_jitter(x, factors, order, with_hue: bool = True):
  """torchvision ColorJitter with drawn parameters, per view; see `ViewParams` for the layout.

  The hue rotation (the costly op) runs once per view wherever the order puts it: the three
  blends run in order up to it (every prefix is kept), the prefix the order asks for is rotated,
  and the blends after it follow. A gray view (C = 1) has no hue to rotate, nor does a hue
  range of 0 (`with_hue` False): three blends.
  """
  with_hue = with_hue and x.shape[-1] == 3
  # The three blends in their order: stable argsort pushes the hue (3) to the end.
  blends = jnp.take_along_axis(order, jnp.argsort(order == 3, axis=-1, stable=True), -1)[..., :3]
  f = jnp.take_along_axis(factors, blends, -1)
  prefixes = [x]
  for j in range(3):
    prefixes.append(blend(prefixes[-1], f[..., j], blends[..., j]))
  if not with_hue:
    return prefixes[-1]
  hue_at = jnp.argmax(order == 3, axis=-1)  # blends before the hue
  y = prefixes[0]
  for j in range(1, 4):
    y = jnp.where(_per_view(hue_at == j), prefixes[j], y)
  y = adjust_hue(y, factors[..., 3])
  for j in range(3):
    y = jnp.where(_per_view(hue_at <= j), blend(y, f[..., j], blends[..., j]), y)
  return y


def blur_radius(recipe: Recipe, size: int) -> int:
  """Taps each side of the blur kernel: 3 sigma of the widest blur, within the view."""
  return max(1, min(math.ceil(3 * recipe.blur_sigma[1]), size - 1))


def gaussian_blur(x, sigma, radius: int):
  """Separable Gaussian blur per view, sigma [...] (~0: none), edges replicated (as PIL).

  Each axis is a weighted sum of 2 radius + 1 shifted copies of the edge-padded views.
  """
  S = x.shape[-3]
  radius = max(1, min(radius, S - 1))
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  s = jnp.maximum(sigma, 1e-6)[..., None]
  k = jnp.exp(-0.5 * jnp.square(t / s))
  k = k / jnp.sum(k, axis=-1, keepdims=True)  # [..., 2r + 1]

  def along(x, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="edge")
    n = x.shape[axis]
    out = _per_view(k[..., 0]) * jax.lax.slice_in_dim(padded, 0, n, axis=axis % x.ndim)
    for i in range(1, 2 * radius + 1):
      out = out + _per_view(k[..., i]) * jax.lax.slice_in_dim(padded, i, i + n, axis=axis % x.ndim)
    return out
  return along(along(x, -3), -2)


def solarize(x, on):
  """Invert the pixels at or above the threshold in views where `on` [...]."""
  return jnp.where(_per_view(on) & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)


def photometric(x, params: ViewParams, recipe: Recipe, blur_prob, solarize_prob) -> jax.Array:
  """Color jitter, grayscale, blur, solarize (each where drawn) on views [B, V, S, S, C]."""
  C = x.shape[-1]
  if recipe.jitters:
    jittered = color_jitter(x, params.factors, params.order, with_hue=recipe.color_jitter[3] > 0)
    x = jnp.where(_per_view(params.jitter), jittered, x)
  if recipe.grayscale_prob > 0 and C == 3:
    x = jnp.where(_per_view(params.gray), jnp.broadcast_to(grayscale(x), x.shape), x)
  if max(blur_prob) > 0:
    blurred = gaussian_blur(x, params.sigma, blur_radius(recipe, x.shape[-3]))
    x = jnp.where(_per_view(params.blur), blurred, x)
  if max(solarize_prob) > 0:
    x = solarize(x, params.solarize)
  return x


def normalize(x, mean, std):
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# --- the recipe -----------------------------------------------------------------------------------

def apply(canvases, params: dict[str, ViewParams], recipe: Recipe,
          precision=HIGHEST) -> dict[str, jax.Array]:
  """Views from canvases uint8 [B, Hc, Wc, C] (C = 1 or 3) with drawn `params`.

  Returns normalized float32 "global" [B, 2, G, G, 3] and, when num_local > 0, "local"
  [B, n, L, L, 3]. A gray canvas (C = 1) is processed in one channel and repeated at the end:
  the same views as from its three equal channels, at a third of the cost.
  """
  out = {}
  for name in recipe.groups:
    _, size, scale, blur_prob, solarize_prob = recipe.group(name)
    p = params[name]
    window = crop_window(tuple(canvases.shape[1:3]), scale, recipe.aspect_ratio)
    x = resized_crops(canvases, p.boxes, size, p.flip if recipe.flip else None, window, precision)
    x = photometric(x, p, recipe, blur_prob, solarize_prob)
    if x.shape[-1] == 1:
      x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    out[name] = normalize(x, recipe.mean, recipe.std)
  return out


def make(canvases, sizes, key, recipe: Recipe, precision=HIGHEST) -> dict[str, jax.Array]:
  """The training views of a batch: canvases uint8 [B, Hc, Wc, C], true sizes int [B, 2].

  Each image fills the top-left sizes[b] of its canvas (the rest is ignored). The same key
  gives the same views.
  """
  return apply(canvases, draw(key, sizes, recipe), recipe, precision)
