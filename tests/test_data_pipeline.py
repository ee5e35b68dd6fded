"""Train and eval pipelines: contract shapes, determinism, resume, per-process shares, skipping."""
import itertools
import json
import logging
import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import default
from sove_jax import configuration
from sove_jax.data import pipeline, sources


def _config(**overrides):
  d = default.get_config().data
  d.update(global_size=16, local_size=8, num_local=2, eval_resize=16, eval_crop=16, prefetch=1)
  d.update(**overrides)
  return d


def _arrays(n=40, size=16, channels=3):
  """Random images whose label is their index, so every batch says which examples it holds."""
  images = np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  return sources.ArraySource(images, np.arange(n), name="arrays")


def _train(src, d=None, *, batch=8, seed=0, index=0, count=1, patch=4):
  d = d or _config()
  configuration.validate_data(d, patch_size=patch, global_batch_size=batch, process_count=count)
  return pipeline.TrainInput(src, d, patch_size=patch, global_batch_size=batch, seed=seed,
                             process_index=index, process_count=count)


def _check_train_batch(b, n, G, N, S, L):
  assert set(b) == {"global", "local", "mask", "label"} if N else {"global", "mask", "label"}
  assert b["global"].shape == (n, 2, G, G, 3) and b["global"].dtype == np.float32
  if N:
    assert b["local"].shape == (n, N, S, S, 3) and b["local"].dtype == np.float32
  assert b["mask"].shape == (n, 2, L) and b["mask"].dtype == bool
  assert b["label"].shape == (n,) and b["label"].dtype == np.int32
  for k in ("global", "local"):
    if k in b:
      assert np.isfinite(b[k]).all() and b[k].std() > 0.1


def _check_block_mask_counts(mask, ratio, L):
  """The authors' block masks never exceed ratio * L and may end a little short of it."""
  counts = mask.sum(-1)
  assert (counts <= ratio * L).all() and (counts >= 0.6 * ratio * L).all(), counts


def test_default_config_trains_and_evaluates_on_fashion_mnist():
  c = default.get_config()
  d, p = c.data, c.model.patch_size
  train = pipeline.train_input(d, patch_size=p, global_batch_size=32, seed=0, process_index=0,
                               process_count=1)
  assert train.num_examples == 60000 and train.steps_per_epoch == 60000 // 32
  b = next(train)
  L = (d.global_size // p) ** 2
  _check_train_batch(b, 32, d.global_size, d.num_local, d.local_size, L)
  _check_block_mask_counts(b["mask"], d.mask_ratio, L)
  # Gray pictures in 3 channels: before normalization the channels are equal.
  raw = b["global"] * np.array(d.std) + np.array(d.mean)
  np.testing.assert_allclose(raw[..., 0], raw[..., 2], atol=1e-5)
  ev = pipeline.eval_input(d, split="test", global_batch_size=128, process_index=0, process_count=1,
                           max_examples=300)
  out = list(ev)
  assert ev.num_examples == 300 and len(out) == 3 and out[0]["image"].shape == (128, 28, 28, 3)
  labels = np.concatenate([x["label"][x["valid"]] for x in out])
  np.testing.assert_array_equal(labels, sources.fashion_mnist("test").labels[:300])  # split order


def test_paper_recipe_from_an_image_folder(tmp_path):
  rng = np.random.default_rng(1)
  photos = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for h, w in [(180, 240), (260, 200), (120, 330), (300, 300)]]  # sizes differ
  sources.write_image_folder(str(tmp_path), "train", photos, [0, 1, 0, 1], image_format="jpeg")
  assert len(sources.image_folder(str(tmp_path), "train")) == 4
  d = _config(source="folder", data_dir=str(tmp_path), global_size=224, local_size=96, num_local=10,
              global_scale=(0.14, 1.0), eval_resize=256, eval_crop=224)
  b = next(_train(sources.image_folder(str(tmp_path), "train"), d, batch=4, patch=16))
  _check_train_batch(b, 4, 224, 10, 96, 196)
  _check_block_mask_counts(b["mask"], 0.3, 196)


