"""Fine-tuning (sove_jax/evaluate/{finetune,classifier}.py, sove_jax/data/labeled.py): the
layer-wise decay of every parameter, BEiT's weight-decay exemptions, label smoothing and
mixup/cutmix against NumPy references, the two recipes (full and iBOT's semi-supervised, its
schedule, lr rule and head), the label subsets, the fine-tuning input, and a smoke checkpoint
fine-tuned above chance (with resume and errors).
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default, smoke
from sove_jax import configuration
from sove_jax.evaluate import classifier as clf
from sove_jax.evaluate import finetune as ft
from sove_jax.evaluate import protocol
from sove_jax.models import swin, vit


def tiny_classifier(scan_layers=False, depth=3, num_classes=5):
  backbone = vit.ViT(width=16, depth=depth, num_heads=2, patch_size=4, image_size=8,
                     dtype=jnp.float32, scan_layers=scan_layers, rngs=nnx.Rngs(0))
  model = clf.Classifier(backbone, num_classes, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(model)
  return backbone, graphdef, params.to_pure_dict()


def flat(tree):
  return {"/".join(str(k) for k in vit.path_names(path)): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


# --- layer-wise learning-rate decay ---------------------------------------------------------

def expected_vit_scale(name, decay, depth):
  """BEiT's rule written out: embeddings decay^(L+1), block i decay^(L-i), the rest 1."""
  parts = name.split("/")
  if parts[0] == "head" or parts[1] == "norm":
    return 1.0
  if parts[1] == "blocks":
    return decay ** (depth - int(parts[2]))
  assert parts[1] in ("patch_embed", "cls_token", "pos_embed", "mask_token"), name
  return decay ** (depth + 1)


def test_layer_decay_factor_of_every_parameter_of_a_tiny_vit():
  backbone, _, params = tiny_classifier(depth=3)
  scales = flat(clf.layer_decay_scales(params, clf.backbone_depths(backbone), 0.5))
  assert len(scales) == len(flat(params)) and len(scales) > 30
  for name, s in scales.items():
    assert np.all(s == expected_vit_scale(name, 0.5, 3)), name
  # Spelled out once: 0.0625 for the embeddings, 0.125 / 0.25 / 0.5 for blocks 0 / 1 / 2.
  assert scales["backbone/pos_embed"].item() == 0.0625
  assert scales["backbone/blocks/0/attn/qkv/kernel"].max() == 0.125
  assert scales["backbone/blocks/2/mlp/fc2/bias"].max() == 0.5
  assert scales["head/kernel"].max() == scales["backbone/norm/scale"].max() == 1.0

  # A scan_layers stack gets one factor per layer along its leading axis: the same values.
  stacked, _, stacked_params = tiny_classifier(scan_layers=True, depth=3)
  s = flat(clf.layer_decay_scales(stacked_params, clf.backbone_depths(stacked), 0.5))
  qkv = s["backbone/blocks/attn/qkv/kernel"]
  assert qkv.shape == (3, 1, 1, 1, 1) and qkv.ravel().tolist() == [0.125, 0.25, 0.5]


def test_layer_decay_counts_swin_blocks_across_stages():
  backbone = swin.Swin(embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=2,
                       patch_size=2, image_size=8, dtype=jnp.float32, rngs=nnx.Rngs(0))
  model = clf.Classifier(backbone, 3, rngs=nnx.Rngs(1))
  params = nnx.split(model)[1].to_pure_dict()
  scales = flat(clf.layer_decay_scales(params, clf.backbone_depths(backbone), 0.5))
  # 3 blocks: the embeddings at 0.5^4, stage 0's block and patch merging at 0.5^3 (layer 1),
  # stage 1's blocks at 0.5^2 and 0.5, the final norm and head at 1.
  assert scales["backbone/patch_embed/kernel"].max() == scales["backbone/mask_token"].max() == 0.5 ** 4
  assert scales["backbone/layers/0/blocks/0/mlp/fc1/kernel"].max() == 0.5 ** 3
  assert scales["backbone/layers/0/downsample/reduction"].max() == 0.5 ** 3
  assert scales["backbone/layers/1/blocks/0/attn/qkv/kernel"].max() == 0.5 ** 2
  assert scales["backbone/layers/1/blocks/1/attn/relative_position_bias_table"].max() == 0.5
  assert scales["backbone/norm/scale"].max() == scales["head/kernel"].max() == 1.0


