"""Multi-crop views (docs/method.md §9) as TensorFlow ops, and the evaluation resize + center crop.

The recipe is DINO's/iBOT's torchvision one: RandomResizedCrop (bicubic, antialiased like PIL),
horizontal flip, ColorJitter applied with probability p in a random order, RandomGrayscale,
Gaussian blur and solarize with per-view probabilities, then mean/std normalization. The flip is
done while cropping (it commutes with everything after it), where it costs nothing.

Randomness is stateless: every draw is a function of an explicit seed, so the pipeline gives the
same views whatever the thread scheduling. Photometric ops work on a whole batch of views at once
with per-view parameters (one op per batch instead of one per image is what makes the small-image
recipe cheap). Two crop paths share one geometry: `resized_crop` cuts one view from an image of
any size with tf.image.resize; `resized_crops` cuts many views from a batch of same-size images
with two matrix products whose weights are exactly that resize kernel (Keys cubic, a = -0.5,
widened by the downscale factor, renormalized at the crop edges).

sove_jax/views.py makes the same views on the accelerator from uint8 canvases (tests/test_views.py
holds the two to the same parameters and the same distributions).
"""
from __future__ import annotations

import math

import tensorflow as tf

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")
SOLARIZE_THRESHOLD = 128.0 / 255.0     # PIL ImageOps.solarize default


def fold(seed, data) -> tf.Tensor:
  """A new stateless seed from `seed` and an integer: independent streams for each use."""
  return tf.random.experimental.stateless_fold_in(seed, tf.cast(data, tf.int64))


# --- geometry -------------------------------------------------------------------------------------

def draw_crop_boxes(seed, shape, height, width, scale, ratio, attempts: int = 10) -> tf.Tensor:
  """torchvision RandomResizedCrop.get_params, vectorized over `shape`: int32 [*shape, 4].

  Each box is (top, left, h, w): area fraction uniform in `scale`, log aspect ratio (w / h)
  uniform in log(`ratio`), w and h rounded; the first of `attempts` draws that fits the image
  wins, else the whole image clipped to the ratio range, centered (torchvision's fallback).
  `height` and `width` broadcast against `shape` (scalars, or one per image).
  """
  shape = list(shape)
  u = tf.random.stateless_uniform(shape + [attempts, 4], seed)
  H = tf.cast(tf.broadcast_to(height, shape), tf.float32)[..., None]
  W = tf.cast(tf.broadcast_to(width, shape), tf.float32)[..., None]
  area = H * W * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + u[..., 1] * (log_hi - log_lo))
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (h > 0) & (w <= W) & (h <= H)
  top = tf.floor(u[..., 2] * (H - h + 1))
  left = tf.floor(u[..., 3] * (W - w + 1))
  first = tf.argmax(tf.cast(fits, tf.int32), axis=-1, output_type=tf.int32)[..., None]
  pick = lambda t: tf.gather(t, first, axis=-1, batch_dims=len(shape))[..., 0]
  drawn = tf.stack([pick(top), pick(left), pick(h), pick(w)], axis=-1)
  # Fallback: the central crop with the aspect ratio clipped into range.
  H, W = H[..., 0], W[..., 0]
  in_ratio = W / H
  fw = tf.where(in_ratio < ratio[0], W, tf.where(in_ratio > ratio[1], tf.round(H * ratio[1]), W))
  fh = tf.where(in_ratio < ratio[0], tf.round(W / ratio[0]), H)
  fallback = tf.stack([tf.floor((H - fh) / 2), tf.floor((W - fw) / 2), fh, fw], axis=-1)
  boxes = tf.where(tf.reduce_any(fits, axis=-1)[..., None], drawn, fallback)
  return tf.cast(boxes, tf.int32)