def test_no_local_crops_and_random_masks():
  b = next(_train(_arrays(), _config(num_local=0, mask_type="random", mask_ratio=0.5)))
  _check_train_batch(b, 8, 16, 0, 8, 16)
  np.testing.assert_array_equal(b["mask"].sum(-1), 8)


def test_translation_moves_the_views_and_leaves_the_rest_of_the_batch_alone():
  """data.translate shifts every view after its crop (a black border of the shift's width) and
  draws from its own stream: crops, flips and masks are those of the run without it."""
  src = _arrays()
  plain = next(_train(src, _config(num_local=1, color_jitter_prob=0.0, grayscale_prob=0.0)))
  moved = next(_train(src, _config(num_local=1, color_jitter_prob=0.0, grayscale_prob=0.0,
                                   translate=3)))
  np.testing.assert_array_equal(plain["mask"], moved["mask"])
  np.testing.assert_array_equal(plain["label"], moved["label"])
  for key in ("global", "local"):
    a, b = plain[key], moved[key]
    assert a.shape == b.shape and not np.allclose(a, b)
    black = (b == b.min(axis=(2, 3), keepdims=True)).all(axis=-1)   # normalized 0 on any row
    rows_or_cols = black.all(axis=3).any(axis=2) | black.all(axis=2).any(axis=2)
    assert rows_or_cols.mean() > 0.5   # most views (those shifted at all) have a black edge
    # Each view is its plain self moved by at most 3 px: some shift of the plain view matches.
    for i, v in itertools.product(range(a.shape[0]), range(a.shape[1])):
      fits = [np.allclose(b[i, v, max(dy, 0):b.shape[2] + min(dy, 0),
                            max(dx, 0):b.shape[3] + min(dx, 0)],
                          a[i, v, max(-dy, 0):a.shape[2] - max(dy, 0),
                            max(-dx, 0):a.shape[3] - max(dx, 0)], atol=1e-5)
              for dy in range(-3, 4) for dx in range(-3, 4)]
      assert any(fits), (i, v)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_batches():
  src = _arrays()
  # The same stream on any number of threads.
  a, b, c = _train(src, seed=3), _train(src, _config(threads=1), seed=3), _train(src, seed=4)
  for _ in range(2):
    x, y, z = next(a), next(b), next(c)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(x["label"], z["label"]) and not np.allclose(x["global"], z["global"])


@pytest.mark.slow
def test_a_restored_input_continues_the_stream():
  src = _arrays()
  train = _train(src)  # 5 steps per epoch
  for _ in range(3):
    next(train)
  state = json.loads(json.dumps(train.get_state()))
  expected = [next(train) for _ in range(4)]  # crosses into the second epoch
  resumed = _train(src)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert resumed.get_state() == train.get_state()
  assert train.get_state() == {"epoch": 1, "position": 16, "process_count": 1}


@pytest.mark.slow
def test_two_processes_read_disjoint_examples_that_cover_the_split():
  src = _arrays(n=41)  # 41 // 2 = 20 each; one example waits for the next epoch's order
  seen = []
  for index in range(2):
    train = _train(src, index=index, count=2)
    assert train.steps_per_epoch == 5 and train.batch_size == 4
    epoch = [next(train)["label"] for _ in range(5)]
    seen.append(np.concatenate(epoch))
    assert len(set(seen[-1])) == 20
    second = np.concatenate([next(train)["label"] for _ in range(5)])
    assert not np.array_equal(second, seen[-1])  # each epoch has its own order
  assert not set(seen[0]) & set(seen[1])
  assert len(set(seen[0]) | set(seen[1])) == 40


