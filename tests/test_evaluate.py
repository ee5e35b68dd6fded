"""Evaluation protocols (docs/method.md §12) against float64 NumPy references.

The backbone here is a small stand-in NNX module with the ViT's calling convention, so these
tests do not depend on sove_jax.models; the data are synthetic clusters in host batches shaped
like the data package's eval input.
"""
import json
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sove_jax import sharding
from sove_jax.evaluate import features, knn, linear, protocol, splits


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
  one_device = sharding.batch_mesh(jax.devices()[:1])
  whole = knn.knn_predict(train_f, train_y, test_f, chunk_size=1000, mesh=one_device, **kwargs)
  pieces = knn.knn_predict(train_f, train_y, test_f, chunk_size=17, **kwargs)
  np.testing.assert_array_equal(pieces, whole)


def test_class_balanced_subset_and_split_file(tmp_path):
  counts = np.array([1, 3, 50, 149, 1000])
  labels = np.random.default_rng(2).permutation(np.repeat(np.arange(5), counts))
  for fraction in (0.01, 0.1):
    idx = splits.class_balanced_subset(labels, fraction, seed=3)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < len(labels)
    per_class = np.bincount(labels[idx], minlength=5)
    np.testing.assert_array_equal(per_class, np.maximum(1, np.round(fraction * counts)))
    np.testing.assert_array_equal(idx, splits.class_balanced_subset(labels, fraction, seed=3))
  assert not np.array_equal(splits.class_balanced_subset(labels, 0.1, seed=3),
                            splits.class_balanced_subset(labels, 0.1, seed=4))
  path = tmp_path / "1percent.txt"
  path.write_text("# indices\n4\n\n17  # a comment\n2\n")
  np.testing.assert_array_equal(splits.split_indices(path), [2, 4, 17])
  with pytest.raises(ValueError, match="outside the 10 train examples"):
    splits.split_indices(path, num_examples=10)


def test_split_files_of_image_names_as_simclr_publishes_them(tmp_path):
  """SimCLRv2's 1percent.txt lists file names (`n01440764_10026.JPEG`); they are found among the
  train split's files, with or without folders, in the input's order."""
  names = [f"/data/train/{c}/{c}_{i}.JPEG" for c in ("n01", "n02") for i in range(5)]
  path = tmp_path / "1percent.txt"
  path.write_text("n02_3.JPEG\nn01_0.JPEG\nn02_0.JPEG\n")
  np.testing.assert_array_equal(splits.split_indices(path, names), [0, 5, 8])
  np.testing.assert_array_equal(splits.split_indices(path, lambda: names), [0, 5, 8])
  idx, said = splits.label_subset(np.arange(10) % 2, split_file=str(path), names=names)
  assert said == "split file 1percent.txt (3 images)" and list(idx) == [0, 5, 8]
  _, said = splits.label_subset(np.arange(100) % 2, fraction=0.1, seed=2)
  assert said.startswith("random class-balanced 10% (seed 2") and "not SimCLRv2's" in said
  (tmp_path / "bad.txt").write_text("n03_1.JPEG\n")
  with pytest.raises(ValueError, match="1 of its 1 images are not in the train split"):
    splits.split_indices(tmp_path / "bad.txt", names)
  with pytest.raises(ValueError, match="no file names"):
    splits.split_indices(path, None)
  (tmp_path / "twice.txt").write_text("n01_0.JPEG\nn01_0.JPEG\n")
  with pytest.raises(ValueError, match="twice"):
    splits.split_indices(tmp_path / "twice.txt", names)


# --- features ------------------------------------------------------------------------------------