def test_the_optimizer_steps_each_layer_at_its_rate_and_decays_weights_only():
  """Adam's first update is lr * sign(g) per element: scaled by the layer's factor, plus
  lr * factor * wd * p on the decayed tensors (pretraining's rule: no bias, no 1-D; and, as
  BEiT's `no_weight_decay()`, neither [CLS] nor the position embedding)."""
  backbone, graphdef, params = tiny_classifier(depth=3)
  lr, wd, decay = 0.1, 0.5, 0.5
  tx = clf.make_optimizer(params, clf.backbone_depths(backbone), learning_rate=lr,
                         weight_decay=wd, layer_decay=decay)
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name, u in flat(updates).items():
    p = flat(params)[name]
    scale = expected_vit_scale(name, decay, 3)
    decayed = not (name.endswith("bias") or name.endswith("scale")
                   or name.split("/")[-1] in ("cls_token", "pos_embed"))
    want = -lr * scale * (1.0 + (wd * p if decayed else 0.0))
    np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-7, err_msg=name)


# --- loss and targets -------------------------------------------------------------------------

def test_label_smoothing_loss_and_gradient_match_float64_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 7)) * 3
  labels = rng.integers(0, 7, 6)
  s = 0.1

  def reference(z):  # timm's LabelSmoothingCrossEntropy, float64
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    nll = -logp[np.arange(6), labels]
    return (1 - s) * nll + s * (-logp.mean(1))

  def loss(z):
    return clf.soft_cross_entropy(z, clf.smoothed_targets(labels, 7, s))

  np.testing.assert_allclose(loss(jnp.asarray(logits, jnp.float32)), reference(logits),
                             rtol=1e-5)
  grad = jax.grad(lambda z: jnp.sum(loss(z)))(jnp.asarray(logits, jnp.float32))
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  target = np.full((6, 7), s / 7)
  target[np.arange(6), labels] += 1 - s
  np.testing.assert_allclose(grad, p - target, atol=1e-6)
  # ...and the same number by finite differences of the float64 reference.
  eps, i, j = 1e-6, 2, 3
  bumped = logits.copy()
  bumped[i, j] += eps
  fd = (reference(bumped).sum() - reference(logits).sum()) / eps
  assert abs(fd - float(grad[i, j])) < 1e-4


# --- mixup and cutmix ---------------------------------------------------------------------------

def mix_reference(images, targets, apply, cutmix, lam, cy, cx):
  """timm's Mixup in "batch" mode, given its draws, in float64 NumPy."""
  x, y = np.asarray(images, np.float64), np.asarray(targets, np.float64)
  if not apply:
    return x, y, 1.0
  H, W = x.shape[1:3]
  if cutmix:
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(H * ratio), int(W * ratio)
    yl, yh = np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H)
    xl, xh = np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W)
    x = x.copy()
    x[:, yl:yh, xl:xh] = x[::-1][:, yl:yh, xl:xh]
    lam = 1.0 - (yh - yl) * (xh - xl) / (H * W)
  else:
    x = x * lam + x[::-1] * (1.0 - lam)
  return x, y * lam + y[::-1] * (1.0 - lam), lam


def test_mixup_and_cutmix_match_numpy_reference():
  rng = np.random.default_rng(1)
  B, H, W, C, K = 6, 12, 10, 3, 4
  images = rng.normal(size=(B, H, W, C)).astype(np.float32)
  labels = rng.integers(0, K, B)
  targets = clf.smoothed_targets(labels, K, 0.1)
  cfg = clf.MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, switch_prob=0.5)
  seen = set()

  @jax.jit
  def run(key):
    draw = clf.draw_mix(key, H, W, cfg)
    return draw, clf.mix_batch(jnp.asarray(images), targets, draw)

  for i in range(40):
    draw, (got_x, got_y, got_lam) = run(jax.random.PRNGKey(i))
    apply, cutmix = bool(draw.apply), bool(draw.cutmix)
    want_x, want_y, want_lam = mix_reference(images, targets, apply, cutmix, float(draw.lam),
                                             *map(int, draw.center))
    np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-6)
    assert abs(float(got_lam) - want_lam) < 1e-6
    np.testing.assert_allclose(np.asarray(got_y).sum(1), 1.0, rtol=1e-6)
    seen.add("cutmix" if apply and cutmix else "mixup" if apply else "none")
  assert seen == {"cutmix", "mixup", "none"}