def test_eval_yields_every_example_exactly_once_over_processes():
  src = _arrays(n=37)
  d = _config()
  per_process = []
  for index in range(2):
    ev = pipeline.EvalInput(src, d, global_batch_size=8, process_index=index, process_count=2)
    first, again = list(ev), list(ev)  # re-iterable
    assert len(first) == ev.num_batches == 5  # ceil(ceil(37 / 2) / 4)
    for x, y in zip(first, again):
      np.testing.assert_array_equal(x["image"], y["image"])
    b = first[0]
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["valid"].dtype == bool
    valid = np.concatenate([x["valid"] for x in first])
    labels = np.concatenate([x["label"] for x in first])
    assert (labels[~valid] == -1).all()
    per_process.append(labels[valid])
  everything = np.concatenate(per_process)
  np.testing.assert_array_equal(np.sort(everything), np.arange(37))
  ev = pipeline.EvalInput(src, d, global_batch_size=8, process_index=0, process_count=1,
                          max_examples=10)
  assert ev.num_examples == 10
  np.testing.assert_array_equal(np.concatenate([x["label"][x["valid"]] for x in ev]), np.arange(10))


@pytest.mark.slow
def test_a_folder_with_a_corrupt_image_trains_on_the_rest_and_reports_it(tmp_path, caplog):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (7, 20, 24, 3), dtype=np.uint8)
  paths = sources.write_image_folder(str(tmp_path), "train", images, np.arange(7),
                                     image_format="jpeg")
  bad = paths[3]
  with open(bad, "rb") as f:
    data = f.read()
  with open(bad, "wb") as f:
    f.write(data[: len(data) // 2])  # a truncated download
  src = sources.image_folder(str(tmp_path), "train")
  train = _train(src, _config(source="folder", data_dir=str(tmp_path)), batch=2)
  with caplog.at_level(logging.WARNING, logger="sove_jax.data.pipeline"):
    labels = np.concatenate([next(train)["label"] for _ in range(3 * train.steps_per_epoch)])
  assert set(labels) == set(range(7)) - {3}
  assert train.skipped == {bad}
  assert os.path.basename(bad) in caplog.text
  ev = pipeline.EvalInput(src, _config(), global_batch_size=4, process_index=0, process_count=1)
  valid = np.concatenate([x["label"][x["valid"]] for x in ev])
  np.testing.assert_array_equal(valid, [0, 1, 2, 4, 5, 6])
  assert ev.num_skipped == 1


@pytest.mark.parametrize("overrides,patch,batch,count,message", [
    (dict(global_size=30), 4, 8, 1, "global_size=30 must be a positive multiple of model.patch"),
    (dict(), 4, 9, 2, "batch_size=9 must be a positive multiple of the 2 processes"),
    (dict(global_scale=(0.9, 0.1)), 4, 8, 1, "global_scale"),
    (dict(blur_prob=(1.0, 1.2, 0.5)), 4, 8, 1, "blur_prob"),
    (dict(mask_type="stripes"), 4, 8, 1, "mask_type"),
    (dict(mask_type="block_exact", mask_ratio=0.1), 4, 8, 1, "Exact block masks need >= 4"),
    (dict(mask_min_patches=17), 4, 8, 1, "mask_min_patches=17 must be in"),
    (dict(source="tfds", name=""), 4, 8, 1, "data.name"),
    (dict(augment="gpu"), 4, 8, 1, "data.augment='gpu' is not one of 'host', 'device'"),
    (dict(canvas_size=-1), 4, 8, 1, "data.canvas_size=-1 must be >= 0"),
    (dict(augment="device", source="folder", data_dir="x"), 4, 8, 1,
     "data.augment='device' with data.source='folder' needs data.canvas_size > 0"),
    (dict(augment="device", source="folder", data_dir="x", canvas_size=12), 4, 8, 1,
     "data.canvas_size=12 must be >= data.global_size=16"),
    (dict(augment="device", canvas_size=28), 4, 8, 1,
     "data.canvas_size=28 must be 0 for data.source='fashion_mnist'"),
    (dict(translate=16), 4, 8, 1, "data.translate=16 must be >= 0 and smaller than"),
    (dict(translate=2, augment="device"), 4, 8, 1, "data.translate=2 needs data.augment='host'"),
])
def test_data_checks_reject_bad_configs(overrides, patch, batch, count, message):
  """The data block's checks live in sove_jax.configuration; the pipeline runs them too."""
  with pytest.raises(configuration.ConfigError, match=message.replace("(", r"\(")):
    configuration.validate_data(_config(**overrides), patch_size=patch,
                                global_batch_size=batch, process_count=count)
  with pytest.raises(configuration.ConfigError, match=message.replace("(", r"\(")):
    pipeline.train_input(_config(**overrides), patch_size=patch, global_batch_size=batch,
                         seed=0, process_index=0, process_count=count)
  configuration.validate_data(_config(), patch_size=patch, global_batch_size=8, process_count=1)


def test_to_global_shards_the_batch_axis_over_devices():
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  rng = np.random.default_rng(4)
  batch = {"global": rng.normal(size=(16, 2, 8, 8, 3)).astype(np.float32),
           "mask": rng.uniform(size=(16, 2, 4)) < 0.3, "label": np.arange(16, dtype=np.int32)}
  out = pipeline.to_global(batch, sharding)
  for k, v in batch.items():
    assert out[k].shape == v.shape and out[k].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out[k]), v)
  assert len(out["global"].addressable_shards) == jax.device_count() == 8


