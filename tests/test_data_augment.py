"""Multi-crop ops: crop geometry statistics, both crop paths agree, torchvision's color jitter."""
import colorsys
import itertools

import numpy as np
import pytest

from sove_jax.data import augment


@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.4)])
def test_crop_boxes_stay_in_the_image_with_scale_and_ratio_in_range(scale):
  H = W = 128
  boxes = augment.draw_crop_boxes([5, 6], [4000], H, W, scale, (3 / 4, 4 / 3)).numpy()
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
  frac, aspect = h * w / (H * W), w / h
  tol = 0.03  # w and h are rounded to whole pixels
  assert frac.min() >= scale[0] - tol and frac.max() <= scale[1] + tol
  assert aspect.min() >= 3 / 4 - 0.05 and aspect.max() <= 4 / 3 + 0.05
  span = scale[1] - scale[0]  # the draws fill the range, not a corner of it
  assert np.quantile(frac, 0.05) < scale[0] + 0.1 * span
  assert np.quantile(frac, 0.95) > scale[1] - 0.25 * span
  assert abs(np.mean(np.log(aspect))) < 0.02
  assert len({tuple(b) for b in boxes}) > 0.9 * len(boxes)


def test_crop_boxes_fall_back_to_a_centered_crop_on_extreme_images():
  boxes = augment.draw_crop_boxes([1, 1], [500], 20, 400, (0.9, 1.0), (3 / 4, 4 / 3)).numpy()
  top, left, h, w = boxes.T
  assert (top + h <= 20).all() and (left + w <= 400).all()
  # torchvision's fallback: the whole height, the widest allowed ratio, centered.
  assert ((h == 20) & (w == round(20 * 4 / 3)) & (left == (400 - w) // 2)).all()


@pytest.mark.parametrize("size", [12, 48])  # down- and upsampling
def test_batched_crops_match_crop_then_resize(size):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 37, 29, 3), dtype=np.uint8)
  boxes = augment.draw_crop_boxes([2, 2], [3, 4], 37, 29, (0.1, 1.0), (3 / 4, 4 / 3))
  batched = augment.resized_crops(images, boxes, size).numpy()
  for i in range(3):
    for v in range(4):
      single = augment.resized_crop(images[i], boxes[i, v], size).numpy()
      np.testing.assert_allclose(batched[i, v], single, atol=2e-5)


def _reference_jitter(img, factors, order):
  """torchvision ColorJitter on a float image, written out op by op."""
  gray = lambda x: x @ np.array([0.299, 0.587, 0.114])
  b, c, s, h = factors
  for op in order:
    if op == 0:
      img = np.clip(img * b, 0, 1)
    elif op == 1:
      img = np.clip(c * img + (1 - c) * gray(img).mean(), 0, 1)
    elif op == 2:
      img = np.clip(s * img + (1 - s) * gray(img)[..., None], 0, 1)
    else:
      out = np.empty_like(img)
      for idx in np.ndindex(img.shape[:-1]):
        hh, ss, vv = colorsys.rgb_to_hsv(*img[idx])
        out[idx] = colorsys.hsv_to_rgb((hh + h) % 1.0, ss, vv)
      img = out
  return img


def test_color_jitter_follows_torchvision_in_every_order():
  rng = np.random.default_rng(1)
  orders = np.array(list(itertools.permutations(range(4))), np.int32)  # all 24
  n = len(orders)
  images = rng.uniform(0, 1, (n, 5, 5, 3)).astype(np.float32)
  factors = np.stack([rng.uniform(0.6, 1.4, n), rng.uniform(0.6, 1.4, n), rng.uniform(0.8, 1.2, n),
                      rng.uniform(-0.1, 0.1, n)], 1).astype(np.float32)
  got = augment.color_jitter(images, factors, orders).numpy()
  for i in range(n):
    want = _reference_jitter(images[i].astype(np.float64), factors[i], orders[i])
    np.testing.assert_allclose(got[i], want, atol=1e-5)
  # A gray image in one channel gets what its three equal channels would get.
  gray = images[..., :1]
  one = augment.color_jitter(gray, factors, orders).numpy()
  three = augment.color_jitter(np.repeat(gray, 3, -1), factors, orders).numpy()
  np.testing.assert_allclose(np.repeat(one, 3, -1), three, atol=1e-5)