def test_cutmix_labels_are_mixed_by_the_pasted_area():
  """Each image a constant (its index): the pixels from the partner are exactly the box, and
  the partner's label weight is exactly their share."""
  B, H, W, K = 4, 9, 7, 4
  images = jnp.broadcast_to(jnp.arange(B, dtype=jnp.float32)[:, None, None, None],
                            (B, H, W, 1))
  targets = jax.nn.one_hot(jnp.arange(B), K)

  @jax.jit
  def run(key):
    draw = clf.draw_mix(key, H, W, clf.MixConfig(0.0, 1.0, 1.0, 0.5))
    return draw, clf.mix_batch(images, targets, draw), clf.cutmix_box(draw.lam, draw.center, H, W)

  for i in range(20):
    draw, (x, y, lam), box = run(jax.random.PRNGKey(i))
    assert bool(draw.cutmix) and bool(draw.apply)
    top, bottom, left, right = map(int, box)
    pasted = np.asarray(x[0, :, :, 0]) == B - 1  # image 0's partner is image B - 1
    assert pasted.sum() == (bottom - top) * (right - left)
    assert pasted[top:bottom, left:right].all()
    np.testing.assert_allclose(float(y[0, B - 1]), pasted.mean(), atol=1e-6)
    np.testing.assert_allclose(float(y[0, 0]), 1.0 - pasted.mean(), atol=1e-6)
    assert abs(float(lam) - (1.0 - pasted.mean())) < 1e-6


def test_mix_draws_follow_their_probabilities():
  cfg = clf.MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.3)
  draws = jax.vmap(lambda k: clf.draw_mix(k, 16, 16, cfg))(
      jax.random.split(jax.random.PRNGKey(0), 4000))
  apply, cutmix, lam = (np.asarray(x) for x in draws[:3])
  assert abs(apply.mean() - 0.7) < 0.03
  assert abs(cutmix.mean() - 0.3) < 0.03
  assert abs(lam[~cutmix].mean() - 0.5) < 0.03 and abs(lam[cutmix].var() - 1 / 12) < 0.01
  center = np.asarray(draws.center)
  assert center.min() == 0 and center.max() == 15


# --- label subsets and the fine-tuning input ---------------------------------------------------

def test_one_and_ten_percent_subsets_are_class_balanced_and_split_files_are_read(tmp_path):
  from sove_jax.data import labeled, sources
  from sove_jax.evaluate import splits
  labels = labeled.split_labels(sources.fashion_mnist("train"))
  for fraction, per_class in ((0.01, 60), (0.1, 600)):
    idx, said = splits.label_subset(labels, fraction=fraction)
    assert len(np.unique(idx)) == len(idx) == 10 * per_class
    assert np.bincount(labels[idx], minlength=10).tolist() == [per_class] * 10
    assert "random class-balanced" in said
  assert splits.label_subset(labels)[0] is None
  (tmp_path / "split.txt").write_text("# my split\n5\n17\n\n3\n")
  idx, said = splits.label_subset(labels, split_file=str(tmp_path / "split.txt"))
  assert idx.tolist() == [3, 5, 17] and said == "split file split.txt (3 images)"
  (tmp_path / "bad.txt").write_text("70000\n")
  with pytest.raises(ValueError, match="outside the 60000 train examples"):
    splits.label_subset(labels, split_file=str(tmp_path / "bad.txt"))


def _data_config():
  d = default.get_config().data
  d.update(eval_resize=16, eval_crop=16, prefetch=1)
  return d


def test_labeled_input_crops_a_subset_deterministically_and_splits_it_over_processes():
  from sove_jax.data import labeled, sources
  images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)
  src = labeled.subset(sources.ArraySource(images, np.arange(40)), np.arange(0, 40, 2))
  assert len(src) == 20 and src.labels.tolist() == list(range(0, 40, 2))
  kw = dict(size=8, scale=(0.3, 1.0), ratio=(0.75, 1.33), flip=True, global_batch_size=8,
            seed=3)
  make = lambda p, n: labeled.LabeledTrainInput(src, _data_config(), process_index=p,
                                                process_count=n, **kw)
  one = make(0, 1)
  assert one.steps_per_epoch == 2
  batches = [next(one) for _ in range(4)]  # two epochs
  b = batches[0]
  assert b["image"].shape == (8, 8, 8, 3) and b["image"].dtype == np.float32
  d = _data_config()
  pixels = b["image"] * np.asarray(d.std, np.float32) + np.asarray(d.mean, np.float32)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)  # gray, repeated
  assert b["label"].dtype == np.int32 and set(b["label"]) <= set(range(0, 40, 2))
  again = make(0, 1)
  np.testing.assert_array_equal(next(again)["image"], b["image"])
  assert not np.array_equal(batches[2]["label"], b["label"])  # a new order per epoch
  # Two processes: disjoint halves of the global batches.
  halves = [next(make(p, 2))["label"] for p in (0, 1)]
  assert len(halves[0]) == 4 and not set(halves[0]) & set(halves[1])