# --- device mode: the host decodes and fits each image into a canvas ------------------------------

def _smooth_photo(rng, h, w):
  """Ramps and low-frequency waves: resampling by different filters agrees within a few levels."""
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  waves = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * y + rng.uniform(0.5, 2) * x + c))
           for c in rng.uniform(0, 1, 3)]
  return np.clip(128 + 100 * np.stack(waves, -1), 0, 255).astype(np.uint8)


def test_the_dct_downscale_picks_the_largest_ratio_that_keeps_the_fitted_size():
  """(ratio, fitted height, fitted width) of images in a 512 canvas, worked by hand, and what
  the decoder gives at that ratio: ceil(side / ratio) pixels, never fewer than the fitted size."""
  table = {(375, 500): (1, 375, 500),      # ImageNet's usual size: whole, no resize
           (512, 512): (1, 512, 512),
           (1000, 750): (1, 512, 384),     # /2 would give 500 < 512 rows: decoded whole
           (1100, 800): (2, 512, 372),     # /2 gives 550 x 400, resized to 512 x 372
           (1024, 1024): (2, 512, 512),    # exactly 2x: the decoder alone
           (1536, 2048): (4, 384, 512),
           (5000, 300): (8, 512, 31),      # /8 gives 625 x 38
           (40000, 40): (8, 512, 1)}       # at most 8; a side never below 1
  for (h, w), want in table.items():
    assert tuple(int(v) for v in pipeline.fit_plan(h, w, 512)) == want, (h, w)
  rng = np.random.default_rng(0)
  for h, w in [(1000, 750), (1100, 800), (1536, 2048)]:
    ratio, fit_h, fit_w = table[(h, w)]
    jpeg = tf.io.encode_jpeg(_smooth_photo(rng, h, w), quality=90)
    out = pipeline.decode_for_canvas({"bytes": jpeg, "label": 3}, 512)
    assert out["image"].shape == (-(-h // ratio), -(-w // ratio), 3), (h, w)
    assert out["image"].shape[0] >= fit_h and out["image"].shape[1] >= fit_w
    assert out["size"].numpy().tolist() == [fit_h, fit_w] and out["label"] == 3
  png = tf.io.encode_png(_smooth_photo(rng, 600, 200))  # not a JPEG: decoded whole
  out = pipeline.decode_for_canvas({"bytes": png}, 512)
  assert out["image"].shape == (600, 200, 3) and out["size"].numpy().tolist() == [512, 171]


def test_device_mode_fits_each_image_into_its_canvas_and_keeps_its_true_size(tmp_path):
  """Canvas 64: images that fit are sent as decoded; larger ones are downscaled (aspect kept,
  the decoder's /2 where it can) to what a resize of the whole image gives; zeros elsewhere."""
  rng = np.random.default_rng(2)
  shapes = [(40, 30), (64, 64), (70, 50), (130, 90), (20, 150), (33, 47)]
  fitted = [(40, 30), (64, 64), (64, 46), (64, 44), (9, 64), (33, 47)]
  photos = [_smooth_photo(rng, h, w) for h, w in shapes]
  for i, photo in enumerate(photos):  # label i is image i; one PNG among the JPEGs
    sources.write_image_folder(str(tmp_path), "train", [photo], [i],
                               image_format="png" if i == 5 else "jpeg", quality=95)
  src = sources.image_folder(str(tmp_path), "train")
  d = _config(source="folder", data_dir=str(tmp_path), augment="device", canvas_size=64)
  train = _train(src, d, batch=6)
  assert train.stages() == ["read", "decode", "fit"]  # the step draws the masks
  b = next(train)
  assert set(b) == {"canvas", "size", "label"}
  assert b["canvas"].shape == (6, 64, 64, 3) and b["canvas"].dtype == np.uint8
  assert b["size"].dtype == np.int32
  assert sorted(b["label"]) == list(range(6))
  for canvas, size, label in zip(b["canvas"], b["size"], b["label"]):
    h, w = fitted[label]
    assert size.tolist() == [h, w], label
    assert not canvas[h:].any() and not canvas[:, w:].any()
    decoded = tf.io.decode_image(tf.io.read_file(src.paths[label]), channels=3).numpy()
    if (h, w) == shapes[label]:  # fits: the decoded image itself
      np.testing.assert_array_equal(canvas[:h, :w], decoded)
    else:
      want = tf.image.resize(decoded, (h, w), method="area").numpy()  # whole image, area
      if int(pipeline.fit_plan(*shapes[label], 64)[0]) == 1:  # no DCT downscale: exactly it
        np.testing.assert_array_equal(canvas[:h, :w], np.round(want).astype(np.uint8))
      assert np.abs(canvas[:h, :w] - want).mean() < 2.0, label
      aa = tf.image.resize(decoded, (h, w), method="bilinear", antialias=True).numpy()
      assert np.abs(canvas[:h, :w] - aa).mean() < 2.0, label


@pytest.mark.slow
def test_device_mode_from_memory_sends_indices_the_device_gathers_from_resident_images():
  """An in-memory source sends only indices and labels (the same examples as the host mode; the
  step draws the masks); its images are placed on the devices once, whole on each."""
  src = _arrays()
  device, host = _train(src, _config(augment="device")), _train(src)
  assert device.stages() == ["read"] and device.resident and not host.resident
  for _ in range(2):
    b, h = next(device), next(host)
    assert set(b) == {"index", "label"} and b["index"].dtype == np.int32
    np.testing.assert_array_equal(b["label"], h["label"])  # label = index in _arrays
    np.testing.assert_array_equal(b["index"], h["label"])
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = jax.NamedSharding(mesh, jax.P())
  images = pipeline.device_resident(device, replicated)["images"]
  assert images.sharding == replicated and len(images.addressable_shards) == 8
  for shard in images.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), src.images)
  assert pipeline.device_resident(host, replicated) == {}