def _keys_cubic(x):
  """Keys' cubic convolution kernel with a = -0.5 (PIL's and TensorFlow's bicubic)."""
  x = tf.abs(x)
  near = ((1.5 * x - 2.5) * x) * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def resize_weights(start, length, in_size: int, out_size: int) -> tf.Tensor:
  """[..., out_size, in_size]: row o resamples pixels [start, start + length) to output pixel o.

  Antialiased bicubic as tf.image.resize(method="bicubic", antialias=True) computes it on the
  cut-out crop: kernel widened by max(1, length / out_size), weights outside the crop zero,
  each row renormalized.
  """
  start = tf.cast(start, tf.float32)[..., None, None]
  length = tf.cast(length, tf.float32)[..., None, None]
  out_pos = tf.range(out_size, dtype=tf.float32)[:, None] + 0.5
  in_pos = tf.range(in_size, dtype=tf.float32)[None, :] + 0.5
  sample = start + out_pos * (length / out_size)
  kernel_scale = tf.maximum(1.0, length / out_size)
  w = _keys_cubic((in_pos - sample) / kernel_scale)
  inside = (in_pos > start) & (in_pos < start + length)
  w = tf.where(inside, w, 0.0)
  return w / tf.reduce_sum(w, axis=-1, keepdims=True)


def resized_crops(images, boxes, size: int, flip=None) -> tf.Tensor:
  """Views from a batch of same-size images: uint8 [B, H, W, C], boxes [B, V, 4] -> [B, V, s, s, C].

  Values in [0, 1]. `flip` [B, V] (bool) mirrors views left-right, for free: their column
  weights run backwards.
  """
  H, W = images.shape[1], images.shape[2]
  wy = resize_weights(boxes[..., 0], boxes[..., 2], H, size)  # [B, V, s, H]
  wx = resize_weights(boxes[..., 1], boxes[..., 3], W, size)  # [B, V, s, W]
  if flip is not None:
    wx = tf.where(flip[..., None, None], tf.reverse(wx, axis=[-2]), wx)
  x = tf.cast(images, tf.float32)
  rows = tf.einsum("bvsh,bhwc->bvswc", wy, x)
  out = tf.einsum("bvtw,bvswc->bvstc", wx, rows)
  return tf.clip_by_value(out, 0.0, 255.0) / 255.0


def translate(views, shifts) -> tf.Tensor:
  """Views [..., S, S, C] moved by `shifts` int [..., 2] pixels (down, right; negative: up,
  left), the uncovered border black (0) and what leaves the frame dropped: pad-and-crop
  translation, as matrices of shifted identities, so every view moves by its own amount."""
  size = views.shape[-2]
  out = tf.range(size)
  move = lambda d: tf.one_hot(out - d[..., None], size, dtype=views.dtype)  # [..., S, S]
  rows = tf.einsum("...ti,...ijc->...tjc", move(shifts[..., 0]), views)
  return tf.einsum("...uj,...tjc->...tuc", move(shifts[..., 1]), rows)


def resized_crop(image, box, size: int, flip=None) -> tf.Tensor:
  """One view from an image of any size: uint8 [H, W, C], box (top, left, h, w) -> [s, s, C].

  Values in [0, 1]. `flip` (scalar bool) mirrors the view left-right.
  """
  crop = image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
  out = tf.image.resize(tf.cast(crop, tf.float32), [size, size], method="bicubic", antialias=True)
  out = tf.clip_by_value(out, 0.0, 255.0) / 255.0
  if flip is not None:
    out = tf.cond(flip, lambda: tf.reverse(out, axis=[1]), lambda: out)
  return out


# --- photometric ----------------------------------------------------------------------------------

def grayscale(x):
  """[..., 3] -> [..., 1] luma (slices: a reduction over a last axis of 3 is slow in TF)."""
  r, g, b = GRAY_WEIGHTS
  return x[..., :1] * r + x[..., 1:2] * g + x[..., 2:] * b