def test_labeled_input_from_a_folder_and_a_tfds_subset(tmp_path):
  import tensorflow_datasets as tfds

  from sove_jax.data import labeled, sources
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8)
  sources.write_image_folder(str(tmp_path / "folder"), "train", images, [0, 1, 2, 0, 1, 2])
  d = _data_config()
  d.update(source="folder", data_dir=str(tmp_path / "folder"))
  folder = labeled.labeled_train_input(d, split="train", indices=[0, 2, 4, 5], size=8,
                                       scale=(0.5, 1.0), ratio=(0.75, 1.33), flip=False,
                                       global_batch_size=2, seed=0, process_index=0,
                                       process_count=1)
  assert folder.num_examples == 4 and next(folder)["image"].shape == (2, 8, 8, 3)

  d.update(source="tfds", name="mnist", data_dir=str(tmp_path / "tfds"), shuffle_buffer=4)
  with tfds.testing.mock_data(num_examples=12):
    src = sources.open_source(d, "train")
    labels = labeled.split_labels(src)
    assert labels.shape == (12,)
    part = labeled.subset(src, [1, 4, 7, 9])
    assert isinstance(part, labeled.EncodedSource)
    assert part.labels.tolist() == labels[[1, 4, 7, 9]].tolist()
    stream = labeled.labeled_train_input(d, split="train", indices=[1, 4, 7, 9], size=8,
                                         scale=(0.5, 1.0), ratio=(0.75, 1.33), flip=True,
                                         global_batch_size=2, seed=0, process_index=0,
                                         process_count=1)
    got = [next(stream)["label"] for _ in range(2)]
    assert sorted(np.concatenate(got).tolist()) == sorted(part.labels.tolist())
    whole = labeled.labeled_train_input(d, split="train", size=8, scale=(0.5, 1.0),
                                        ratio=(0.75, 1.33), flip=True, global_batch_size=4,
                                        seed=0, process_index=0, process_count=1)
    assert whole.steps_per_epoch == 3 and next(whole)["image"].shape == (4, 8, 8, 3)


# --- RandAugment and random erasing (sove_jax/data/randaugment.py) ------------------------------

def _pil_reference(name, image, magnitude, sign, fill, resample=None):
  """What timm's op does at `magnitude` with `sign`, written with PIL (resample bilinear, as
  TensorFlow samples; timm asks for bicubic)."""
  from PIL import Image, ImageEnhance, ImageOps
  resample = Image.BILINEAR if resample is None else resample
  level, w, h = magnitude / 10.0, image.size[0], image.size[1]
  factor = 1.0 + sign * level * 0.9
  affine = lambda m: image.transform(image.size, Image.AFFINE, m, resample, fillcolor=fill)
  return {
      "AutoContrast": lambda: ImageOps.autocontrast(image),
      "Equalize": lambda: ImageOps.equalize(image),
      "Invert": lambda: ImageOps.invert(image),
      "Rotate": lambda: image.rotate(sign * level * 30.0, resample=resample, fillcolor=fill),
      "PosterizeIncreasing": lambda: ImageOps.posterize(image, 4 - int(level * 4)),
      "SolarizeIncreasing": lambda: ImageOps.solarize(image, 256 - int(level * 256)),
      "SolarizeAdd": lambda: image.point([min(255, i + int(level * 110)) if i < 128 else i
                                          for i in range(256)] * 3),
      "ColorIncreasing": lambda: ImageEnhance.Color(image).enhance(factor),
      "ContrastIncreasing": lambda: ImageEnhance.Contrast(image).enhance(factor),
      "BrightnessIncreasing": lambda: ImageEnhance.Brightness(image).enhance(factor),
      "SharpnessIncreasing": lambda: ImageEnhance.Sharpness(image).enhance(factor),
      "ShearX": lambda: affine((1, sign * level * 0.3, 0, 0, 1, 0)),
      "ShearY": lambda: affine((1, 0, 0, sign * level * 0.3, 1, 0)),
      "TranslateXRel": lambda: affine((1, 0, sign * level * 0.45 * w, 0, 1, 0)),
      "TranslateYRel": lambda: affine((1, 0, 0, 0, 1, sign * level * 0.45 * h)),
  }[name]()


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Invert", "Rotate",
                                  "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                                  "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                                  "TranslateYRel"])