# --- every process's input state: saved together, restored on the same or another count ---------

def _same_batches(got, want):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.slow
def test_each_process_continues_its_own_stream_from_the_merged_state(tmp_path):
  """Two processes; an image that process 1 reads early does not decode, so its position runs
  one ahead of process 0's. Restored from the merged state, each continues exactly."""
  n, seed = 24, 5
  images = np.random.default_rng(3).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
  paths = sources.write_image_folder(str(tmp_path), "train", images, np.arange(n),
                                     image_format="jpeg")
  src = sources.image_folder(str(tmp_path), "train")
  bad = src.paths[int(pipeline.host_order(n, seed, 0, 1, 2)[1])]
  with open(bad, "wb") as f:
    f.write(b"not a picture")
  d = _config(source="folder", data_dir=str(tmp_path), augment="device", canvas_size=16)
  make = lambda p: _train(src, d, batch=4, seed=seed, index=p, count=2)
  streams = [make(0), make(1)]
  straight = [[next(stream) for _ in range(9)] for stream in streams]  # 6 steps an epoch
  assert streams[1].skipped == {bad} and not streams[0].skipped
  states = []
  for p in range(2):
    stream = make(p)
    for _ in range(3):
      next(stream)
    states.append(stream.get_state())
  merged = json.loads(json.dumps(pipeline.merge_states(states)))
  assert merged == {"process_count": 2, "processes": [{"epoch": 0, "position": 6},
                                                     {"epoch": 0, "position": 7}]}
  for p in range(2):
    resumed = make(p)
    resumed.set_state(merged)
    for want in straight[p][3:]:  # into the next epoch
      _same_batches(next(resumed), want)


