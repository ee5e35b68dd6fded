"""Views made on the device (sove_jax/views.py) against the host recipe (sove_jax/data/augment.py).

Parity: given the same boxes and parameters, every op and the whole recipe give the host's views
within TOL. Draws: the device's parameters follow the host's distributions, checked on 10^4
draws a side with two-sample tests whose false-alarm rate per check is ALPHA:
  - continuous draws (box area fraction, log aspect ratio, box center, jitter factors, blur
    sigma): Kolmogorov-Smirnov, p > ALPHA;
  - how often each op fires at each view index (and flips, against 1/2): two-proportion z-test,
    |z| < Z (two-sided ALPHA);
  - jitter orders (24 permutations): chi-square on the contingency table, p > ALPHA.
The draws are seeded, so each test's outcome is fixed; each test also shows that a recipe off by
a little (a probability 0.05 off, a range 10% narrower) fails the same checks.
"""
import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from configs import default
from sove_jax import views
from sove_jax.data import augment

TOL = 1e-3            # device view vs host view, any pixel of any channel
ALPHA = 1e-4          # false-alarm rate of each statistical check
Z = stats.norm.isf(ALPHA / 2)  # 3.89
N = 10_000            # draws a side
PHOTOMETRIC = ("jitter", "factors", "order", "gray", "blur", "sigma", "solarize")



def _recipe(**overrides) -> views.Recipe:
  d = default.get_config().data
  d.update(global_size=32, local_size=16, num_local=3, **overrides)
  return views.Recipe.from_config(d)


# The paper's photometric recipe (blur, solarized local views too), small views.
RECIPE = _recipe(blur_prob=(1.0, 0.1, 0.5), solarize_prob=(0.0, 0.2, 0.3))
CANVAS = (48, 56)
SIZES = np.array([[48, 56], [30, 56], [48, 20], [41, 41], [12, 56], [48, 7], [5, 5], [33, 47]],
                 np.int32)

# Compiled once per shape and recipe (op by op, every small op would compile on its own); the
# tests share shapes so that they share compilations.
draw = jax.jit(views.draw, static_argnums=2)
apply = jax.jit(views.apply, static_argnums=2)
draw_boxes = jax.jit(views.draw_boxes, static_argnums=(2, 4))  # scale traced: one compilation
resized_crops = jax.jit(views.resized_crops, static_argnums=(2, 4))
color_jitter = jax.jit(views.color_jitter, static_argnames="with_hue")
gaussian_blur = jax.jit(views.gaussian_blur, static_argnums=2)


def _host_params(p: views.ViewParams, recipe: views.Recipe, name: str) -> dict:
  """Device-drawn photometric parameters as the host's apply_photometric takes them."""
  _, _, _, blur_prob, solarize_prob = recipe.group(name)
  out = {k: np.asarray(getattr(p, k)) for k in PHOTOMETRIC}
  off = {"jitter": not recipe.jitters, "factors": not recipe.jitters, "order": not recipe.jitters,
         "gray": recipe.grayscale_prob == 0, "blur": max(blur_prob) == 0,
         "sigma": max(blur_prob) == 0, "solarize": max(solarize_prob) == 0}
  return {k: None if off[k] else v for k, v in out.items()}