def test_each_randaugment_op_matches_pil(name):
  """Every op of timm's increasing set against PIL at magnitude 9 (and 6 with a negative sign):
  the lookup-table ops exactly, the blends within a level, the geometric ops within two levels
  (bilinear rounding) where PIL samples the image and exactly the fill colour where it fills."""
  import tensorflow as tf
  from PIL import Image
  from scipy import ndimage

  from sove_jax.data import randaugment
  rng = np.random.default_rng(randaugment.OPS.index(name))
  pixels = rng.integers(30, 220, (24, 32, 3), dtype=np.uint8)
  pixels[4:12, 6:20] = (250, 40, 10)  # structure for the geometric ops and the histogram
  fill = (124, 116, 104)
  for magnitude, sign in ((9.0, 1.0), (6.0, -1.0)):
    got = randaugment._op(tf.constant(randaugment.OPS.index(name)),
                          tf.constant(pixels, tf.float32), tf.constant(magnitude),
                          tf.constant(sign), tf.constant(fill, tf.float32)).numpy()
    want = np.asarray(_pil_reference(name, Image.fromarray(pixels), magnitude, sign, fill),
                      np.float64)
    diff = np.abs(got - want)
    if name in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "Rotate"):
      ones = Image.fromarray(np.full(pixels.shape[:2], 255, np.uint8))
      sampled = np.asarray(_pil_reference(name, ones, magnitude, sign, 0, Image.NEAREST)) > 0
      assert 0.3 < sampled.mean() < 1.0, name
      assert diff[sampled].max() <= 2, (name, magnitude, diff[sampled].max())
      filled = ~ndimage.binary_dilation(sampled)  # a rounding of x.5 may move the seam
      np.testing.assert_array_equal(got[filled], np.broadcast_to(fill, got[filled].shape))
      assert (diff.max(axis=-1) > 2).mean() < 0.01
    elif name.startswith(("Color", "Contrast", "Brightness", "Sharpness")):
      assert diff.max() <= 1, (name, magnitude, diff.max())
    else:
      np.testing.assert_array_equal(got, want, err_msg=f"{name} at {magnitude}")


def test_randaugment_draws_are_timms_rand_m9_mstd05_inc1():
  """Two ops with replacement from the 15, each applied with probability 0.5, magnitude
  N(9, 0.5) clipped to [0, 10], signs +-1 alike; the same key, the same draws."""
  import tensorflow as tf

  from sove_jax.data import randaugment
  policy = randaugment.Policy("rand-m9-mstd0.5-inc1")
  assert (policy.magnitude, policy.std, policy.layers, policy.prob) == (9.0, 0.5, 2, 0.5)
  with pytest.raises(ValueError, match="cannot read"):
    randaugment.Policy("rand-m9-x")
  keys = tf.stack([tf.range(3000, dtype=tf.int64), tf.fill([3000], tf.constant(7, tf.int64))],
                  axis=1)
  many = tf.function(lambda k: tf.map_fn(
      lambda key: randaugment.draw(key, policy), k,
      fn_output_signature=(tf.int32, tf.bool, tf.float32, tf.float32)))
  ops, applied, magnitude, sign = (np.ravel(x.numpy()) for x in many(keys))
  counts = np.bincount(ops, minlength=15)
  assert counts.min() > 6000 / 15 * 0.8 and counts.max() < 6000 / 15 * 1.2
  assert abs(applied.mean() - 0.5) < 0.03 and abs(sign.mean()) < 0.05
  assert abs(magnitude.mean() - 9.0) < 0.03 and abs(magnitude.std() - 0.5) < 0.03
  assert magnitude.max() <= 10.0
  first = randaugment.draw(tf.constant([0, 7], tf.int64), policy)
  assert np.array_equal(first[0].numpy(), ops[:2]) and np.array_equal(first[2].numpy(),
                                                                       magnitude[:2])