def _epoch_of(streams, steps):
  return [np.concatenate([next(s)["label"] for _ in range(steps)]) for s in streams]


def test_another_process_count_reads_the_unread_rest_of_the_epoch_once_then_goes_on():
  """48 examples, 2 processes of batch 4 stopped after 3 and 2 batches; restored on 4 processes
  (batch 1), they read the 28 examples of epoch 0 that no process had read, each once, then
  epoch 1 exactly as a 4-process run reads it. Restored on 3 (batch 2), 28 // 3 = 9 each make
  4 batches: 24 read, none twice; interrupted there and restored on 2, still none twice."""
  src, seed = _arrays(n=48), 2
  d = _config(augment="device")  # indices and labels only
  make = lambda p, count, batch: _train(src, d, batch=batch, seed=seed, index=p, count=count)
  old = [make(p, 2, 8) for p in range(2)]
  read = [np.concatenate([next(old[0])["label"] for _ in range(3)]),
          np.concatenate([next(old[1])["label"] for _ in range(2)])]
  merged = json.loads(json.dumps(pipeline.merge_states([s.get_state() for s in old])))
  epoch0 = set(range(48))  # 48 // 2 each: the whole set
  unread = epoch0 - set(np.concatenate(read))
  assert len(unread) == 28

  new = [make(p, 4, 4) for p in range(4)]
  for stream in new:
    stream.set_state(merged)
    assert stream.get_state()["rest_of"] == merged
  rest = _epoch_of(new, 7)
  assert sum(len(r) for r in rest) == 28 and set(np.concatenate(rest)) == unread
  fresh = [make(p, 4, 4) for p in range(4)]
  for p in range(4):
    fresh[p].set_state({"epoch": 1, "position": 0, "process_count": 4})
    _same_batches(next(new[p]), next(fresh[p]))
    assert "rest_of" not in new[p].get_state() and new[p].get_state()["epoch"] == 1

  three = [make(p, 3, 6) for p in range(3)]
  for stream in three:
    stream.set_state(merged)
  first = _epoch_of(three, 2)
  middle = json.loads(json.dumps(pipeline.merge_states([s.get_state() for s in three])))
  assert middle["rest_of"] == merged
  two = [make(p, 2, 4) for p in range(2)]
  for stream in two:
    stream.set_state(middle)
  last = _epoch_of(two, 3)  # 3 x 5 left, 15 // 2 = 7 each: 3 batches of 2
  in_epoch0 = np.concatenate(read + first + last)
  assert len(set(in_epoch0)) == len(in_epoch0) == 20 + 12 + 12
  assert set(in_epoch0) <= epoch0
  assert all(s.get_state()["epoch"] == 0 for s in two)
  np.testing.assert_array_equal(  # then epoch 1 as 2 processes read it
      np.concatenate([next(two[0])["label"] for _ in range(6)]),
      pipeline.host_order(48, seed, 1, 0, 2).numpy()[:12])