def _canvases(rng, sizes, canvas, channels=3):
  """Images of `sizes` at the top left of noise-filled canvases (the noise must not matter)."""
  canvases = rng.integers(0, 256, (len(sizes), *canvas, channels), dtype=np.uint8)
  images = []
  for c, (h, w) in zip(canvases, sizes):
    image = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    image = (image // 3 + np.linspace(0, 170, w, dtype=np.uint8)[None, :, None])  # some structure
    c[:h, :w] = image
    images.append(image)
  return canvases, images


def _host_crops(images, p: views.ViewParams, size, flip=True):
  """The host's per-example path: cut each box out of its image, tf.image.resize, flip."""
  boxes, flips = np.asarray(p.boxes), np.asarray(p.flip)
  return np.stack([np.stack([augment.resized_crop(image, boxes[i, v], size,
                                                  flips[i, v] if flip else None).numpy()
                             for v in range(boxes.shape[1])]) for i, image in enumerate(images)])


# --- parity with the host, same parameters --------------------------------------------------------

def test_views_and_masks_import_without_tensorflow():
  code = ("import sys; sys.modules['tensorflow'] = None; import sove_jax.views, sove_jax.masks; "
          "assert not any(m.startswith('tensorflow') and sys.modules[m] for m in sys.modules)")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("name", ["global", "local"])
@pytest.mark.parametrize("size", [16, 48])  # mostly down-, mostly upsampling
def test_resized_crops_match_the_hosts_crop_then_resize(name, size):
  canvases, images = _canvases(np.random.default_rng(0), SIZES, CANVAS)
  p = draw(jax.random.key(1), SIZES, RECIPE)[name]
  scale = RECIPE.global_scale if name == "global" else RECIPE.local_scale
  window = views.crop_window(CANVAS, scale, RECIPE.aspect_ratio)
  got = np.asarray(resized_crops(canvases, p.boxes, size, p.flip, window))
  np.testing.assert_allclose(got, _host_crops(images, p, size), atol=TOL, rtol=0)
  # The window changes the products' shapes, not the views.
  whole = np.asarray(resized_crops(canvases, p.boxes, size, p.flip))
  np.testing.assert_allclose(got, whole, atol=1e-5, rtol=0)
  assert np.asarray(p.flip).any() and not np.asarray(p.flip).all()


def test_crop_window_holds_every_box_and_is_small_for_local_views():
  canvas = (96, 80)
  H, W = np.meshgrid([1, 2, 5, 17, 40, 63, 95, 96], [1, 3, 9, 30, 50, 79, 80], indexing="ij")
  sizes = np.stack([H.ravel(), W.ravel()], 1).astype(np.int32)
  for scale in [(0.14, 1.0), (0.05, 0.4), (0.3, 0.5)]:
    ratio = (3 / 4, 4 / 3)
    rows, cols = views.crop_window(canvas, scale, ratio)
    boxes = np.asarray(draw_boxes(jax.random.key(2), sizes, 400, np.array(scale), ratio))
    top, left, h, w = np.moveaxis(boxes, -1, 0)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= sizes[:, None, 0]).all() and (left + w <= sizes[:, None, 1]).all()
    assert h.max() <= rows and w.max() <= cols
  # The paper's local views (scale <= 0.4) on a 512 x 512 canvas: products over 3/4 of the side.
  assert views.crop_window((512, 512), (0.05, 0.4), (3 / 4, 4 / 3))[0] <= 0.75 * 512
  assert views.crop_window((512, 512), (0.14, 1.0), (3 / 4, 4 / 3)) == (512, 512)


@pytest.mark.parametrize("hue", [0.1, 0.0])
def test_color_jitter_matches_the_host_in_every_order(hue):
  rng = np.random.default_rng(3)
  orders = np.array(list(itertools.permutations(range(4))), np.int32)  # all 24
  n = len(orders)
  x = rng.uniform(0, 1, (n, 6, 6, 3)).astype(np.float32)
  factors = np.stack([rng.uniform(0.6, 1.4, n), rng.uniform(0.6, 1.4, n), rng.uniform(0.8, 1.2, n),
                      rng.uniform(-hue, hue, n)], 1).astype(np.float32)
  for channels in (3, 1):
    got = np.asarray(color_jitter(x[..., :channels], factors, orders, with_hue=hue > 0))
    want = augment.color_jitter(x[..., :channels], factors, orders, with_hue=hue > 0).numpy()
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert np.abs(got - x[..., :channels]).max() > 0.05


@pytest.mark.parametrize("op", ["gray", "blur", "solarize"])
def test_grayscale_blur_and_solarize_match_the_host(op):
  rng = np.random.default_rng(4)
  recipe = RECIPE
  x = rng.uniform(0, 1, (3, 4, 16, 16, 3)).astype(np.float32)
  on = rng.uniform(size=(3, 4)) < 0.5
  on[0, 0], on[0, 1] = True, False
  params = dict.fromkeys(PHOTOMETRIC)
  params[op] = on
  if op == "blur":
    params["sigma"] = rng.uniform(0.0, 2.0, (3, 4)).astype(np.float32)
  want = augment.apply_photometric(x, params, jitter=recipe.color_jitter,
                                   blur_sigma=recipe.blur_sigma).numpy()
  if op == "gray":
    got = jnp.where(on[..., None, None, None], jnp.broadcast_to(views.grayscale(x), x.shape), x)
  elif op == "blur":
    blurred = gaussian_blur(x, params["sigma"], views.blur_radius(recipe, 16))
    got = jnp.where(on[..., None, None, None], blurred, x)
  else:
    got = views.solarize(x, on)
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
  assert np.abs(want - x).max() > 0.05