def adjust_hue(x, shift):
  """Rotate hue by `shift` turns in HSV, as torchvision's adjust_hue; x [..., 3] in [0, 1].

  RGB -> HSV is written out in elementwise ops: faster here than tf.image.rgb_to_hsv.
  """
  r, g, b = x[..., :1], x[..., 1:2], x[..., 2:]
  v = tf.maximum(tf.maximum(r, g), b)
  chroma = v - tf.minimum(tf.minimum(r, g), b)
  c = tf.where(chroma > 0, chroma, 1.0)
  h = tf.where(v == r, (g - b) / c, tf.where(v == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c)) / 6.0
  h = tf.where(chroma > 0, h, 0.0)
  s = tf.where(v > 0, chroma / tf.where(v > 0, v, 1.0), 0.0)
  h = tf.math.floormod(h + shift, 1.0)
  return tf.image.hsv_to_rgb(tf.concat([h, s, v], axis=-1))


def _blend(x, f, op):
  """One of brightness (op 0), contrast (1), saturation (2) per image: clip(f x + (1 - f) t).

  The target t is black, the image's mean gray level, or each pixel's gray, as torchvision/PIL.
  """
  gray = x if x.shape[-1] == 1 else grayscale(x)
  mean = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
  op, f = op[:, None, None, None], f[:, None, None, None]
  target = tf.where(op == 0, 0.0, tf.where(op == 1, mean, gray))
  return tf.clip_by_value(f * x + (1.0 - f) * target, 0.0, 1.0)


def color_jitter(x, factors, order, with_hue: bool = True):
  """torchvision ColorJitter with drawn parameters, per image: x [n, S, S, C] in [0, 1].

  factors [n, 4]: brightness, contrast, saturation factors and hue shift; order [n, 4]: a
  permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue), applied in that order.
  Images are grouped by how many ops precede hue, so each group runs exactly three blends and
  one hue rotation. Hue is an identity when `with_hue` is False (a hue range of 0): three blends
  only. C = 1 is a gray image, on which saturation (its target is the image itself) and hue are
  identities: brightness and contrast only, in their drawn order.
  """
  if x.shape[-1] == 1:
    kept = tf.reshape(tf.boolean_mask(order, order < 2), [-1, 2])   # brightness, contrast
    for j in range(2):
      x = _blend(x, tf.gather(factors, kept[:, j], batch_dims=1), kept[:, j])
    return x
  cheap = tf.reshape(tf.boolean_mask(order, order != 3), [-1, 3])  # the three blends, in order

  def run(x, factors, cheap, hue_at):
    for j in range(3):
      if j == hue_at:
        x = adjust_hue(x, factors[:, 3, None, None, None])
      x = _blend(x, tf.gather(factors, cheap[:, j], batch_dims=1), cheap[:, j])
    if hue_at == 3:
      x = adjust_hue(x, factors[:, 3, None, None, None])
    return x

  if not with_hue:
    return run(x, factors, cheap, hue_at=None)
  before_hue = tf.argmax(tf.cast(tf.equal(order, 3), tf.int32), axis=1, output_type=tf.int32)
  groups = tf.dynamic_partition(tf.range(tf.shape(x)[0]), before_hue, 4)
  parts = [run(tf.gather(x, g), tf.gather(factors, g), tf.gather(cheap, g), k)
           for k, g in enumerate(groups)]
  return tf.dynamic_stitch(groups, parts)


def _on_rows(on, fn, x, *args):
  """fn(x[on], *args[on]) put back in place; rows where `on` is False are not computed."""
  on = tf.cast(on, tf.int32)
  rows = tf.dynamic_partition(tf.range(tf.shape(x)[0]), on, 2)
  picked = [tf.gather(a, rows[1]) for a in (x, *args)]
  # Convolutions refuse 0 images.
  done = tf.cond(tf.size(rows[1]) > 0, lambda: fn(*picked), lambda: picked[0])
  return tf.dynamic_stitch(rows, [tf.gather(x, rows[0]), done])


