"""Revisited Oxford/Paris retrieval: the protocol's AP by hand, mAP of a synthetic dataset known
by construction, the ground truth read without running code, descriptors sharded over devices,
and the authors' protocol pinned: 512 px by PIL's thumbnail, the multiscale descriptor of the
whole image resized as `F.interpolate(scale_factor=s)`, whole query images.

The synthetic dataset's images are solid colors whose standardised value is 1.5 (cos t, sin t, 0)
for an angle t, and the stand-in backbone's [CLS] is the image's mean standardised color, so the
cosine similarity of two images is the cosine of their angle difference: the rankings, hence every
AP, are fixed by the angles chosen.
"""
import json
import logging
import math
import os
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sove_jax import sharding
from sove_jax.evaluate import images, retrieval
from sove_jax.evaluate import protocol as spine
from sove_jax.models import vit
from stand_ins import MEAN, STD, MeanColorViT


def run_config():
  return ml_collections.ConfigDict({"data": {"mean": MEAN, "std": STD}})


def color(degrees):
  t = np.deg2rad(degrees)
  v = 1.5 * np.array([np.cos(t), np.sin(t), 0.0])
  return np.round(255 * (np.array(MEAN) + np.array(STD) * v)).astype(np.uint8)


def save_jpg(path, pixels):
  Image.fromarray(pixels).save(path, quality=100, subsampling=0)


# --- the protocol's AP ---------------------------------------------------------------------------

def test_average_precision_by_hand():
  # Ranking P N P J N P, junk ignored -> P N P N P: positives at ranks 0, 2, 4 of 3.
  # AP = 1/3 [(1 + 1)/2 + (1/2 + 2/3)/2 + (2/4 + 3/5)/2] = 0.711111...
  ranking = np.array([10, 11, 12, 13, 14, 15])
  ranks = retrieval.positive_ranks(ranking, positives=np.array([15, 10, 12]),
                                   ignored=np.array([13]))
  np.testing.assert_array_equal(ranks, [0, 2, 4])
  assert retrieval.average_precision(ranks, 3) == pytest.approx(
      (1.0 + (0.5 + 2 / 3) / 2 + (0.5 + 0.6) / 2) / 3)
  assert retrieval.average_precision(ranks, 3) == pytest.approx(0.7111111111)
  # A positive never retrieved counts zero; a first hit at rank 1 starts from precision 0.
  assert retrieval.average_precision([1], 2) == pytest.approx((0 + 0.5) / 2 / 2)
  assert retrieval.average_precision([0, 1, 2], 3) == 1.0
  # Precision at k: positives at 1-based ranks 1, 3, 5.
  assert retrieval.precision_at(ranks, 1) == 1.0
  assert retrieval.precision_at(ranks, 5) == pytest.approx(3 / 5)
  assert retrieval.precision_at(ranks, 10) == pytest.approx(3 / 5)  # cut at the last positive


# Two queries. Query 0 (angle 0): database images 0-5 at 8, 16, ..., 48 degrees, labelled
# E N H J E H; query 1 (angle 180): images 6-9 at 188-212 degrees, labelled N H J H, no easy.
GND = [
    {"easy": [0, 4], "hard": [2, 5], "junk": [3], "bbx": [16.3, 16.0, 63.6, 48.2]},
    {"easy": [], "hard": [7, 9], "junk": [8], "bbx": [16.0, 15.8, 64.0, 47.9]},
]
DB_ANGLES = [8, 16, 24, 32, 40, 48, 188, 196, 204, 212]
QUERY_ANGLES = [0, 180]
# By hand (ranks after removing the ignored images):
#   q0 easy:   P N P        -> ranks 0, 2       AP = [1 + (1/2 + 2/3)/2] / 2       = 0.791667
#   q0 medium: P N P P P    -> ranks 0, 2, 3, 4 AP = [1 + 0.583333 + (2/3 + 3/4)/2
#                                                      + (3/4 + 4/5)/2] / 4        = 0.766667
#   q0 hard:   N P P        -> ranks 1, 2       AP = [(0 + 1/2)/2 + 0.583333] / 2  = 0.416667
#   q1 medium, hard: N P P  -> 0.416667; q1 has no easy positives: left out of Easy.
EXPECTED = {"easy": 79.1666667, "medium": (76.6666667 + 41.6666667) / 2, "hard": 41.6666667}


