"""RandAugment and random erasing for fine-tuning, as timm gives them to BEiT and iBOT.

Fine-tuning's training images (`data/labeled.py`) go through, after the random-resized crop and
flip: timm's RandAugment `rand-m9-mstd0.5-inc1` on the 8-bit image, then the mean/std
normalization, then `RandomErasing(0.25, mode="pixel")`, as `timm.data.create_transform(...,
auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel")` composes them.

RandAugment `rand-m9-mstd0.5-inc1`: two ops drawn with replacement from the 15 of timm's
"increasing" set (`OPS`), each applied with probability 0.5 at a magnitude drawn from N(9, 0.5)
and clipped to [0, 10]; rotations, shears, translations and the enhance factors take a random
sign. What each op does at magnitude m is `_op`'s table; every op returns 8-bit values, as PIL's
do (tests/test_finetune.py holds each to PIL's). Geometric ops fill with the dataset mean (timm's
`img_mean`) and sample bilinearly (timm asks PIL for bicubic; TensorFlow's projective transform
has no bicubic).

Random erasing: with probability 0.25, one rectangle of 2%-33% of the area and aspect ratio in
[0.3, 1/0.3] (log-uniform; the first of 10 draws that fits) is replaced by N(0, 1) noise per
pixel and channel, in the normalized image.

Randomness is stateless, from the caller's key: the same image and key give the same output.
"""
from __future__ import annotations

import math

import tensorflow as tf

# timm's _RAND_INCREASING_TRANSFORMS, in its order.
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
MAX_MAGNITUDE = 10.0
GRAY = (0.299, 0.587, 0.114)  # PIL's convert("L")


class Policy:
  """A RandAugment policy by timm's name, `rand-m9-mstd0.5-inc1`: m the magnitude, mstd its
  standard deviation, n the number of ops (2), inc1 the "increasing" op set (the only one
  here), p each op's probability (0.5)."""

  def __init__(self, name: str = "rand-m9-mstd0.5-inc1"):
    parts = name.split("-")
    if parts[0] != "rand":
      raise ValueError(f"RandAugment policy {name!r} must start with 'rand-'.")
    self.name, self.magnitude, self.std, self.layers, self.prob = name, 9.0, 0.0, 2, 0.5
    for part in parts[1:]:
      key = next((k for k in ("mstd", "inc", "m", "n", "p") if part.startswith(k)), None)
      try:
        value = float(part[len(key):]) if key else None
      except ValueError:
        value = None
      if value is None:
        raise ValueError(f"RandAugment policy {name!r}: cannot read {part!r}.")
      if key == "inc" and value != 1:
        raise ValueError(f"RandAugment policy {name!r}: only the increasing op set (inc1).")
      self.magnitude = value if key == "m" else self.magnitude
      self.std = value if key == "mstd" else self.std
      self.layers = int(value) if key == "n" else self.layers
      self.prob = value if key == "p" else self.prob


def _fold(key, data):
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def _gray(x):
  return tf.round(x[..., :1] * GRAY[0] + x[..., 1:2] * GRAY[1] + x[..., 2:] * GRAY[2])


def _blend(degenerate, x, factor):
  """PIL's ImageEnhance: degenerate + factor (x - degenerate), 8-bit."""
  return tf.clip_by_value(tf.round(degenerate + factor * (x - degenerate)), 0.0, 255.0)


def _affine(x, matrix, fill):
  """x [H, W, 3] sampled at output pixel (c, r) from input (a c + b r + t0, d c + e r + t1)
  in PIL's continuous coordinates (pixel centres at +0.5), as PIL's AFFINE transform does: the
  fill colour where that point lies outside the image, else the bilinear sample with the edge
  pixels repeated."""
  a, b, t0, d, e, t1 = [tf.cast(v, tf.float32) for v in matrix]
  # PIL maps (c + 0.5, r + 0.5) to a continuous input point; its pixel index is that - 0.5.
  index = tf.stack([a, b, t0 + 0.5 * (a + b - 1.0), d, e, t1 + 0.5 * (d + e - 1.0),
                    0.0, 0.0])[None]
  shape = tf.shape(x)[:2]
  transform = lambda images, interpolation, mode: tf.raw_ops.ImageProjectiveTransformV3(
      images=images[None], transforms=index, output_shape=shape, fill_value=0.0,
      interpolation=interpolation, fill_mode=mode)[0]
  sampled = transform(x, "BILINEAR", "NEAREST")
  inside = transform(tf.ones_like(x[..., :1]), "NEAREST", "CONSTANT") > 0.5
  return tf.clip_by_value(tf.round(tf.where(inside, sampled, fill)), 0.0, 255.0)