def gaussian_blur(x, sigma, radius: int):
  """Per-image Gaussian blur, x [n, S, S, C], sigma [n] (0 = no blur); edges replicated as PIL.

  Separable: the n*C planes become channels of one depthwise convolution, so every image gets
  its own kernel in a single op per axis.
  """
  n, S, C = tf.shape(x)[0], x.shape[1], x.shape[3]
  radius = max(1, min(radius, S - 1))
  t = tf.range(-radius, radius + 1, dtype=tf.float32)
  s = tf.maximum(sigma, 1e-6)[:, None]
  k = tf.exp(-0.5 * tf.square(t[None, :] / s))
  k = k / tf.reduce_sum(k, axis=1, keepdims=True)  # [n, 2r+1]; sigma ~ 0 -> delta
  k = tf.reshape(tf.tile(k[:, None, :], [1, C, 1]), [-1, 2 * radius + 1])  # [n*C, 2r+1]
  kernel = tf.transpose(k)[:, None, :, None]  # [2r+1, 1, n*C, 1]
  planes = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, S, S, -1])  # [1, S, S, n*C]
  edge = tf.clip_by_value(tf.range(-radius, S + radius), 0, S - 1)
  planes = tf.gather(planes, edge, axis=1)
  planes = tf.nn.depthwise_conv2d(planes, kernel, [1, 1, 1, 1], "VALID")
  planes = tf.gather(planes, edge, axis=2)
  planes = tf.nn.depthwise_conv2d(planes, tf.transpose(kernel, [1, 0, 2, 3]), [1, 1, 1, 1], "VALID")
  return tf.transpose(tf.reshape(planes, [S, S, n, C]), [2, 0, 1, 3])


def draw_photometric(seed, batch, views: int, *, jitter_prob: float, jitter, gray_prob: float,
                     blur_prob, blur_sigma, solarize_prob) -> dict:
  """The photometric parameters of views [batch, views], drawn from `seed` (see `photometric`).

  Returns "jitter" (bool: ColorJitter fires), "factors" [batch, views, 4] (brightness, contrast,
  saturation factors, hue shift), "order" [batch, views, 4] (a permutation of the four),
  "gray", "blur" (bool), "sigma" (blur sigma) and "solarize" (bool), all [batch, views] unless
  said. An op that cannot fire with these probabilities (or strengths) is None, and is skipped.
  """
  u = tf.random.stateless_uniform([batch, views, 13], seed)
  per_view = lambda p: tf.constant(p, tf.float32)[None, :]
  b, c, s, h = jitter
  out = dict.fromkeys(("jitter", "factors", "order", "gray", "blur", "sigma", "solarize"))
  if jitter_prob > 0 and any(v > 0 for v in jitter):
    span = lambda v, r: (1.0 - min(v, 1.0)) + r * (min(v, 1.0) + v)  # uniform in [max(0, 1-v), 1+v]
    out["jitter"] = u[..., 0] < jitter_prob
    out["factors"] = tf.stack([span(b, u[..., 1]), span(c, u[..., 2]), span(s, u[..., 3]),
                               (2.0 * u[..., 4] - 1.0) * h], -1)
    out["order"] = tf.cast(tf.argsort(u[..., 5:9], axis=-1), tf.int32)
  if gray_prob > 0:
    out["gray"] = u[..., 9] < gray_prob
  if max(blur_prob) > 0:
    out["blur"] = u[..., 10] < per_view(blur_prob)
    out["sigma"] = blur_sigma[0] + u[..., 11] * (blur_sigma[1] - blur_sigma[0])
  if max(solarize_prob) > 0:
    out["solarize"] = u[..., 12] < per_view(solarize_prob)
  return out