def test_evaluate_rankings_known_map():
  gnd = retrieval.check_ground_truth(
      {"imlist": [f"d{i}" for i in range(10)], "qimlist": ["q0", "q1"], "gnd": GND})["gnd"]
  sims = np.cos(np.deg2rad(np.subtract.outer(QUERY_ANGLES, DB_ANGLES)))
  rankings = np.argsort(-sims, axis=1)
  out = retrieval.evaluate_rankings(rankings, gnd)
  for setup, value in EXPECTED.items():
    assert out[setup]["mAP"] == pytest.approx(value, abs=1e-4), setup
  assert out["easy"]["queries"] == 1 and out["medium"]["queries"] == 2
  assert out["easy"]["mP@1"] == 100.0 and out["hard"]["mP@1"] == 0.0


def write_dataset(root, *, protocol=2):
  """roxford5k layout: jpg/ and gnd_roxford5k.pkl, database images landscape and portrait."""
  folder = root / "roxford5k"
  (folder / "jpg").mkdir(parents=True)
  for i, angle in enumerate(DB_ANGLES):
    shape = (48, 64) if i % 2 else (64, 48)
    save_jpg(folder / "jpg" / f"d{i}.jpg", np.broadcast_to(color(angle), shape + (3,)).copy())
  for i, (angle, g) in enumerate(zip(QUERY_ANGLES, GND)):
    # The box holds the query color; the larger outside holds the opposite color, so a
    # descriptor of the uncropped image points the other way.
    pixels = np.broadcast_to(color(angle + 180), (64, 80, 3)).copy()
    x0, y0, x1, y1 = (round(v) for v in g["bbx"])
    pixels[y0:y1, x0:x1] = color(angle)
    save_jpg(folder / "jpg" / f"q{i}.jpg", pixels)
  gt = {"imlist": [f"d{i}" for i in range(len(DB_ANGLES))], "qimlist": ["q0", "q1"],
        "gnd": [{k: (np.asarray(v, np.float64) if k == "bbx" else np.asarray(v, np.int64))
                 for k, v in g.items()} for g in GND]}
  (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gt, protocol=protocol))
  return folder


def run(tmp_path, load, **options):
  return spine.run(retrieval.PROTOCOL, load=load, options=options, out_dir=str(tmp_path))


def test_retrieval_cli_known_map(tmp_path, caplog):
  write_dataset(tmp_path / "data")
  model = MeanColorViT()
  with caplog.at_level(logging.INFO):
    results = run(tmp_path, lambda: (run_config(), model), dataset="roxford5k",
                  data_dir=str(tmp_path / "data"), protocol_name="cropped224", imsize=32,
                  batch_size=8)
  for setup, value in EXPECTED.items():
    assert results[setup]["mAP"] == pytest.approx(value, abs=1e-4), setup
  record = json.loads((tmp_path / "retrieval_roxford5k.json").read_text())
  assert record["medium"]["mAP"] == pytest.approx(EXPECTED["medium"], abs=1e-4)
  assert record["database"] == 10 and record["queries"] == 2 and record["query_crop"]
  assert record["protocol"] == "retrieval_cropped224+imsize=32" and not record["multiscale"]
  assert "medium, trained" in caplog.text

  # The dataset folder itself as data_dir; three scales of a solid color: the same descriptors.
  multi = retrieval.evaluate_retrieval(
      run_config(), model, dataset="roxford5k", data_dir=str(tmp_path / "data" / "roxford5k"),
      protocol_name="cropped224", imsize=32, multiscale=True, batch_size=8)
  assert multi["hard"]["mAP"] == pytest.approx(EXPECTED["hard"], abs=1e-4)

  # Whole queries (the authors' protocol) point away from their positives here: the box is what
  # the revisited protocol's own query handling adds.
  paper = retrieval.evaluate_retrieval(run_config(), model, dataset="roxford5k",
                                       data_dir=str(tmp_path / "data"), batch_size=8)
  assert paper["protocol"] == "retrieval_paper" and paper["medium"]["mAP"] < EXPECTED["medium"] - 20
  assert (paper["imsize"], paper["multiscale"], paper["query_crop"]) == (512, True, False)