def test_gaussian_blur_uses_each_images_sigma():
  x = np.zeros((3, 33, 33, 1), np.float32)
  x[:, 16, 16] = 1.0
  sigma = np.array([0.0, 1.0, 2.0], np.float32)
  out = augment.gaussian_blur(x, sigma, radius=6).numpy()[..., 0]
  np.testing.assert_allclose(out[0], x[0, ..., 0], atol=1e-6)  # sigma 0: untouched
  grid = np.arange(33) - 16
  for i in (1, 2):
    assert abs(out[i].sum() - 1) < 1e-5
    variance = (out[i].sum(0) * grid ** 2).sum()
    assert abs(variance - sigma[i] ** 2) < 0.05 * sigma[i] ** 2 + 0.01


def test_photometric_keeps_shape_range_and_follows_the_seed():
  views = np.random.default_rng(2).uniform(0, 1, (4, 3, 8, 8, 3)).astype(np.float32)
  kw = dict(jitter_prob=0.8, jitter=(0.4, 0.4, 0.2, 0.1), gray_prob=0.2,
            blur_prob=(1.0, 0.1, 0.5), blur_sigma=(0.1, 2.0), solarize_prob=(0.0, 0.2, 0.0))
  a = augment.photometric(views, [1, 2], **kw).numpy()
  b = augment.photometric(views, [1, 2], **kw).numpy()
  c = augment.photometric(views, [1, 3], **kw).numpy()
  assert a.shape == views.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_eval_view_resizes_the_shorter_side_and_crops_the_center():
  image = np.zeros((300, 400, 3), np.uint8)
  image[130:170, 180:220] = 255  # a bright square in the middle
  out = augment.eval_view(image, 256, 224).numpy()
  assert out.shape == (224, 224, 3)
  assert out[112, 112].min() > 0.95 and out[:20, :20].max() < 0.05 and out[-20:, -20:].max() < 0.05
  tall = augment.eval_view(np.zeros((2, 50, 30, 1), np.uint8), 32, 28).numpy()
  assert tall.shape == (2, 28, 28, 1)


def test_photometric_with_no_view_drawing_an_op():
  views = np.random.default_rng(3).uniform(0, 1, (1, 1, 8, 8, 3)).astype(np.float32)
  out = augment.photometric(views, [0, 0], jitter_prob=0.0, jitter=(0.4, 0.4, 0.2, 0.1),
                            gray_prob=0.0, blur_prob=(1e-9,), blur_sigma=(0.1, 2.0),
                            solarize_prob=(0.0,)).numpy()
  np.testing.assert_array_equal(out, views)


def test_translate_moves_each_view_by_its_own_shift_with_a_black_border():
  """Pad-and-crop translation, against NumPy: view i moved down dy and right dx pixels, what
  leaves the frame dropped, the uncovered border 0."""
  rng = np.random.default_rng(3)
  views = rng.uniform(0.1, 1.0, (2, 3, 6, 6, 1)).astype(np.float32)
  shifts = rng.integers(-3, 4, (2, 3, 2)).astype(np.int32)
  shifts[0, 0] = (0, 0)
  got = augment.translate(views, shifts).numpy()
  for b, v in itertools.product(range(2), range(3)):
    dy, dx = shifts[b, v]
    want = np.zeros((6, 6, 1), np.float32)
    src = views[b, v]
    want[max(dy, 0):6 + min(dy, 0), max(dx, 0):6 + min(dx, 0)] = \
        src[max(-dy, 0):6 - max(dy, 0), max(-dx, 0):6 - max(dx, 0)]
    np.testing.assert_allclose(got[b, v], want, atol=1e-6)
  np.testing.assert_array_equal(got[0, 0], views[0, 0])
