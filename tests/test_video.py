"""DAVIS label propagation: J and F on hand-made masks, the propagation step against a float64
NumPy reference, and synthetic moving shapes tracked end to end through the DAVIS layout.

The stand-in backbone's patch tokens are each patch's mean standardised color, so a patch of a
red square matches red patches: what propagation has to do is follow them from frame to frame.
"""
import json
import logging

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from sove_jax.evaluate import images, protocol, video
from stand_ins import MEAN, STD, MeanColorViT


# --- J and F --------------------------------------------------------------------------------------

def test_region_similarity_by_hand():
  gt = np.zeros((8, 8), bool)
  gt[2:6, 2:6] = True
  shifted = np.roll(gt, 1, axis=1)  # 12 shared pixels, 20 in the union
  assert video.region_similarity(gt, shifted) == pytest.approx(0.6)
  assert video.region_similarity(gt, gt) == 1.0
  assert video.region_similarity(gt, np.zeros_like(gt)) == 0.0
  assert video.region_similarity(np.zeros_like(gt), np.zeros_like(gt)) == 1.0


def test_boundary_map_by_hand():
  m = np.zeros((4, 4), bool)
  m[1:3, 1:3] = True
  expected = np.array([[1, 1, 1, 0],
                       [1, 0, 1, 0],
                       [1, 1, 1, 0],
                       [0, 0, 0, 0]], bool)  # half a pixel towards the origin
  np.testing.assert_array_equal(video.boundary_map(m), expected)


def brute_force_f(gt, pred, radius):
  """Boundary F by explicit distances: a boundary pixel is matched when a pixel of the other
  boundary lies within Euclidean distance `radius`."""
  gb, pb = video.boundary_map(gt), video.boundary_map(pred)
  g, p = np.argwhere(gb).astype(np.float64), np.argwhere(pb).astype(np.float64)
  if len(g) == 0 or len(p) == 0:
    return None
  d = np.sqrt(((p[:, None] - g[None]) ** 2).sum(-1))
  precision = np.mean(d.min(axis=1) <= radius)
  recall = np.mean(d.min(axis=0) <= radius)
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_contour_accuracy_by_hand():
  # 20x20: the tolerance is ceil(0.008 * sqrt(800)) = 1 px (a cross).
  gt = np.zeros((20, 20), bool)
  gt[:, :10] = True  # boundary: column 9, 20 px
  assert video.contour_accuracy(gt, gt) == 1.0
  near = np.zeros_like(gt)
  near[:, :11] = True
  assert video.contour_accuracy(gt, near) == 1.0  # 1 px away
  far = np.zeros_like(gt)
  far[:, :13] = True
  assert video.contour_accuracy(gt, far) == 0.0  # 3 px away
  # Prediction: the top half only. Its boundary: column 9 rows 0-9 and row 9 columns 0-8
  # (19 px), of which column 9 and (9, 8) lie within 1 px of the truth: precision 11/19;
  # the truth's column 9 is matched on rows 0-10: recall 11/20. F = 242/429.
  half = np.zeros_like(gt)
  half[:10, :10] = True
  assert video.contour_accuracy(gt, half) == pytest.approx(242 / 429)
  empty = np.zeros_like(gt)
  assert video.contour_accuracy(gt, empty) == 0.0  # precision 1, recall 0
  assert video.contour_accuracy(empty, empty) == 1.0
  # A larger tolerance on random blobs: the dilation equals explicit distances.
  rng = np.random.default_rng(0)
  for _ in range(3):
    a = np.asarray(Image.fromarray(rng.random((6, 7)) > 0.5).resize((35, 30), Image.NEAREST))
    b = np.roll(a, rng.integers(-3, 4, 2), axis=(0, 1))
    assert video.contour_accuracy(a, b, bound_th=3) == pytest.approx(brute_force_f(a, b, 3))


def test_statistics_by_hand():
  # 8 frames: bins by the DAVIS rounding are frames 0-2 and 5-7 for the decay.
  mean, recall, decay = video.statistics([1, 1, 1, 1, 0, 0, 0, 0.6])
  assert mean == pytest.approx(4.6 / 8)
  assert recall == pytest.approx(5 / 8)
  assert decay == pytest.approx(1.0 - 0.2)


# --- propagation --------------------------------------------------------------------------------