def _equalize(channel):
  """PIL's ImageOps.equalize of one 8-bit channel [H, W]."""
  ints = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(tf.reshape(ints, [-1]), minlength=256, maxlength=256)
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)[:, 0]))
  step = (tf.reduce_sum(hist) - last) // 255
  lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // tf.maximum(step, 1)
  lut = tf.minimum(lut, 255)
  return tf.where(step > 0, tf.cast(tf.gather(lut, ints), tf.float32), channel)


def _smooth(x):
  """PIL's ImageFilter.SMOOTH ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13), border pixels kept."""
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  inner = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
  inner = tf.round(inner)
  return tf.pad(inner, [[1, 1], [1, 1], [0, 0]]) + x - tf.pad(x[1:-1, 1:-1], [[1, 1], [1, 1],
                                                                             [0, 0]])


def _op(index, x, magnitude, sign, fill):
  """Op `OPS[index]` at `magnitude` (0-10) with `sign` (+1 or -1) on x [H, W, 3] in 0..255:
  timm's arguments for each (`_LEVEL_TO_ARG`) and PIL's operations."""
  level = magnitude / MAX_MAGNITUDE
  h = tf.cast(tf.shape(x)[0], tf.float32)
  w = tf.cast(tf.shape(x)[1], tf.float32)

  def autocontrast():  # in float64, as PIL: (hi - lo) * 255 / (hi - lo) must reach 255
    x64 = tf.cast(x, tf.float64)
    lo = tf.reduce_min(x64, axis=[0, 1])
    hi = tf.reduce_max(x64, axis=[0, 1])
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    out = tf.clip_by_value(tf.floor(x64 * scale - lo * scale), 0.0, 255.0)
    return tf.cast(tf.where(hi > lo, out, x64), tf.float32)

  def rotate():
    theta = sign * level * 30.0 * math.pi / 180.0
    cos, sin = tf.cos(theta), tf.sin(theta)
    cx, cy = w / 2.0, h / 2.0
    return _affine(x, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy],
                   fill)

  def posterize():
    bits = 4 - tf.cast(level * 4.0, tf.int32)
    keep = tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(x, tf.int32), 8 - bits), 8 - bits)
    return tf.cast(keep, tf.float32)

  def solarize():
    threshold = 256.0 - tf.floor(level * 256.0)
    return tf.where(x >= threshold, 255.0 - x, x)

  def solarize_add():
    return tf.where(x < 128.0, tf.minimum(255.0, x + tf.floor(level * 110.0)), x)

  factor = 1.0 + sign * level * 0.9
  shear = sign * level * 0.3
  translate = sign * level * 0.45
  branches = [
      autocontrast,
      lambda: tf.stack([_equalize(x[..., c]) for c in range(3)], axis=-1),
      lambda: 255.0 - x,
      rotate,
      posterize,
      solarize,
      solarize_add,
      lambda: _blend(tf.tile(_gray(x), [1, 1, 3]), x, factor),
      lambda: _blend(tf.floor(tf.reduce_mean(_gray(x)) + 0.5), x, factor),
      lambda: _blend(tf.zeros_like(x), x, factor),
      lambda: _blend(_smooth(x), x, factor),
      lambda: _affine(x, [1.0, shear, 0.0, 0.0, 1.0, 0.0], fill),
      lambda: _affine(x, [1.0, 0.0, 0.0, shear, 1.0, 0.0], fill),
      lambda: _affine(x, [1.0, 0.0, translate * w, 0.0, 1.0, 0.0], fill),
      lambda: _affine(x, [1.0, 0.0, 0.0, 0.0, 1.0, translate * h], fill),
  ]
  return tf.ensure_shape(tf.switch_case(index, branches), x.shape)