def apply_photometric(views, params: dict, *, jitter, blur_sigma) -> tf.Tensor:
  """Color jitter, grayscale, blur, solarize with drawn `params` on views [B, V, S, S, C].

  `jitter` (the four strengths) and `blur_sigma` (its range) fix what does not vary per view:
  whether hue runs at all, and the blur kernel's radius, 3 sigma of the widest blur.
  """
  B, V, S, C = tf.shape(views)[0], views.shape[1], views.shape[2], views.shape[4]
  n = B * V
  x = tf.reshape(views, [n, S, S, C])
  flat = lambda t: tf.reshape(t, tf.concat([[n], tf.shape(t)[2:]], 0))
  if params["jitter"] is not None:
    jittered = lambda x, f, o: color_jitter(x, f, o, with_hue=jitter[3] > 0)
    x = _on_rows(flat(params["jitter"]), jittered, x, flat(params["factors"]),
                 flat(params["order"]))
  if params["gray"] is not None and C == 3:
    x = _on_rows(flat(params["gray"]), lambda x: tf.tile(grayscale(x), [1, 1, 1, 3]), x)
  if params["blur"] is not None:
    radius = math.ceil(3 * blur_sigma[1])
    x = _on_rows(flat(params["blur"]), lambda x, s: gaussian_blur(x, s, radius), x,
                 flat(params["sigma"]))
  if params["solarize"] is not None:
    on = flat(params["solarize"])[:, None, None, None]
    x = tf.where(on & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)
  return tf.reshape(x, [B, V, S, S, C])


def photometric(views, seed, *, jitter_prob: float, jitter, gray_prob: float, blur_prob, blur_sigma,
                solarize_prob) -> tf.Tensor:
  """Color jitter, grayscale, blur, solarize on views float [B, V, S, S, C] in [0, 1].

  (The flip comes with the crop.) `blur_prob` and `solarize_prob` hold one probability per view
  index (global 1, global 2, or the same for every local); everything else is shared by all
  views. Each op runs on the views that drew it only. C = 1 stands for a gray image in 3 equal
  channels: the result is the same as on those 3 channels, at a third of the cost (the caller
  repeats the channel afterwards). Drawing (`draw_photometric`) and applying
  (`apply_photometric`) are separate so that other implementations can be checked against this
  one with the same parameters.
  """
  params = draw_photometric(seed, tf.shape(views)[0], views.shape[1], jitter_prob=jitter_prob,
                            jitter=jitter, gray_prob=gray_prob, blur_prob=blur_prob,
                            blur_sigma=blur_sigma, solarize_prob=solarize_prob)
  return apply_photometric(views, params, jitter=jitter, blur_sigma=blur_sigma)


def normalize(x, mean, std):
  return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


# --- evaluation -----------------------------------------------------------------------------------

def eval_view(image, resize: int, crop: int) -> tf.Tensor:
  """torchvision Resize(resize) (shorter side, bicubic, antialiased) + CenterCrop(crop).

  image uint8 [..., H, W, C] (one image or a batch of one size) -> float [..., crop, crop, C] in
  [0, 1].
  """
  H, W = tf.shape(image)[-3], tf.shape(image)[-2]
  x = tf.cast(image, tf.float32)
  static = image.shape[-3:-1]
  if not (static[0] == static[1] == resize):
    Hf, Wf = tf.cast(H, tf.float32), tf.cast(W, tf.float32)
    short = tf.minimum(Hf, Wf)
    nh = tf.where(Hf <= Wf, resize, tf.cast(resize * Hf / short, tf.int32))
    nw = tf.where(Wf < Hf, resize, tf.cast(resize * Wf / short, tf.int32))
    x = tf.image.resize(x, tf.stack([nh, nw]), method="bicubic", antialias=True)
    H, W = nh, nw
  top = tf.cast(tf.round(tf.cast(H - crop, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(W - crop, tf.float32) / 2), tf.int32)
  x = x[..., top:top + crop, left:left + crop, :]
  x = tf.ensure_shape(x, image.shape[:-3] + (crop, crop, image.shape[-1]))
  return tf.clip_by_value(x, 0.0, 255.0) / 255.0