def propagate_reference(target, feats, labels, valid, grid, topk, radius, temperature):
  """float64 loops: per target patch, the top-k valid context patches within the window."""
  h, w = grid
  out = np.zeros((h * w, labels.shape[-1]))
  for q in range(h * w):
    cands = []
    for s in range(len(feats)):
      if not valid[s]:
        continue
      for m in range(h * w):
        if radius and (abs(q // w - m // w) > radius or abs(q % w - m % w) > radius):
          continue
        cands.append((float(target[q] @ feats[s, m]), s, m))
    cands.sort(key=lambda c: -c[0])
    top = cands[:topk]
    sims = np.array([c[0] for c in top])
    weights = np.exp((sims - sims.max()) / temperature)
    weights /= weights.sum()
    for wgt, (_, s, m) in zip(weights, top):
      out[q] += wgt * labels[s, m]
  return out


@pytest.mark.parametrize("radius", [0, 1])
def test_propagate_matches_float64_reference(radius):
  rng = np.random.default_rng(radius)
  grid, slots, dim, classes = (3, 4), 3, 6, 3
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  target = unit(rng.normal(size=(12, dim)))
  feats = unit(rng.normal(size=(slots, 12, dim)))
  labels = rng.dirichlet(np.ones(classes), size=(slots, 12))
  valid = np.array([True, True, False])
  got = video.propagate(jnp.asarray(target, jnp.float32), jnp.asarray(feats, jnp.float32),
                        jnp.asarray(labels, jnp.float32), jnp.asarray(valid), grid=grid,
                        topk=4, radius=radius, temperature=0.1)
  want = propagate_reference(target, feats, labels, valid, grid, 4, radius, 0.1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_radius_keeps_labels_local():
  """A static scene of identical patches: with radius 0 a target patch may take labels from
  anywhere; with radius 1 only from its 3x3 window, so a distant label cannot arrive."""
  grid = (1, 6)
  feats = np.tile([1.0, 0.0], (1, 6, 1)).astype(np.float32)
  labels = np.zeros((1, 6, 2), np.float32)
  labels[0, :, 0] = 1.0
  labels[0, 5] = [0.0, 1.0]  # the last patch carries class 1
  args = (jnp.asarray(feats[0]), jnp.asarray(feats), jnp.asarray(labels), jnp.ones(1, bool))
  local = video.propagate(*args, grid=grid, topk=6, radius=1, temperature=0.1)
  anywhere = video.propagate(*args, grid=grid, topk=6, radius=0, temperature=0.1)
  assert float(local[0, 1]) == 0.0 and float(local[4, 1]) == pytest.approx(1 / 3)
  assert float(anywhere[0, 1]) == pytest.approx(1 / 6)


def test_label_map_upsamples_and_normalizes_channels():
  soft = np.zeros((2, 2, 3), np.float32)
  soft[..., 0] = 0.9
  soft[0, 0] = [0.5, 0.45, 0.05]
  soft[1, 1] = [0.8, 0.0, 0.2]  # class 2 is weak everywhere but strongest here
  out = np.asarray(video.label_map(jnp.asarray(soft), 4))
  assert out.shape == (8, 8) and out.dtype == np.uint8
  assert out[0, 0] == 1 and out[7, 7] == 2 and out[0, 7] == 0


# --- end to end ---------------------------------------------------------------------------------

SIZE = (48, 64)  # frames, h x w
SQUARES = [  # object, color, top-left (y, x) in frame 0, x velocity (px / frame)
    (1, (230, 30, 30), (8, 4), 3),
    (2, (30, 30, 230), (28, 44), -3),
]


def write_davis(root, frames=10, sequence="shapes"):
  """A DAVIS-2017 folder with one sequence of two squares crossing a textured background."""
  rng = np.random.default_rng(0)
  jpg = root / "JPEGImages" / "480p" / sequence
  ann = root / "Annotations" / "480p" / sequence
  jpg.mkdir(parents=True)
  ann.mkdir(parents=True)
  (root / "ImageSets" / "2017").mkdir(parents=True)
  (root / "ImageSets" / "2017" / "val.txt").write_text(f"{sequence}\n")
  palette = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0]], np.uint8)
  truth = []
  for t in range(frames):
    pixels = (120 + rng.integers(-8, 9, SIZE + (3,))).astype(np.uint8)
    labels = np.zeros(SIZE, np.uint8)
    for obj, rgb, (y, x), vx in SQUARES:
      x = x + vx * t
      pixels[y:y + 12, x:x + 12] = rgb
      labels[y:y + 12, x:x + 12] = obj
    Image.fromarray(pixels).save(jpg / f"{t:05d}.jpg", quality=100, subsampling=0)
    images.write_label_map(ann / f"{t:05d}.png", labels, palette)
    truth.append(labels)
  return truth, palette


def test_propagation_tracks_moving_shapes(tmp_path, caplog):
  truth, palette = write_davis(tmp_path / "davis")
  config = ml_collections.ConfigDict({"data": {"mean": MEAN, "std": STD}})
  with caplog.at_level(logging.INFO):
    results = protocol.run(
        video.PROTOCOL, load=lambda: (config, MeanColorViT()), out_dir=str(tmp_path),
        options=dict(data_dir=str(tmp_path / "davis"), frame_size=48, n_last_frames=3, topk=5,
                     radius=4, temperature=0.1, batch_size=8,
                     output_dir=str(tmp_path / "masks")))
  assert results["J-Mean"] > 70 and results["F-Mean"] > 70, results
  assert results["J&F-Mean"] == pytest.approx((results["J-Mean"] + results["F-Mean"]) / 2)
  assert results["sequences"]["shapes"]["objects"] == 2

  # The masks move with the squares: the last frame's prediction overlaps its truth, which the
  # first frame's mask no longer touches.
  written, written_palette = images.read_label_map(tmp_path / "masks" / "shapes" / "00009.png")
  np.testing.assert_array_equal(written_palette[:3], palette)
  for obj in (1, 2):
    assert video.region_similarity(truth[9] == obj, written == obj) > 0.7
    assert video.region_similarity(truth[9] == obj, truth[0] == obj) == 0.0
  # Copying the first mask to every frame scores far lower by the same metrics.
  j, f = video.score_sequence(truth[1:-1], [truth[0]] * 8, 2)
  still = video.summarize({"a": (j[0], f[0]), "b": (j[1], f[1])})
  assert still["J&F-Mean"] < results["J&F-Mean"] - 40

  record = json.loads((tmp_path / "video.json").read_text())
  assert record["J&F-Mean"] == pytest.approx(results["J&F-Mean"]) and record["radius"] == 4
  assert record["protocol"] == "video_dino" and "J&F-Mean" in caplog.text


def test_bad_settings_and_data_fail_before_loading(tmp_path):
  def never(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded before the input was checked")

  run = lambda **options: protocol.run(video.PROTOCOL, load=never, options=options,
                                      out_dir=str(tmp_path))
  with pytest.raises(ValueError, match="topk >= 1"):
    run(data_dir=str(tmp_path), topk=0)
  with pytest.raises(FileNotFoundError, match="DAVIS-2017 folder"):
    run(data_dir=str(tmp_path))
