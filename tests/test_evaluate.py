"""Evaluation protocols (docs/method.md §12) against float64 NumPy references.

The backbone here is a small stand-in NNX module with the ViT's calling convention, so these
tests do not depend on sove_jax.models; the data are synthetic clusters in host batches shaped
like the data package's eval input.
"""
import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sove_jax.evaluate import features, knn, linear


# --- stand-ins ---------------------------------------------------------------------------------

class StandInViT(nnx.Module):
  """Linear patch embedding, a [CLS] token and residual tanh blocks that mix in the token mean
  (so [CLS] depends on the image); the ViT's signature and output layout."""

  def __init__(self, *, patch=2, width=8, depth=5, seed=0):
    rngs = nnx.Rngs(seed)
    self.patch, self.depth = patch, depth
    self.embed = nnx.Linear(patch * patch * 3, width, rngs=rngs)
    self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, width)))
    self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])

  def __call__(self, images, mask=None, *, key=None, return_blocks=0):
    b, h, w, c = images.shape
    p = self.patch
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.embed(x.reshape(b, (h // p) * (w // p), p * p * c))
    x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1])), x], axis=1)
    outs = []
    for block in self.blocks:
      x = x + jnp.tanh(block(x + jnp.mean(x, axis=1, keepdims=True)))
      outs.append(x)
    return (x, outs[-return_blocks:]) if return_blocks else x