def test_random_erasing_is_timms_pixel_mode():
  """With probability 0.25 one box of 2%-33% of the image, aspect ratio in [0.3, 3.3], becomes
  N(0, 1) noise; nothing else changes."""
  import tensorflow as tf

  from sove_jax.data import randaugment
  image = tf.fill([40, 48, 3], 7.0)
  keys = tf.stack([tf.range(800, dtype=tf.int64), tf.ones([800], tf.int64)], axis=1)
  outs = tf.function(lambda k: tf.map_fn(lambda key: randaugment.random_erase(image, key, 0.25),
                                         k, fn_output_signature=tf.float32))(keys).numpy()
  erased, boxes = 0, []
  for out in outs:
    changed = out[..., 0] != 7.0
    if changed.any():
      erased += 1
      rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
      h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
      boxes.append((h, w))
      assert changed.sum() == h * w and (out[changed] != 7.0).all()
  assert abs(erased / 800 - 0.25) < 0.05
  areas = np.array([h * w for h, w in boxes]) / (40 * 48)
  assert areas.min() >= 0.015 and areas.max() <= 0.36
  aspects = np.array([h / w for h, w in boxes])
  assert aspects.min() >= 0.25 and aspects.max() <= 4.0
  noise = randaugment.random_erase(tf.zeros([200, 200, 3]), tf.constant([0, 3], tf.int64),
                                   1.0).numpy()
  values = noise[noise != 0]
  assert len(values) > 0.02 * 200 * 200 * 3 and abs(values.mean()) < 0.05
  assert abs(values.std() - 1.0) < 0.05


def test_fine_tuning_input_applies_randaugment_then_erasing():
  """The labeled input's crops go through RandAugment (before normalizing) and random erasing
  (after) when it is given them, deterministically per seed; without them, as before."""
  from sove_jax.data import labeled, randaugment, sources
  images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
  src = sources.ArraySource(images, np.arange(16) % 4)
  kw = dict(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, global_batch_size=8,
            seed=3, process_index=0, process_count=1)
  plain = next(labeled.LabeledTrainInput(src, _data_config(), **kw))["image"]
  strong = randaugment.TrainAugment("rand-m9-mstd0.5-inc1", 1.0, mean=_data_config().mean)
  out = next(labeled.LabeledTrainInput(src, _data_config(), augment=strong, **kw))["image"]
  again = next(labeled.LabeledTrainInput(src, _data_config(), augment=strong, **kw))["image"]
  np.testing.assert_array_equal(out, again)
  assert out.shape == plain.shape and (np.abs(out - plain) > 1e-3).any(axis=(1, 2, 3)).all()
  # Erasing only: the images outside the erased box are the plain ones.
  erase = randaugment.TrainAugment("", 1.0)
  erased = next(labeled.LabeledTrainInput(src, _data_config(), augment=erase, **kw))["image"]
  same = np.isclose(erased, plain).all(axis=-1)
  assert 0.6 < same.mean() < 0.99


def test_fine_tuning_decays_neither_cls_nor_position_embeddings():
  """BEiT's `no_weight_decay()`: the ViT's cls_token and pos_embed, the Swin's relative position
  bias tables; every other matrix as pretraining decides."""
  backbone, _, params = tiny_classifier()
  mask = flat(clf.decay_mask(params))
  assert not mask["backbone/cls_token"] and not mask["backbone/pos_embed"]
  assert mask["backbone/patch_embed/kernel"] and mask["head/kernel"]
  assert not mask["head/bias"] and mask["backbone/mask_token"]
  sw = swin.create_swin(rngs=nnx.Rngs(0), embed_dim=8, depths=(2, 2), num_heads=(2, 4),
                        window_size=2, patch_size=2, image_size=16, dtype=jnp.float32)
  _, state = nnx.split(clf.Classifier(sw, 3, rngs=nnx.Rngs(1)))
  swin_mask = flat(clf.decay_mask(state.to_pure_dict()))
  tables = [k for k in swin_mask if k.endswith("relative_position_bias_table")]
  assert tables and not any(swin_mask[k] for k in tables)
  assert swin_mask["backbone/layers/0/blocks/0/attn/qkv/kernel"]


# --- the recipes -----------------------------------------------------------------------------