def test_the_papers_protocol_is_the_authors_run():
  """The default preset is `paris_oxford_reid` of the authors' run.sh: --imsize 512
  --multiscale 1, whole queries; the earlier default is the named variant cropped224."""
  assert retrieval.settings() == ("paper", dict(imsize=512, multiscale=True, query_crop=False))
  assert retrieval.settings("cropped224") == (
      "cropped224", dict(imsize=224, multiscale=False, query_crop=True))
  assert retrieval.settings("paper", imsize=224, multiscale=True)[0] == "paper+imsize=224"
  with pytest.raises(ValueError, match="is not one of paper, cropped224"):
    retrieval.settings("dino")


@pytest.mark.parametrize("width, height", [(1024, 768), (768, 1024), (500, 333), (333, 500),
                                           (1023, 767), (600, 599), (300, 200), (512, 10),
                                           (5000, 7)])
def test_images_are_brought_to_512_px_as_pils_thumbnail(tmp_path, width, height):
  """Sizes as DINO's `img.thumbnail((512, 512), Image.ANTIALIAS)`: the longer side 512 (never
  enlarged), the aspect kept as PIL rounds it; the pixels are PIL's own thumbnail's."""
  image = Image.fromarray(np.random.default_rng(width).integers(
      0, 256, (height, width, 3), dtype=np.uint8))
  want = image.copy()
  want.thumbnail((512, 512), Image.LANCZOS)
  assert retrieval.thumbnail_size(width, height, 512) == want.size
  path = tmp_path / "x.png"
  image.save(path)
  spec = retrieval.ImageSpec(path, None, imsize=512, stride=1, mean=MEAN, std=STD,
                             scales=(1.0,))
  assert spec.shape == (want.size[1], want.size[0], 3)
  np.testing.assert_allclose(spec.load(), images.to_array(want, MEAN, STD), atol=1e-6)


def test_queries_are_whole_in_the_paper_and_cropped_in_the_variant(tmp_path):
  write_dataset(tmp_path / "data")
  query = tmp_path / "data" / "roxford5k" / "jpg" / "q0.jpg"  # 80 x 64, box 16..64 x 16..48
  spec = lambda crop: retrieval.ImageSpec(query, GND[0]["bbx"] if crop else None, imsize=512,
                                          stride=4, mean=MEAN, std=STD, scales=retrieval.SCALES)
  assert spec(False).shape == (64, 80, 3) and spec(True).shape == (32, 48, 3)


def test_multiscale_resizes_the_whole_image_as_torch_interpolate():
  """Each scale is the whole (not patch-cropped) image at floor(side x s), sampled at exactly
  scale s as `F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)`."""
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, 37, 53, 3)).astype(np.float32)
  for s in retrieval.SCALES[1:]:
    got = np.asarray(retrieval.rescale(jnp.asarray(x), s))
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                           scale_factor=s, mode="bilinear",
                                           align_corners=False).permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape == (2, math.floor(37 * s), math.floor(53 * s), 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_multiscale_descriptor_averages_the_cls_of_the_rescaled_whole_image():
  model = vit.ViT(width=16, depth=1, num_heads=2, patch_size=8, image_size=16,
                  dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).normal(size=(1, 45, 61, 3)).astype(np.float32)
  mesh = sharding.batch_mesh(jax.devices()[:1])
  got = np.asarray(retrieval.descriptor_fn(model, mesh=mesh, multiscale=True)(x))[0]
  cls = [np.asarray(model(retrieval.rescale(jnp.asarray(x), s)))[0, 0] for s in retrieval.SCALES]
  want = np.mean(cls, axis=0)
  np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-4, atol=1e-5)
  # Cropping to whole patches first (the earlier code) gives another descriptor at 1/sqrt(2).
  cropped = np.asarray(model(retrieval.rescale(jnp.asarray(x[:, :40, :56]), 2 ** -0.5)))[0, 0]
  assert not np.allclose(cropped, cls[1], atol=1e-3)