@pytest.mark.parametrize("channels", [3, 1])
def test_whole_recipe_matches_the_host_given_the_same_parameters(channels):
  recipe = RECIPE
  canvases, images = _canvases(np.random.default_rng(5), SIZES, CANVAS, channels)
  params = draw(jax.random.key(6), SIZES, recipe)
  got = apply(canvases, params, recipe)
  assert set(got) == {"global", "local"}
  for name in ("global", "local"):
    p = params[name]
    _, size, _, _, _ = recipe.group(name)
    host = _host_crops(images, p, size)
    host = augment.apply_photometric(host, _host_params(p, recipe, name),
                                     jitter=recipe.color_jitter, blur_sigma=recipe.blur_sigma)
    if channels == 1:
      host = tf.tile(host, [1, 1, 1, 1, 3])
    host = augment.normalize(host, recipe.mean, recipe.std).numpy()
    assert got[name].shape == host.shape == (len(SIZES), 2 if name == "global" else 3, size,
                                              size, 3)
    np.testing.assert_allclose(np.asarray(got[name]), host, atol=TOL, rtol=0)
    for op in ("flip", "jitter", "gray", "blur", "solarize"):  # each op both fired and did not
      fired = np.asarray(getattr(p, op))
      assert fired.any() and not fired.all(), (name, op)


# --- the draws follow the host's distributions ----------------------------------------------------

def _box_stats(boxes, height, width) -> dict:
  top, left, h, w = np.moveaxis(np.asarray(boxes, np.float64), -1, 0)
  return {"area": h * w / (height * width), "log_aspect": np.log(w / h),
          "center_y": (top + h / 2) / height, "center_x": (left + w / 2) / width}


def _fallback_box(height, width, ratio):
  """torchvision's box when no draw fits: the whole image clipped to the ratio range, centered."""
  h = round(width / ratio[0]) if width / height < ratio[0] else height
  w = round(height * ratio[1]) if width / height > ratio[1] else width
  return np.array([(height - h) // 2, (width - w) // 2, h, w])


def _box_failures(host, device) -> list[str]:
  return [k for k in host if stats.ks_2samp(host[k], device[k]).pvalue <= ALPHA]


@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.4)])
@pytest.mark.parametrize("image", [(375, 500), (150, 500)])  # ImageNet-like; global fallbacks
def test_drawn_boxes_follow_the_hosts_distribution(scale, image):
  ratio = (3 / 4, 4 / 3)
  host = augment.draw_crop_boxes([7, 8], [N], *image, scale, ratio).numpy()
  sizes = np.tile(np.array([image], np.int32), (N, 1))
  boxes = lambda scale, ratio: np.asarray(draw_boxes(jax.random.key(9), sizes, 1, np.array(scale),
                                                           ratio))[:, 0]
  device = boxes(scale, ratio)
  assert _box_failures(_box_stats(host, *image), _box_stats(device, *image)) == []
  centered = _fallback_box(*image, ratio)
  fallback = lambda boxes: np.all(boxes == centered, axis=1).mean()
  assert _two_proportion_z(fallback(host), fallback(device), N, N) < Z
  # A scale range 10% narrower at the bottom, or a narrower ratio range, fails.
  narrow = (scale[0] + 0.1 * (scale[1] - scale[0]), scale[1])
  assert _box_failures(_box_stats(host, *image), _box_stats(boxes(narrow, ratio), *image))
  assert "log_aspect" in _box_failures(_box_stats(host, *image),
                                       _box_stats(boxes(scale, (0.8, 1.25)), *image))


def _two_proportion_z(p1, p2, n1, n2) -> float:
  pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
  se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
  return float(abs(p1 - p2) / se) if se > 0 else (0.0 if p1 == p2 else np.inf)