def test_the_recipes_are_ibots_full_and_semi_supervised_ones():
  """A label subset takes iBOT's semi-supervised recipe (1000 epochs, lr 5e-6 per 512, timm's
  per-epoch cosine from a 5-epoch warm-up, the projection head's first layer), all labels
  BEiT's per size; a field set on the command line wins over either."""
  config = ft.default_config()
  semi = ft.resolve(config, "s", subset=True)
  assert (semi.recipe, semi.epochs, semi.base_lr, semi.lr_batch, semi.schedule, semi.head) == (
      "semi", 1000, 5e-6, 512, "epoch", "projection")
  assert (semi.warmup_epochs, semi.warmup_lr, semi.min_lr, semi.layer_decay) == (
      5.0, 1e-6, 1e-5, 1.0)
  for variant, epochs, layer_decay, drop_path in (("s", 200, 0.75, 0.1), ("ti", 200, 0.75, 0.1),
                                                  ("b", 100, 0.65, 0.2), ("l", 50, 0.75, 0.4)):
    full = ft.resolve(config, variant, subset=False)
    assert (full.recipe, full.epochs, full.layer_decay, full.drop_path, full.head) == (
        "full", epochs, layer_decay, drop_path, "linear")
  config.recipe, config.epochs = "full", 7
  forced = ft.resolve(config, "s", subset=True)
  assert forced.recipe == "full" and forced.epochs == 7
  assert (forced.randaugment, forced.reprob) == ("rand-m9-mstd0.5-inc1", 0.25)


def test_semi_supervised_schedule_is_timms_per_epoch_cosine():
  """lr = 5e-6 x 1024 / 512 = 1e-5 at the peak; epoch e < 5 warms up linearly from 1e-6; then
  min_lr + (peak - min_lr)(1 + cos(pi e / E)) / 2, constant within an epoch."""
  c = ft.resolve(ft.default_config(), "s", subset=True)
  c.epochs, c.min_lr = 20, 1e-7
  steps = 3
  schedule = ft.learning_rate(c, steps, 1024)
  peak = 5e-6 * 1024 / 512
  for epoch in range(20):
    want = (1e-6 + epoch * (peak - 1e-6) / 5 if epoch < 5 else
            1e-7 + 0.5 * (peak - 1e-7) * (1 + math.cos(math.pi * epoch / 20)))
    for step in range(epoch * steps, (epoch + 1) * steps):
      assert float(schedule(jnp.asarray(step))) == pytest.approx(want, rel=1e-5), (epoch, step)
  full = ft.resolve(ft.default_config(), "s", subset=False)
  full.epochs = 10
  per_step = ft.learning_rate(full, 4, 512)
  assert float(per_step(0)) == 0.0 and float(per_step(1)) > 0.0  # BEiT: warm-up from 0, per step


def test_the_semi_supervised_head_starts_from_the_projection_heads_first_layer():
  """iBOT's ClassProjHead(finetune_head_layer=1): [CLS] -> the pretrained head's first Linear ->
  GELU -> a new Linear (trunc-normal 0.02): the logits as NumPy computes them."""
  backbone = vit.ViT(width=16, depth=1, num_heads=2, patch_size=4, image_size=8,
                     dtype=jnp.float32, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  layer = {"kernel": rng.normal(size=(16, 24)).astype(np.float32),
           "bias": rng.normal(size=24).astype(np.float32)}
  model = clf.Classifier(backbone, 5, init_scale=1.0, head_layer=layer, rngs=nnx.Rngs(1))
  images = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  cls = np.asarray(nnx.jit(lambda m, x: m(x))(backbone, images)[:, 0], np.float64)
  from scipy.special import erf
  h = cls @ layer["kernel"] + layer["bias"]
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  w, b = np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...])
  logits = nnx.jit(lambda m, x: m(x))(model, images)
  np.testing.assert_allclose(np.asarray(logits), h @ w + b, rtol=1e-4, atol=1e-5)
  assert 0.01 < w.std() < 0.03 and not b.any()
  with pytest.raises(ValueError, match="takes 16 features"):
    clf.Classifier(backbone, 5, pooling="cls_meanpatch", head_layer=layer, rngs=nnx.Rngs(1))


def test_workdir_and_released_loads_carry_the_projection_heads_first_layer(tmp_path):
  """The teacher head's first layer comes with the backbone of a checkpoint (SOVE's projection
  head; DINO's and iBOT's prototype head's MLP)."""
  from sove_jax.evaluate import backbone as backbone_lib
  from sove_jax.models import network
  config = smoke.get_config()
  for method in ("sove", "dino"):
    config.method = method
    graphdef, _ = network.abstract_network(config.model, 28, network.prototypes_of(config))
    net = network.build_network(config.model, 28, nnx.Rngs(0), network.prototypes_of(config))
    layer = backbone_lib.first_head_layer(net.head)
    fc1 = net.head.fc1 if method == "sove" else net.head.mlp.fc1
    np.testing.assert_array_equal(layer["kernel"], np.asarray(fc1.kernel[...]))
    assert layer["kernel"].shape == (32, config.model.head_hidden)