def draw(key, policy: Policy):
  """The random choices for one image: op indices, whether each is applied, magnitudes and
  signs (each [layers])."""
  n = policy.layers
  ops = tf.random.stateless_uniform([n], _fold(key, 0), 0, len(OPS), dtype=tf.int32)
  applied = tf.random.stateless_uniform([n], _fold(key, 1)) < policy.prob
  noise = tf.random.stateless_normal([n], _fold(key, 2))
  magnitude = tf.clip_by_value(policy.magnitude + policy.std * noise, 0.0, MAX_MAGNITUDE)
  sign = tf.where(tf.random.stateless_uniform([n], _fold(key, 3)) < 0.5, -1.0, 1.0)
  return ops, applied, magnitude, sign


def randaugment(image, key, policy: Policy, fill):
  """One image [H, W, 3] in [0, 1] -> RandAugment'ed, in [0, 1] (8-bit levels). `fill`: the
  RGB colour (0-255) geometric ops bring in, timm's `img_mean`."""
  x = tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0)
  fill = tf.constant(fill, tf.float32)
  ops, applied, magnitude, sign = draw(key, policy)
  for i in range(policy.layers):
    x = tf.cond(applied[i], lambda i=i, x=x: _op(ops[i], x, magnitude[i], sign[i], fill),
                lambda x=x: x)
  return x / 255.0


def erase_box(key, height, width, *, area=(0.02, 1.0 / 3.0), aspect=(0.3, 1.0 / 0.3),
              attempts: int = 10):
  """timm's RandomErasing rectangle: (top, left, h, w) of the first of `attempts` draws that
  fits strictly inside the image, or h = w = 0 when none does."""
  u = tf.random.stateless_uniform([attempts, 4], _fold(key, 1))
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  target = (area[0] + u[:, 0] * (area[1] - area[0])) * hf * wf
  ratio = tf.exp(math.log(aspect[0]) + u[:, 1] * (math.log(aspect[1]) - math.log(aspect[0])))
  h = tf.round(tf.sqrt(target * ratio))
  w = tf.round(tf.sqrt(target / ratio))
  fits = (w < wf) & (h < hf)
  top = tf.floor(u[:, 2] * (hf - h + 1.0))
  left = tf.floor(u[:, 3] * (wf - w + 1.0))
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  box = tf.cast(tf.stack([top[first], left[first], h[first], w[first]]), tf.int32)
  return tf.where(tf.reduce_any(fits), box, tf.zeros([4], tf.int32))


def random_erase(image, key, prob: float):
  """One normalized image [H, W, C]: with probability `prob` a rectangle (`erase_box`) becomes
  N(0, 1) noise per pixel and channel."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  top, left, h, w = tf.unstack(erase_box(key, height, width))
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  inside &= tf.random.stateless_uniform([], _fold(key, 0)) < prob
  noise = tf.random.stateless_normal(tf.shape(image), _fold(key, 2))
  return tf.where(inside[..., None], noise, image)


class TrainAugment:
  """The fine-tuning augmentations after the crop: `before_normalize` (RandAugment, on [0, 1]
  images) and `after_normalize` (random erasing), each of one image [S, S, 3] or a batch
  [B, S, S, 3] with one key (folded with each row's index)."""

  def __init__(self, policy: str = "rand-m9-mstd0.5-inc1", erase_prob: float = 0.25,
               mean=(0.485, 0.456, 0.406)):
    self.policy = Policy(policy) if policy else None
    self.erase_prob = float(erase_prob)
    self.fill = tuple(min(255, round(255 * m)) for m in mean)

  @staticmethod
  def _each(fn, images, key):
    if images.shape.rank == 3:
      return fn(images, key)
    rows = tf.range(tf.shape(images)[0])
    return tf.map_fn(lambda a: fn(a[0], _fold(key, a[1])), (images, rows),
                     fn_output_signature=tf.TensorSpec(images.shape[1:], images.dtype))

  def before_normalize(self, images, key):
    if self.policy is None:
      return images
    return self._each(lambda x, k: randaugment(x, _fold(k, 11), self.policy, self.fill),
                      images, key)

  def after_normalize(self, images, key):
    if self.erase_prob <= 0:
      return images
    return self._each(lambda x, k: random_erase(x, _fold(k, 12), self.erase_prob), images, key)