def _photometric_failures(host: dict, device: views.ViewParams) -> set[str]:
  """Names of the checks where the device's draws differ from the host's ([N, V] each)."""
  failed = set()
  for op in ("jitter", "gray", "blur", "solarize"):
    h, d = np.asarray(host[op]), np.asarray(getattr(device, op))
    for v in range(h.shape[1]):
      if _two_proportion_z(h[:, v].mean(), d[:, v].mean(), len(h), len(d)) >= Z:
        failed.add(f"{op}[{v}]")
  continuous = {f"factor{i}": (lambda p, i=i: np.asarray(p["factors"])[..., i]) for i in range(4)}
  continuous["sigma"] = lambda p: np.asarray(p["sigma"])
  dev = device._asdict()
  for name, get in continuous.items():
    if stats.ks_2samp(get(host).ravel(), get(dev).ravel()).pvalue <= ALPHA:
      failed.add(name)
  code = lambda p: (np.asarray(p["order"]) @ np.array([64, 16, 4, 1])).ravel()  # one per order
  table = np.stack([np.bincount(code(p), minlength=256) for p in (host, dev)])
  table = table[:, table.sum(0) > 0]
  if stats.chi2_contingency(table).pvalue <= ALPHA:
    failed.add("order")
  return failed


def test_drawn_photometric_parameters_and_flips_follow_the_hosts_distributions():
  recipe = _recipe(blur_prob=(1.0, 0.1, 0.5), solarize_prob=(0.0, 0.2, 0.0))  # the paper's
  # Probabilities 0.05 off, a jitter range and a sigma range 10% wider: caught (below).
  wrong = _recipe(color_jitter_prob=0.75, grayscale_prob=0.25, blur_prob=(0.95, 0.15, 0.45),
                  solarize_prob=(0.05, 0.25, 0.05), color_jitter=(0.44, 0.4, 0.2, 0.1),
                  blur_sigma=(0.1, 2.2))
  sizes = np.full((N, 2), 64, np.int32)
  device, bad = (draw(jax.random.key(10), sizes, r) for r in (recipe, wrong))
  for i, name in enumerate(("global", "local")):
    views_, _, _, blur_prob, solarize_prob = recipe.group(name)
    host = augment.draw_photometric(
        [i, 0], N, views_, jitter_prob=recipe.color_jitter_prob, jitter=recipe.color_jitter,
        gray_prob=recipe.grayscale_prob, blur_prob=blur_prob, blur_sigma=recipe.blur_sigma,
        solarize_prob=solarize_prob)
    if name == "local":
      assert host["solarize"] is None  # never on locals in this recipe: nor on the device
      host["solarize"] = np.zeros((N, views_), bool)
    assert _photometric_failures(host, device[name]) == set(), name
    flips = np.asarray(device[name].flip).mean(0)
    assert (np.abs(flips - 0.5) / np.sqrt(0.25 / N) < Z).all()
    order = np.asarray(bad[name].order).copy()
    order[: N // 10] = np.arange(4)  # and one draw in ten in the identity order
    expected = {f"{op}[{v}]" for op in ("jitter", "gray", "blur", "solarize")
                for v in range(views_)} | {"factor0", "sigma", "order"}
    assert _photometric_failures(host, bad[name]._replace(order=order)) == expected, name


# --- determinism, sharding, no host work ----------------------------------------------------------

def test_same_key_same_views_on_one_device_or_sharded_over_eight():
  canvases, _ = _canvases(np.random.default_rng(12), SIZES, CANVAS)
  a, b, c = (apply(canvases, draw(jax.random.key(k), SIZES, RECIPE), RECIPE) for k in (13, 13, 14))
  for name in a:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
    assert np.abs(np.asarray(a[name]) - np.asarray(c[name])).mean() > 0.1
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = jax.sharding.NamedSharding(mesh, jax.P("data"))
  sharded = jax.jit(views.make, static_argnums=3, in_shardings=(batch, batch, None),
                    out_shardings=batch)
  lowered = sharded.lower(canvases, SIZES, jax.random.key(13), RECIPE)
  assert "callback" not in lowered.as_text()  # all on the device, no trip to the host
  out = lowered.compile()(jax.device_put(canvases, batch), jax.device_put(SIZES, batch),
                          jax.random.key(13))
  for name in a:
    assert out[name].sharding.is_equivalent_to(batch, out[name].ndim)
    np.testing.assert_allclose(np.asarray(out[name]), np.asarray(a[name]), atol=1e-5, rtol=0)