# --- settings, errors and the end-to-end run ---------------------------------------------------

@pytest.mark.parametrize("change, options, batch, message", [
    ({}, dict(init="imagenet"), 8, "--init must be one of"),
    ({}, dict(label_fraction=2.0), 8, "--label_fraction must be in"),
    (dict(crop_scale=(0.5, 0.2)), {}, 8, "--config.crop_scale must be"),
    (dict(switch_prob=1.5), {}, 8, "must be probabilities"),
    (dict(schedule="cosine"), {}, 8, "--config.schedule='cosine' is not one of"),
    ({}, {}, 12, "multiple of the 8 devices"),
    ({}, {}, 0, "must be a positive multiple"),
    ({}, dict(label_split="/no/such/file"), 8, "does not exist"),
])
def test_bad_settings_are_one_sentence_errors(change, options, batch, message):
  config = ft.default_config()
  config.update(change)
  with pytest.raises(configuration.ConfigError, match=message):
    ft.validate(config, batch_size=batch, num_devices=8, **options)


def test_odd_batches_cannot_be_mixed_but_can_train_unmixed():
  config = ft.default_config()
  with pytest.raises(configuration.ConfigError, match="must be even"):
    ft.validate(config, batch_size=3, num_devices=1)
  config.update(mixup=0.0, cutmix=0.0)
  ft.validate(config, batch_size=3, num_devices=1)


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
  """A 4-step smoke run's checkpoint (the real trainer)."""
  from sove_jax import train
  workdir = str(tmp_path_factory.mktemp("smoke"))
  train.train_and_evaluate(smoke.get_config(), workdir)
  return workdir


@pytest.mark.slow
def test_fine_tuning_a_smoke_checkpoint_beats_chance_and_resumes(smoke_workdir):
  from sove_jax.evaluate import backbone
  # A tiny, barely trained ViT learns slowly: in 72 steps even mild crops and flips hold it
  # near 20%, so the input is left as evaluation sees it (the crops are tested above).
  config = ft.default_config("full")
  config.update(epochs=4, warmup_epochs=0.3, base_lr=3e-2, layer_decay=0.9, drop_path=0.05,
                mixup=0.0, cutmix=0.0, crop_scale=(1.0, 1.0), flip=False, randaugment="",
                reprob=0.0, eval_every=2, log_every=10)
  options = dict(config=config, label_fraction=0.01, batch_size=32, max_eval_examples=400)
  load = lambda: backbone.load_backbone(smoke_workdir)
  record = protocol.run(ft.PROTOCOL, load=load, options=options, out_dir=smoke_workdir)
  assert record["arm"] == "pretrained_1pct" and record["train_examples"] == 600
  assert record["protocol"] == "finetune_full" and "random class-balanced 1%" in record["labels"]
  assert record["steps"] == 4 * (600 // 32)
  assert [c["epoch"] for c in record["curve"]] == [2, 4]
  assert record["top1"] > 20.0, record["curve"]  # chance: 10%
  arms = json.loads((open(os.path.join(smoke_workdir, "finetune.json")).read()))
  assert arms["pretrained_1pct"]["top1"] == record["top1"]
  assert arms["pretrained_1pct"]["step"] == 4
  assert "pretrained_1pct" in ft.format_table(arms)

  # A finished arm resumes at its end: the same record, nothing trained again.
  assert ft.finetune(load(), smoke_workdir, **options)["curve"] == record["curve"]
  config.base_lr = 1e-3
  with pytest.raises(configuration.ConfigError, match="other settings"):
    ft.finetune(load(), smoke_workdir, **options)


@pytest.mark.slow
def test_cli_says_in_one_sentence_that_a_checkpoint_is_missing(tmp_path):
  (tmp_path / "config.json").write_text(smoke.get_config().to_json())
  env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
  out = subprocess.run([sys.executable, "-m", "sove_jax.evaluate.finetune",
                        f"--workdir={tmp_path}", "--config.epochs=1"], capture_output=True,
                       text=True, env=env, timeout=300)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert f"{tmp_path}/checkpoints does not exist." in last and "Traceback" not in out.stderr