class FakeEval:
  """Re-iterable eval input: fixed-size host batches, the last one padded with garbage rows
  marked valid=False."""

  def __init__(self, images, labels, batch_size):
    self.images, self.labels, self.batch_size = images, labels, batch_size
    self.num_examples = len(labels)
    self.num_batches = -(-self.num_examples // batch_size)

  def __iter__(self):
    b = self.batch_size
    for start in range(0, self.num_examples, b):
      img, lab = self.images[start:start + b], self.labels[start:start + b]
      pad = b - len(lab)
      valid = np.r_[np.ones(len(lab), bool), np.zeros(pad, bool)]
      img = np.concatenate([img, np.full((pad,) + img.shape[1:], 1e3, np.float32)])
      lab = np.r_[lab, np.full(pad, -7)].astype(np.int32)
      yield {"image": img, "label": lab, "valid": valid}


def clustered(rng, n, dim, num_classes, noise, centers=None):
  centers = rng.normal(size=(num_classes, dim)) if centers is None else centers
  y = rng.integers(0, num_classes, n)
  return (centers[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y, centers


def image_split(rng, n, num_classes, prototypes=None):
  """Images whose class is a noisy prototype image."""
  x, y, prototypes = clustered(rng, n, 8 * 8 * 3, num_classes, 0.8, prototypes)
  return x.reshape(n, 8, 8, 3), y.astype(np.int32), prototypes


def knn_reference(train_f, train_y, test_f, k, temperature, num_classes):
  """float64 DINO k-NN; also which rows have a clear decision (no near-tie among the class
  scores nor at the k-th neighbor), where float32 must agree exactly."""
  tr = train_f.astype(np.float64)
  te = test_f.astype(np.float64)
  tr /= np.linalg.norm(tr, axis=1, keepdims=True)
  te /= np.linalg.norm(te, axis=1, keepdims=True)
  sim = te @ tr.T
  k = min(k, len(tr))
  order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  weights = np.exp(np.take_along_axis(sim, order, axis=1) / temperature)
  scores = np.zeros((len(te), num_classes))
  np.add.at(scores, (np.arange(len(te))[:, None], train_y[order]), weights)
  top2 = np.sort(scores, axis=1)[:, -2:]
  clear = (top2[:, 1] - top2[:, 0]) > 1e-4 * top2[:, 1]
  if k < len(tr):
    ranked = -np.sort(-sim, axis=1)
    clear &= (ranked[:, k - 1] - ranked[:, k]) > 1e-5
  return scores.argmax(axis=1), clear


# --- k-NN ---------------------------------------------------------------------------------------

# 37 rows: shards hold fewer rows than k and 3 are padding; negated queries make every real
# similarity negative, so padding rows (similarity 0) must be kept out of the top k.
@pytest.mark.parametrize("n_train, sign", [(603, 1.0), (37, -1.0)])
def test_knn_matches_float64_reference(n_train, sign):
  rng = np.random.default_rng(0)
  train_f, train_y, centers = clustered(rng, n_train, 16, 6, 1.0)
  test_f, test_y, _ = clustered(rng, 150, 16, 6, 1.0, centers)
  if sign < 0:
    train_f, test_f = np.abs(train_f), -np.abs(test_f)
  ks, temperature = (1, 10, 20, 100, 200), 0.07
  preds = knn.knn_predict(train_f, train_y, test_f, ks=ks, temperature=temperature,
                          num_classes=6, chunk_size=64)  # 8 devices, 3 chunks (last padded)
  acc = knn.knn_classify(train_f, train_y, test_f, test_y, ks=ks, chunk_size=64)
  for k, pred in zip(ks, preds):
    ref, clear = knn_reference(train_f, train_y, test_f, k, temperature, 6)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(pred[clear], ref[clear], err_msg=f"k={k}")
    assert abs(acc[k] - 100 * np.mean(ref == test_y)) <= 100 * np.mean(~clear) + 1e-9
  if sign > 0:
    assert 30 < acc[20] < 100  # non-trivial data: the vote matters


def test_knn_chunked_sharded_equals_unchunked_single_device():
  rng = np.random.default_rng(1)
  train_f, train_y, centers = clustered(rng, 301, 12, 5, 1.2)
  test_f, _, _ = clustered(rng, 90, 12, 5, 1.2, centers)
  kwargs = dict(ks=(10, 20, 100, 200), num_classes=5)
  one_device = features.batch_mesh(jax.devices()[:1])
  whole = knn.knn_predict(train_f, train_y, test_f, chunk_size=1000, mesh=one_device, **kwargs)
  pieces = knn.knn_predict(train_f, train_y, test_f, chunk_size=17, **kwargs)
  np.testing.assert_array_equal(pieces, whole)


def test_class_balanced_subset_and_split_file(tmp_path):
  counts = np.array([1, 3, 50, 149, 1000])
  labels = np.random.default_rng(2).permutation(np.repeat(np.arange(5), counts))
  for fraction in (0.01, 0.1):
    idx = knn.class_balanced_subset(labels, fraction, seed=3)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < len(labels)
    per_class = np.bincount(labels[idx], minlength=5)
    np.testing.assert_array_equal(per_class, np.maximum(1, np.round(fraction * counts)))
    np.testing.assert_array_equal(idx, knn.class_balanced_subset(labels, fraction, seed=3))
  assert not np.array_equal(knn.class_balanced_subset(labels, 0.1, seed=3),
                            knn.class_balanced_subset(labels, 0.1, seed=4))
  path = tmp_path / "1percent.txt"
  path.write_text("# indices\n4\n\n17  # a comment\n2\n")
  np.testing.assert_array_equal(knn.read_split_file(path), [4, 17, 2])


# --- features ------------------------------------------------------------------------------------

def test_extract_features_sharded_equals_unsharded_and_drops_padding():
  rng = np.random.default_rng(4)
  images = rng.normal(size=(37, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 9, 37).astype(np.int32)
  w = rng.normal(size=(48, 5)).astype(np.float32)
  apply_fn = jax.jit(lambda x: x.reshape(x.shape[0], -1) @ w)
  batches = FakeEval(images, labels, 16)  # 3 batches, 11 padding rows
  mesh = features.batch_mesh()
  sharded = features.extract_features(apply_fn, batches,
                                      sharding=jax.NamedSharding(mesh, jax.P("data")))
  plain = features.extract_features(apply_fn, batches)
  expected = images.reshape(37, -1).astype(np.float64) @ w.astype(np.float64)
  for f, y in (sharded, plain):
    assert f.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, labels)


def test_long_feature_passes_log_their_progress(monkeypatch, caplog):
  """Every PROGRESS_EVERY_SECONDS a line says how far a pass is (here every batch)."""
  monkeypatch.setattr(features, "PROGRESS_EVERY_SECONDS", 0.0)
  images = np.zeros((37, 4, 4, 3), np.float32)
  with caplog.at_level(logging.INFO):
    features.extract_features(lambda x: x.reshape(x.shape[0], -1), FakeEval(
        images, np.zeros(37, np.int32), 16), name="features of test")
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features of")]
  assert [line.split(",")[0] for line in lines] == [
      "features of test: 1/3 batches", "features of test: 2/3 batches",
      "features of test: 3/3 batches"]
  assert "ETA" in lines[0] and "images/s" in lines[0]


def test_feature_conventions():
  model = StandInViT(depth=5)
  images = np.random.default_rng(5).normal(size=(6, 8, 8, 3)).astype(np.float32)
  tokens, blocks = model(images, return_blocks=5)
  tokens = np.asarray(tokens, np.float64)
  blocks = [np.asarray(b, np.float64) for b in blocks]

  cls = tokens[:, 0] / np.linalg.norm(tokens[:, 0], axis=1, keepdims=True)
  last4 = np.concatenate([b[:, 0] for b in blocks[-4:]], axis=1)
  meanpatch = np.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=1)
  mesh = features.batch_mesh()
  for got, want in ((features.cls_features(model)(images), cls),
                    (features.cls_features(model, mesh=mesh)(images), cls),
                    (features.probe_features(model, "last4_cls")(images), last4),
                    (features.probe_features(model, "cls_meanpatch")(images), meanpatch)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError):
    features.probe_features(model, "last2_cls")

  shallow = StandInViT(depth=2)  # fewer than 4 blocks: all of them
  _, blocks = shallow(images, return_blocks=2)
  want = np.concatenate([np.asarray(b, np.float64)[:, 0] for b in blocks], axis=1)
  got = features.probe_features(shallow, "last4_cls")(images)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# --- CLIs and the monitor --------------------------------------------------------------------

def run_config(variant="ti"):
  c = ml_collections.ConfigDict()
  c.batch_size = 32
  c.knn_k = (10, 20, 100, 200)
  c.knn_temperature = 0.07
  c.data = ml_collections.ConfigDict(
      {"source": "fashion_mnist", "name": "", "data_dir": "", "train_split": "train",
       "eval_split": "test"})
  c.model = ml_collections.ConfigDict({"variant": variant})
  return c


def fake_data(seen):
  rng = np.random.default_rng(6)
  train = image_split(rng, 250, 4)
  test = image_split(rng, 70, 4, train[2])
  splits = {"train": train[:2], "test": test[:2]}

  def input_fn(data_config, *, split, global_batch_size, process_index=None,
               process_count=None, max_examples=-1):
    seen.append((data_config.source, data_config.name, split))
    return FakeEval(*splits[split], global_batch_size)

  return input_fn, splits


def test_knn_cli_with_stand_in_backbone(tmp_path):
  model, seen = StandInViT(), []
  input_fn, splits = fake_data(seen)
  given = np.sort(np.random.default_rng(8).choice(250, 12, replace=False))
  (tmp_path / "split_1pct.txt").write_text("\n".join(map(str, given)))
  results = knn.evaluate_checkpoint(
      str(tmp_path), load_backbone=lambda workdir, step, which: (run_config(), model),
      input_fn=input_fn, dataset="tfds:imagenet2012", lowshot=True,
      lowshot_splits={0.01: str(tmp_path / "split_1pct.txt")}, baselines=("pixels",))
  # The trained network's splits, then the same splits again for the pixel baseline.
  assert seen == [("tfds", "imagenet2012", "train"), ("tfds", "imagenet2012", "test")] * 2

  record = json.loads((tmp_path / "knn.json").read_text())
  assert set(record["top1"]) == {"full", "1%", "10%"}
  (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]

  def cls(x):  # eager float64 reference features
    f = np.asarray(model(x), np.float64)[:, 0]
    return f / np.linalg.norm(f, axis=1, keepdims=True)

  def pixels(x):
    f = np.asarray(x, np.float64).reshape(len(x), -1)
    return f / np.linalg.norm(f, axis=1, keepdims=True)

  subsets = {"full": np.arange(250), "1%": given,
             "10%": knn.class_balanced_subset(train_y, 0.1)}
  for got, feats in ((record["top1"], cls), (record["baselines"]["pixels"], pixels)):
    train_f, test_f = feats(train_x), feats(test_x)
    for name, idx in subsets.items():
      for k in (10, 20, 100, 200):
        ref, clear = knn_reference(train_f[idx], train_y[idx], test_f, k, 0.07, 4)
        want = 100 * np.mean(ref == test_y)
        assert abs(got[name][str(k)] - want) <= 100 * np.mean(~clear) + 1e-9
  for name in subsets:
    assert results[name] == {k: record["top1"][name][str(k)] for k in (10, 20, 100, 200)}
  assert record["top1"] != record["baselines"]["pixels"]
  assert results["full"][20] > 60  # the stand-in's [CLS] separates the prototypes


def test_knn_monitor_logs_every_k():
  model, seen = StandInViT(), []
  input_fn, _ = fake_data(seen)
  data = run_config().data
  mesh = features.batch_mesh()
  apply_fn = features.cls_features(model, mesh=mesh)
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  train = input_fn(data, split="train", global_batch_size=16)
  test = input_fn(data, split="test", global_batch_size=16)
  metrics = knn.knn_monitor(apply_fn, train, test, ks=(10, 20), num_classes=4,
                            sharding=sharding)
  train_f, train_y = features.extract_features(apply_fn, train)
  test_f, test_y = features.extract_features(apply_fn, test)
  acc = knn.knn_classify(train_f, train_y, test_f, test_y, ks=(10, 20), num_classes=4)
  assert metrics == {"knn/top1_k10": acc[10], "knn/top1_k20": acc[20]}


# --- linear probe ------------------------------------------------------------------------------

def separable(rng, n, w_true):
  """Labels argmax(x w_true), keeping points with a logit margin: linearly separable, but
  not by the nearest class mean."""
  x = rng.normal(size=(4 * n, w_true.shape[0]))
  logits = x @ w_true
  top2 = np.sort(logits, axis=1)[:, -2:]
  keep = (top2[:, 1] - top2[:, 0]) > 0.5
  return x[keep][:n].astype(np.float32), logits[keep][:n].argmax(axis=1)


def test_linear_probe_separable():
  rng = np.random.default_rng(7)
  w_true = rng.normal(size=(10, 4))
  train_x, train_y = separable(rng, 800, w_true)
  test_x, test_y = separable(rng, 400, w_true)
  kwargs = dict(num_classes=4, epochs=40, batch_size=128)
  sweep = linear.linear_probe_sweep(train_x, train_y, test_x, test_y, lrs=(0.001, 0.1),
                                    **kwargs)
  assert sweep[0.1] >= 97.0
  assert sweep[0.001] < sweep[0.1]  # the heads really train at their own rates
  single = linear.train_linear_probe(train_x, train_y, test_x, test_y, lr=0.1, **kwargs)
  assert abs(single - sweep[0.1]) <= 100 / 400 + 1e-9


@pytest.mark.parametrize("variant, convention", [("ti", "last4_cls"), ("b", "cls_meanpatch")])
def test_linear_cli_with_stand_in_backbone(tmp_path, variant, convention):
  model, seen = StandInViT(), []
  input_fn, _ = fake_data(seen)
  results = linear.evaluate_checkpoint(
      str(tmp_path), load_backbone=lambda workdir, step, which: (run_config(variant), model),
      input_fn=input_fn, lrs=(0.01, 0.1), epochs=20, probe_batch_size=64)
  record = json.loads((tmp_path / "linear.json").read_text())
  assert record["convention"] == results["convention"] == convention
  assert record["top1"] == max(record["per_lr"].values()) == results["top1"]
  assert set(record["per_lr"]) == {"0.01", "0.1"}
  assert results["top1"] > 60


def test_linear_cli_pixel_baseline(tmp_path):
  """The pixel baseline probes the flattened, L2-normalized images with the same sweep."""
  model, seen = StandInViT(), []
  input_fn, splits = fake_data(seen)
  kwargs = dict(lrs=(0.01, 0.1), epochs=20, probe_batch_size=64)
  linear.evaluate_checkpoint(
      str(tmp_path), load_backbone=lambda workdir, step, which: (run_config(), model),
      input_fn=input_fn, baselines=("pixels",), **kwargs)
  record = json.loads((tmp_path / "linear.json").read_text())
  pixels = record["baselines"]["pixels"]
  assert pixels["convention"] == "pixels"

  def flat(x):
    f = np.asarray(x, np.float32).reshape(len(x), -1)
    return f / np.linalg.norm(f, axis=1, keepdims=True)

  (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
  want = linear.linear_probe_sweep(flat(train_x), train_y, flat(test_x), test_y, num_classes=4,
                                   lrs=kwargs["lrs"], epochs=20, batch_size=64)
  for lr, acc in want.items():
    assert abs(pixels["per_lr"][f"{lr:g}"] - acc) <= 100 / len(test_y) + 1e-9


def test_random_init_baseline_is_the_runs_first_teacher():
  """The random-init baseline is the teacher a run with that config starts from (same seed,
  before any step), and another seed gives another network."""
  from configs import smoke
  from sove_jax import optim, state as state_lib
  from sove_jax.evaluate import backbone
  config = smoke.get_config()
  config.seed = 3
  tx = optim.make_optimizer(config, optim.make_schedules(config, 1, 1))
  first = state_lib.make_init(config, tx, config.data.global_size)(jax.random.PRNGKey(3))
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(2, config.data.global_size, config.data.global_size, 3)), jnp.float32)
  from sove_jax.models import network
  graphdef, _ = network.abstract_network(config.model, config.data.global_size)
  want = nnx.merge(graphdef, first.teacher).backbone(images)
  got = backbone.random_backbone(config)(images)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  config.seed = 4
  other = backbone.random_backbone(config)(images)
  assert not np.allclose(np.asarray(other), np.asarray(want), atol=1e-3)