def test_a_tfrecord_stream_refuses_another_process_count_in_one_sentence(tmp_path):
  import tensorflow_datasets as tfds
  d = _config(source="tfds", name="mnist", data_dir=str(tmp_path), shuffle_buffer=8)
  with tfds.testing.mock_data(num_examples=16):
    src = sources.open_source(d, "train")
    stream = _train(src, d, batch=4)
    merged = {"process_count": 2, "processes": [{"epoch": 0, "position": 4},
                                                {"epoch": 0, "position": 5}]}
    with pytest.raises(ValueError, match=r"^The input state was saved by 2 processes and this "
                       r"run has 1: mnist/train is a stream of TFRecord records, which cannot be "
                       r"re-split exactly; restart on the same number of processes\.$"):
      stream.set_state(merged)
    stream.set_state({"process_count": 1, "processes": [{"epoch": 2, "position": 8}]})
    assert stream.get_state() == {"epoch": 2, "position": 8, "process_count": 1}


def test_merge_states_keeps_every_process_and_refuses_states_of_other_runs():
  assert pipeline.merge_states([{"epoch": 3, "position": 9, "process_count": 1}]) == {
      "process_count": 1, "processes": [{"epoch": 3, "position": 9}]}
  with pytest.raises(ValueError, match="says 4 processes, but 2 states"):
    pipeline.merge_states([{"epoch": 0, "position": 0, "process_count": 4}] * 2)
  with pytest.raises(ValueError, match="another rest epoch"):
    pipeline.merge_states([{"epoch": 0, "position": 0, "process_count": 2, "rest_of": {"a": 1}},
                           {"epoch": 0, "position": 0, "process_count": 2, "rest_of": {"a": 2}}])
  stream = _train(_arrays())
  with pytest.raises(ValueError, match="Bad input state"):
    stream.set_state({"process_count": 2, "processes": [{"epoch": 0, "position": 1}]})


# --- a process whose input yields nothing ------------------------------------------------------

def test_a_folder_of_corrupt_images_stops_with_a_true_count_and_the_first_cause(tmp_path):
  for i in range(6):
    folder = tmp_path / "train" / "junk"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{i}.jpg").write_bytes(b"<html>403 Forbidden</html>")
  src = sources.image_folder(str(tmp_path), "train")
  d = _config(source="folder", data_dir=str(tmp_path), augment="device", canvas_size=16)
  stream = _train(src, d, batch=2, seed=1)
  first = os.path.basename(src.paths[int(pipeline.host_order(6, 1, 0, 0, 1)[0])])
  with pytest.raises(pipeline.InputFailed, match=(
      rf"process 0 of 1 got no batch from epoch 0: 6 of the 6 examples it tried failed to "
      rf"decode \(0 decoded, fewer than its batch of 2\); the first: .*{first} \(Unknown image "
      rf"file format\. One of JPEG, [^\[\]]+ required\.\)\.$")):
    next(stream)
  rng = np.random.default_rng(0)
  sources.write_image_folder(str(tmp_path), "train", rng.integers(0, 256, (1, 8, 8, 3)), [0],
                             class_names=["junk"], image_format="jpeg")
  src = sources.image_folder(str(tmp_path), "train")
  stream = _train(src, d, batch=2)
  with pytest.raises(pipeline.InputFailed, match=r"6 of the 7 examples it tried failed to decode "
                     r"\(1 decoded, fewer than its batch of 2\)"):
    next(stream)
