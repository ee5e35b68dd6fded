"""PCA pictures of patch features: the components against a float64 eigen-decomposition, the
picture's layout and determinism, two regions told apart, and background removal."""
import json
import logging

import ml_collections
import numpy as np
import pytest
from PIL import Image

from sove_jax.evaluate import pca, protocol
from stand_ins import MEAN, STD, MeanColorViT


def run_config():
  return ml_collections.ConfigDict({"data": {"mean": MEAN, "std": STD, "global_size": 16}})


def test_principal_components_match_eigendecomposition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
  proj, ratio = pca.principal_components(x, 3)
  cov = np.cov(x, rowvar=False, bias=True)
  values, vectors = np.linalg.eigh(cov)
  order = np.argsort(values)[::-1]
  np.testing.assert_allclose(ratio, values[order[:3]] / values.sum(), rtol=1e-10)
  for k in range(3):  # the same axes up to sign, and the sign rule applied
    v = vectors[:, order[k]]
    v = v * np.sign(v[np.argmax(np.abs(v))])
    np.testing.assert_allclose(proj[:, k], (x - x.mean(0)) @ v, rtol=1e-8, atol=1e-10)
  np.testing.assert_array_equal(proj, pca.principal_components(x.copy(), 3)[0])


def two_region_image(rng, size=32):
  """Left half red, right half blue, with a little pixel noise."""
  pixels = np.zeros((size, size, 3))
  pixels[:, : size // 2] = (200, 40, 40)
  pixels[:, size // 2:] = (40, 40, 200)
  pixels += rng.integers(-10, 11, pixels.shape)
  return np.clip(pixels, 0, 255).astype(np.uint8)


def run(tmp_path, **options):
  return protocol.run(pca.PROTOCOL, load=lambda: (run_config(), MeanColorViT()),
                      options=options, out_dir=str(tmp_path))


def test_two_regions_and_layout(tmp_path, caplog):
  rng = np.random.default_rng(0)
  paths = []
  for i in range(2):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(two_region_image(rng)).save(paths[-1])
  with caplog.at_level(logging.INFO):
    summary = run(tmp_path, images=paths, batch_size=8)
  picture = np.asarray(Image.open(tmp_path / "pca.png"))
  # image_size defaults to twice the training crop: 32 px, an 8 x 8 grid of 4-px patches.
  assert picture.shape == (2 * 32 + pca.GAP, 2 * 32 + pca.GAP, 3)
  assert summary["grid"] == [8, 8] and summary["explained_variance"][0] > 0.9
  np.testing.assert_array_equal(picture[:32, :32], np.asarray(
      pca.square_crop(Image.open(paths[0]).convert("RGB"), 32)))
  # The first component (red channel) separates the halves, in both images alike.
  red = picture[:, 32 + pca.GAP:, 0].astype(int)
  for top in (0, 32 + pca.GAP):
    left, right = red[top:top + 32, :16], red[top:top + 32, 16:]
    assert left.max() < right.min() or right.max() < left.min()
  assert abs(int(red[0, 0]) - int(red[32 + pca.GAP, 0])) < 40
  record = json.loads((tmp_path / "pca.json").read_text())
  assert record["images"] == paths and "explained variance" in caplog.text
  assert record["protocol"] == "pca_dinov2" and record["step"] == "latest"

  # Deterministic: the same picture again, byte for byte.
  run(tmp_path, images=paths, batch_size=8, out=str(tmp_path / "again.png"))
  assert (tmp_path / "again.png").read_bytes() == (tmp_path / "pca.png").read_bytes()


def test_background_removed(tmp_path):
  rng = np.random.default_rng(1)
  pixels = (rng.integers(100, 130, (32, 32, 3))).astype(np.uint8)  # textured grey
  pixels[8:24, 8:24] = (220, 60, 30)  # an object: the central 4 x 4 patches
  Image.fromarray(pixels).save(tmp_path / "object.png")
  config, model = run_config(), MeanColorViT()
  canvas, summary = pca.pca_picture(config, model, [tmp_path / "object.png"], image_size=32,
                                    remove_background=True, batch_size=8)
  assert summary["foreground_fraction"] == pytest.approx(16 / 64)
  maps = canvas[:, 32 + pca.GAP:]
  assert np.all(maps[:8] == 0) and np.all(maps[:, :8] == 0)  # border patches: black
  assert np.all(maps[8:24, 8:24].max(axis=-1) > 0)  # the object: colored