def test_ground_truth_read_without_running_code(tmp_path):
  gt = {"imlist": ["a", "b"], "qimlist": ["q"],
        "gnd": [{"easy": np.array([0]), "hard": [1], "junk": [], "bbx": (0.0, 0.0, 2.0, 2.0)}]}
  for protocol in (2, 5):
    path = tmp_path / f"gnd_{protocol}.pkl"
    path.write_bytes(pickle.dumps(gt, protocol=protocol))
    loaded = retrieval.load_ground_truth(path)
    np.testing.assert_array_equal(loaded["gnd"][0]["hard"], [1])
    assert loaded["gnd"][0]["bbx"].tolist() == [0.0, 0.0, 2.0, 2.0]

  marker = tmp_path / "ran"

  class Exploit:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  bad = tmp_path / "gnd_bad.pkl"
  bad.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Exploit()]}))
  with pytest.raises(retrieval.GroundTruthError, match=r"holds a (posix|os|nt)\.system object"):
    retrieval.load_ground_truth(bad)
  assert not marker.exists()

  with pytest.raises(retrieval.GroundTruthError, match="not a readable pickle"):
    retrieval.safe_unpickle(b"\x80\x04garbage", "x.pkl")
  with pytest.raises(retrieval.GroundTruthError, match="outside the 2 database images"):
    retrieval.check_ground_truth(
        {**gt, "gnd": [{"easy": [2], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]}]})
  with pytest.raises(ValueError, match="--dataset must be one of"):
    retrieval.dataset_dir(str(tmp_path), "oxford")


def test_descriptors_sharded_equal_single_device(tmp_path):
  """A real (tiny) ViT on images of three shapes, position embeddings resized: 8 devices and
  one device give the same descriptors, in item order."""
  rng = np.random.default_rng(0)
  paths = []
  for i, (h, w) in enumerate([(40, 56), (56, 40), (40, 56), (33, 47), (40, 56)]):
    paths.append(tmp_path / f"{i}.jpg")
    save_jpg(paths[-1], rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  model = vit.ViT(width=16, depth=1, num_heads=2, patch_size=8, image_size=16,
                  dtype=jnp.float32, rngs=nnx.Rngs(0))
  specs = [retrieval.ImageSpec(p, None, imsize=0, stride=8, mean=MEAN, std=STD, scales=(1.0,))
           for p in paths]
  assert specs[3].shape == (33, 47, 3)  # whole images: the patch embedding drops the rest

  def descriptors(devices):
    mesh = sharding.batch_mesh(devices)
    fn = retrieval.descriptor_fn(model, mesh=mesh)
    return images.map_images(fn, specs, load=lambda s: s.load(), shape_of=lambda s: s.shape,
                             mesh=mesh, batch_size=len(devices))

  sharded = descriptors(jax.devices())
  single = descriptors(jax.devices()[:1])
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(sharded, axis=1), 1.0, rtol=1e-5)
  one = model(jnp.asarray(specs[1].load()[None]))[0, 0]
  np.testing.assert_allclose(sharded[1], one / jnp.linalg.norm(one), rtol=1e-4, atol=1e-5)


def test_missing_ground_truth_fails_before_loading(tmp_path):
  def never(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded before the data were checked")

  with pytest.raises(FileNotFoundError, match="no gnd_rparis6k.pkl"):
    run(tmp_path, never, dataset="rparis6k", data_dir=str(tmp_path))


def test_map_images_keeps_item_order_across_shapes_and_chunks():
  """21 items of two shapes, interleaved, in global batches of 8 on 8 devices: several chunks
  per shape, padded last chunks; the outputs come back in item order, padding dropped."""
  shapes = [(8, 12, 3) if i % 3 else (12, 8, 3) for i in range(21)]
  loaded = []

  def load(i):
    loaded.append(i)
    return np.full(shapes[i], float(i), np.float32)

  out = images.map_images(jax.jit(lambda x: x.mean(axis=(1, 2))), list(range(21)), load=load,
                          shape_of=lambda i: shapes[i], batch_size=8)
  np.testing.assert_array_equal(out, np.repeat(np.arange(21.0)[:, None], 3, axis=1))
  assert sorted(loaded) == list(range(21))  # each image decoded once
  with pytest.raises(ValueError, match="not a multiple of the 8 devices"):
    images.map_images(lambda x: x, [0], load=load, shape_of=lambda i: (4, 4, 3), batch_size=6)