def test_extract_features_sharded_equals_unsharded_and_drops_padding():
  rng = np.random.default_rng(4)
  images = rng.normal(size=(37, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 9, 37).astype(np.int32)
  w = rng.normal(size=(48, 5)).astype(np.float32)
  apply_fn = jax.jit(lambda x: x.reshape(x.shape[0], -1) @ w)
  batches = FakeEval(images, labels, 16)  # 3 batches, 11 padding rows
  mesh = sharding.batch_mesh()
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
  mesh = sharding.batch_mesh()
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
  """An input_fn over made splits: train (250 images), test (70), and the validation pair the
  data package defines: minival (the last 50 of train) and train-minival (the first 200)."""
  rng = np.random.default_rng(6)
  train = image_split(rng, 250, 4)
  test = image_split(rng, 70, 4, train[2])
  data = {"train": train[:2], "test": test[:2], "train-minival": (train[0][:200], train[1][:200]),
          "minival": (train[0][200:], train[1][200:])}

  def input_fn(data_config, *, split, global_batch_size, process_index=None,
               process_count=None, max_examples=-1):
    seen.append((data_config.source, data_config.name, split))
    x, y = data[split]
    if max_examples >= 0:
      x, y = x[:max_examples], y[:max_examples]
    return FakeEval(x, y, global_batch_size)

  return input_fn, data


def evaluate(module, tmp_path, config, model, baselines=(), **options):
  """The command's run, in process, on a stand-in loader: (results, the JSON written)."""
  results = protocol.run(module.PROTOCOL, load=lambda: (config, model), options=options,
                         out_dir=str(tmp_path), baselines=baselines)
  return results, json.loads((tmp_path / f"{module.PROTOCOL.name}.json").read_text())


def unit(f):
  f = np.asarray(f, np.float64)
  return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_knn_cli_with_stand_in_backbone(tmp_path, caplog):
  model, seen = StandInViT(), []
  input_fn, data = fake_data(seen)
  given = np.sort(np.random.default_rng(8).choice(250, 12, replace=False))
  (tmp_path / "split_1pct.txt").write_text("\n".join(map(str, given)))
  with caplog.at_level(logging.INFO):
    results, record = evaluate(
        knn, tmp_path, run_config(), model, baselines=("pixels",), input_fn=input_fn,
        dataset="tfds:imagenet2012", lowshot=True,
        lowshot_splits={0.01: str(tmp_path / "split_1pct.txt")})
  # The trained network's splits, then the same splits again for the pixel baseline.
  assert seen == [("tfds", "imagenet2012", "train"), ("tfds", "imagenet2012", "test")] * 2
  assert "k-NN top-1 (%)" in caplog.text and "test (memory train), trained" in caplog.text

  assert record["protocol"] == "knn" and record["step"] == "latest"
  assert (record["memory"], record["reported_on"], record["selected_on"]) == (
      "train", "test", None)
  assert set(record["top1"]) == {"full", "1%", "10%"}
  assert record["lowshot_labels"]["1%"] == "split file split_1pct.txt"
  assert "random class-balanced 10%" in record["lowshot_labels"]["10%"]
  (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
  cls = lambda x: unit(np.asarray(model(x))[:, 0])  # eager float64 reference features
  pixels = lambda x: unit(np.asarray(x).reshape(len(x), -1))

  subsets = {"full": np.arange(250), "1%": given,
             "10%": splits.class_balanced_subset(train_y, 0.1)}
  for got, feats in ((record["top1"], cls), (record["baselines"]["pixels"], pixels)):
    train_f, test_f = feats(train_x), feats(test_x)
    for name, idx in subsets.items():
      for k in (10, 20, 100, 200):
        ref, clear = knn_reference(train_f[idx], train_y[idx], test_f, k, 0.07, 4)
        want = 100 * np.mean(ref == test_y)
        assert abs(got[name][str(k)] - want) <= 100 * np.mean(~clear) + 1e-9
  for name in subsets:
    assert results["top1"][name] == {k: record["top1"][name][str(k)] for k in (10, 20, 100, 200)}
  assert record["top1"] != record["baselines"]["pixels"]
  assert results["top1"]["full"][20] > 60  # the stand-in's [CLS] separates the prototypes


def test_knn_reports_test_and_on_request_the_validation_figure(tmp_path, caplog):
  """The reported figure: memory train, queries test; --select_split=minival adds the one to
  choose by: memory train-minival, queries minival; the line and the JSON name both."""
  model, seen = StandInViT(), []
  input_fn, data = fake_data(seen)
  with caplog.at_level(logging.INFO):
    results, record = evaluate(knn, tmp_path, run_config(), model, input_fn=input_fn,
                               ks=(10, 20), select_split="minival")
  assert [s for *_, s in seen] == ["train", "test", "train-minival", "minival"]
  assert "validation minival (memory train-minival), trained" in caplog.text
  assert record["selected_on"] == "minival" and record["reported_on"] == "test"
  assert record["validation"]["split"] == "minival"
  assert record["validation"]["memory"] == "train-minival"
  cls = lambda x: unit(np.asarray(model(x))[:, 0])
  (mem_x, mem_y), (val_x, val_y) = data["train-minival"], data["minival"]
  for k in (10, 20):
    ref, clear = knn_reference(cls(mem_x), mem_y, cls(val_x), k, 0.07, 4)
    want = 100 * np.mean(ref == val_y)
    assert abs(record["validation"]["top1"][str(k)] - want) <= 100 * np.mean(~clear) + 1e-9
  assert set(record["top1"]) == {"full"}  # the test figure stays where the study reads it
  assert results["top1"]["validation"][20] == record["validation"]["top1"]["20"]


@pytest.mark.parametrize("convention", features.PROBE_CONVENTIONS)
def test_knn_votes_on_the_probes_features_on_request(tmp_path, convention):
  """--features=last4_cls / cls_meanpatch: the vote reads the probe's concatenation, each
  L2-normalized as one vector; the record names the features it read."""
  model, seen = StandInViT(), []
  input_fn, data = fake_data(seen)
  ks = (10, 20, 100, 200)
  _, record = evaluate(knn, tmp_path, run_config(), model, input_fn=input_fn, ks=ks,
                       features=convention)
  _, default = evaluate(knn, tmp_path, run_config(), model, input_fn=input_fn, ks=ks)
  assert record["features"] == convention and default["features"] == "cls"

  def feats(x):
    tokens, blocks = model(x, return_blocks=4)
    tokens = np.asarray(tokens, np.float64)
    if convention == "last4_cls":
      return unit(np.concatenate([np.asarray(b, np.float64)[:, 0] for b in blocks], axis=1))
    return unit(np.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=1))

  (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
  for k in ks:
    ref, clear = knn_reference(feats(train_x), train_y, feats(test_x), k, 0.07, 4)
    want = 100 * np.mean(ref == test_y)
    assert abs(record["top1"]["full"][str(k)] - want) <= 100 * np.mean(~clear) + 1e-9
  assert record["top1"] != default["top1"]  # on these data every convention votes otherwise


def test_knn_monitor_logs_every_k():
  model, seen = StandInViT(), []
  input_fn, _ = fake_data(seen)
  data = run_config().data
  mesh = sharding.batch_mesh()
  apply_fn = features.cls_features(model, mesh=mesh)
  rows = jax.NamedSharding(mesh, jax.P("data"))
  train = input_fn(data, split="train", global_batch_size=16)
  test = input_fn(data, split="test", global_batch_size=16)
  metrics = knn.knn_monitor(apply_fn, train, test, ks=(10, 20), num_classes=4, sharding=rows)
  train_f, train_y = features.extract_features(apply_fn, train)
  test_f, test_y = features.extract_features(apply_fn, test)
  acc = knn.knn_classify(train_f, train_y, test_f, test_y, ks=(10, 20), num_classes=4)
  assert metrics == {"knn/top1_k10": acc[10], "knn/top1_k20": acc[20]}


def test_the_monitors_features_are_the_evaluators():
  """`features.knn_features`, the function the trainer's monitor calls inside its own jit, is
  what `cls_features` computes: the global representation over max(norm, 1e-12)."""
  model = StandInViT()
  images = np.random.default_rng(3).normal(size=(4, 8, 8, 3)).astype(np.float32)
  graphdef, state = nnx.split(model)
  for pool in ("cls", "mean_patch"):
    want = features.cls_features(model, pool=pool)(images)
    got = jax.jit(lambda st, x: features.knn_features(nnx.merge(graphdef, st), x, pool))(
        state, images)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


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
def test_linear_selects_on_minival_and_reports_test(tmp_path, caplog, variant, convention):
  """The rate is chosen on minival (heads trained on train-minival), then one head at that rate
  is trained on the whole train split and reported on test; the line and the JSON say so."""
  model, seen = StandInViT(), []
  input_fn, data = fake_data(seen)
  kw = dict(lrs=(0.0001, 0.1), epochs=20, probe_batch_size=64)
  with caplog.at_level(logging.INFO):
    results, record = evaluate(linear, tmp_path, run_config(variant), model,
                               input_fn=input_fn, **kw)
  # train = train-minival + minival: the train split is not read a third time.
  assert [s for *_, s in seen] == ["train-minival", "minival", "test"]
  assert record["protocol"] == "linear_fast" and record["convention"] == convention
  assert (record["selected_on"], record["select_train"]) == ("minival", "train-minival")
  assert (record["train"], record["reported_on"]) == ("train", "test")
  assert "test top-1" in caplog.text and "rate chosen on minival" in caplog.text
  assert set(record["per_lr"]) == {"0.0001", "0.1"} and record["lr"] == 0.1
  fn = features.probe_features(model, convention)
  feats = lambda split: (np.asarray(fn(data[split][0])), data[split][1])
  on_val = linear.linear_probe_sweep(*feats("train-minival"), *feats("minival"), num_classes=4,
                                     lrs=kw["lrs"], epochs=20, batch_size=64)
  for lr, acc in on_val.items():
    assert abs(record["per_lr"][f"{lr:g}"] - acc) <= 100 / 50 + 1e-9
  train_f = np.concatenate([feats("train-minival")[0], feats("minival")[0]])
  train_y = np.concatenate([feats("train-minival")[1], feats("minival")[1]])
  want = linear.train_linear_probe(train_f, train_y, *feats("test"), num_classes=4, lr=0.1,
                                   epochs=20, batch_size=64)
  assert abs(record["top1"] - want) <= 100 / 70 + 1e-9
  assert results["top1"] == record["top1"] > 60


def test_linear_without_validation_says_it_chose_on_test(tmp_path):
  model, seen = StandInViT(), []
  input_fn, _ = fake_data(seen)
  _, record = evaluate(linear, tmp_path, run_config(), model, input_fn=input_fn,
                       select_split="none", lrs=(0.01, 0.1), epochs=5, probe_batch_size=64)
  assert [s for *_, s in seen] == ["train", "test"]
  assert record["selected_on"] == "test" and record["select_train"] == "train"
  assert record["top1"] == max(record["per_lr"].values())


def test_linear_cli_pixel_baseline(tmp_path):
  """The pixel baseline probes the flattened, L2-normalized images with the same sweep."""
  model, seen = StandInViT(), []
  input_fn, data = fake_data(seen)
  kwargs = dict(lrs=(0.01, 0.1), epochs=20, probe_batch_size=64)
  _, record = evaluate(linear, tmp_path, run_config(), model, baselines=("pixels",),
                       input_fn=input_fn, select_split="", **kwargs)
  pixels = record["baselines"]["pixels"]
  assert pixels["convention"] == "pixels"
  flat = lambda x: unit(np.asarray(x).reshape(len(x), -1)).astype(np.float32)
  (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
  want = linear.linear_probe_sweep(flat(train_x), train_y, flat(test_x), test_y, num_classes=4,
                                   lrs=kwargs["lrs"], epochs=20, batch_size=64)
  for lr, acc in want.items():
    assert abs(pixels["per_lr"][f"{lr:g}"] - acc) <= 100 / len(test_y) + 1e-9


class Batches:
  """A training stream of fixed host batches: `steps_per_epoch` a epoch, then again."""

  def __init__(self, images, labels, batch_size):
    self.images, self.labels, self.batch_size = images, labels, batch_size
    self.steps_per_epoch, self.i = len(labels) // batch_size, 0

  def __next__(self):
    b, k = self.batch_size, self.i % self.steps_per_epoch
    self.i += 1
    return {"image": self.images[k * b:(k + 1) * b], "label": self.labels[k * b:(k + 1) * b]}


def test_the_papers_augmented_probe_is_dinos_sgd():
  """Every step: the frozen features of the batch as they come (no standardization), one head
  per rate initialized N(0, 0.01), SGD momentum 0.9 without decay at rate x batch / 256 x the
  per-epoch cosine factor (1 + cos(pi e / E)) / 2: heads match a float64 NumPy replay."""
  rng = np.random.default_rng(9)
  x = rng.normal(size=(48, 6)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)
  train = Batches(x, y, 16)
  mesh = sharding.batch_mesh()
  rows = jax.NamedSharding(mesh, jax.P("data"))
  lrs, epochs = (0.5, 8.0), 3
  acc = linear.augmented_probe_sweep(jax.jit(lambda z: z), train, FakeEval(x, y, 16),
                                     sharding=rows, num_classes=4, lrs=lrs, epochs=epochs, seed=5)
  w = 0.01 * np.asarray(jax.random.normal(jax.random.PRNGKey(5), (2, 6, 4)), np.float64)
  b, vw, vb = np.zeros((2, 4)), np.zeros_like(w), np.zeros((2, 4))
  for epoch in range(epochs):
    rate = np.asarray(lrs) * 16 / 256 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    for k in range(3):
      xb, yb = x[16 * k:16 * (k + 1)].astype(np.float64), y[16 * k:16 * (k + 1)]
      logits = np.einsum("bd,hdc->hbc", xb, w) + b[:, None]
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      p[:, np.arange(16), yb] -= 1.0
      gw, gb = np.einsum("bd,hbc->hdc", xb, p) / 16, p.mean(1)
      vw, vb = 0.9 * vw + gw, 0.9 * vb + gb
      w, b = w - rate[:, None, None] * vw, b - rate[:, None] * vb
  pred = (np.einsum("bd,hdc->hbc", x, w) + b[:, None]).argmax(-1)
  for h, lr in enumerate(lrs):
    assert acc[lr] == pytest.approx(100 * np.mean(pred[h] == y)), lr
  assert linear.cosine_per_epoch(0, 100) == 1.0 and linear.cosine_per_epoch(50, 100) == 0.5
  assert len(linear.PAPER_LRS) == 45 and linear.PAPER_LRS[0] == 1e-4 and linear.PAPER_LRS[-1] == 9


def test_the_papers_probe_reads_fresh_random_resized_crops(tmp_path, monkeypatch):
  """`--protocol=paper` trains on the data package's labeled input, RandomResizedCrop(area
  0.08-1, aspect 3/4-4/3) + flip at the evaluation crop size each epoch, choosing the rate on
  minival (heads on train-minival) and reporting test with a head retrained on train."""
  from configs import default
  from sove_jax.data import labeled, sources
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 12)
  pictures = (rng.integers(0, 60, (48, 16, 16, 3)) + 60 * labels[:, None, None, None])
  sources.write_image_folder(str(tmp_path / "data"), "train", pictures.astype(np.uint8), labels)
  sources.write_image_folder(str(tmp_path / "data"), "test", pictures[::4].astype(np.uint8),
                             labels[::4])
  config = default.get_config()
  config.batch_size = 8
  config.model.variant = "ti"
  config.data.update(source="folder", data_dir=str(tmp_path / "data"), eval_resize=16,
                     eval_crop=16, minival_examples=8, prefetch=1)
  asked = []
  real = labeled.labeled_train_input

  def spy(data_config, **kwargs):
    asked.append(kwargs)
    return real(data_config, **kwargs)

  monkeypatch.setattr(labeled, "labeled_train_input", spy)
  from sove_jax.data import pipeline
  results = linear.evaluate_linear(config, StandInViT(), input_fn=pipeline.eval_input,
                                   protocol_name="paper", lrs=(0.01, 1.0), epochs=2,
                                   probe_batch_size=8)
  assert [a["split"] for a in asked] == ["train-minival", "train"]
  for a in asked:
    assert (a["size"], a["scale"], a["ratio"], a["flip"]) == (16, (0.08, 1.0), (0.75, 4 / 3),
                                                              True)
  assert results["protocol"] == "linear_paper" and results["convention"] == "last4_cls"
  assert (results["selected_on"], results["reported_on"], results["epochs"]) == (
      "minival", "test", 2)
  assert set(results["per_lr"]) == {0.01, 1.0} and 0 <= results["top1"] <= 100


@pytest.mark.slow
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
