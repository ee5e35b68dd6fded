r"""End-to-end fine-tuning of a trained backbone with a linear classifier (the BEiT/iBOT protocol).

The teacher backbone of a checkpoint (or, with `--init=random`, a freshly initialized network of
the same config) gets a linear head and is trained whole on labeled images:

- AdamW (b1 0.9, b2 0.999) with layer-wise learning-rate decay: block i of a depth-L backbone
  learns at `layer_decay ** (L - i)` times the rate, the patch embedding, [CLS], mask token and
  position embedding at `layer_decay ** (L + 1)`, the final norm and the head at the full rate
  (BEiT's rule; a Swin's blocks are counted across its stages, a patch-merging layer with its
  stage's last block). Weight decay follows pretraining's rule (`optim.decay_mask`: no bias, no
  per-layer 1-D tensor); BEiT also exempts [CLS] and the position embedding, we do not.
- A linear warm-up from 0, then a cosine to `min_lr`; the peak is `base_lr * batch / 256`.
- Drop-path (stochastic depth, rising linearly with depth to `drop_path`), label smoothing, and
  mixup / cutmix in timm's "batch" mode: with probability `mix_prob` a batch is mixed with
  itself reversed, by cutmix with probability `switch_prob` (when both are on), with a ratio
  drawn from Beta(alpha, alpha); a cutmix box's ratio is corrected to its clipped area, and the
  labels (smoothed one-hots) are mixed by the same ratio.
- Train-time input: one random-resized crop + horizontal flip per image (the DeiT/BEiT recipe's
  geometry; its RandAugment, color jitter and random erasing are not done). Evaluation: the
  run's resize + center crop.
- The classifier reads the final-LayerNorm [CLS] token, as iBOT's fine-tuning does for every
  size (its `--use_cls`); `--pooling=cls_meanpatch` concatenates the mean patch token, as the
  linear probe does above ViT-S. The head starts near zero (std 0.02 x `init_scale`), as BEiT's.
- Label subsets: `--label_fraction=0.01` or `0.1` keeps a class-balanced subset of the train
  split (`knn.class_balanced_subset`), or `--label_split=FILE` lists the train indices; epochs
  are epochs of the subset.

The defaults are iBOT's per size (ViT-S and smaller: 200 epochs, layer decay 0.75, drop-path
0.1; ViT-B: 100, 0.65, 0.2; ViT-L: 50, 0.75, 0.4; warm-up 20 epochs, 5 for ViT-L), with weight
decay 0.05, label smoothing 0.1, mixup 0.8, cutmix 1.0. The batch (`--batch_size`, default the
run's) is the global train and evaluation batch, sharded over all devices; parameters are
replicated.

    python -m sove_jax.evaluate.finetune --workdir=runs/default [--init=random] \
        [--label_fraction=0.1] [--epochs=...] [--dataset=tfds:imagenet2012]

Each arm (init x labels) checkpoints into WORKDIR/finetune/ARM/ after every evaluation and
resumes from there; its result goes into WORKDIR/finetune.json (or `--out`) beside the other
arms', and the table of every arm recorded there is printed.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

from sove_jax import configuration, optim, reporting
from sove_jax.evaluate import features as features_lib
from sove_jax.evaluate import knn
from sove_jax.models.vit import is_layer_stack, path_names, trunc_normal

POOLINGS = ("cls", "cls_meanpatch")
INITS = ("pretrained", "random")
RESULTS_FILE = "finetune.json"


# --- the classifier -------------------------------------------------------------------------------

class Classifier(nnx.Module):
  """A backbone (ViT or Swin: [B, 1 + L, D] tokens, [CLS] first) and a linear head."""

  def __init__(self, backbone, num_classes: int, *, pooling: str = "cls",
               init_scale: float = 0.001, rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    self.backbone = backbone
    self.pooling = pooling
    width = backbone.width * (2 if pooling == "cls_meanpatch" else 1)
    self.head = nnx.Linear(width, num_classes, kernel_init=trunc_normal(0.02 * init_scale),
                           bias_init=jax.nn.initializers.zeros, rngs=rngs)

  def __call__(self, images, *, key=None):
    """float32 logits [B, classes]; `key` turns drop-path on (training)."""
    tokens = self.backbone(images, key=key)
    pooled = tokens[:, 0]
    if self.pooling == "cls_meanpatch":
      pooled = jnp.concatenate([pooled, jnp.mean(tokens[:, 1:], axis=1)], axis=-1)
    return self.head(pooled.astype(jnp.float32))


# --- layer-wise learning-rate decay ---------------------------------------------------------------

_EMBEDDINGS = ("patch_embed", "patch_norm", "cls_token", "pos_embed", "mask_token")


def layer_id(path, depths) -> int | np.ndarray:
  """BEiT's layer of a classifier parameter: 0 for the embeddings, i + 1 for block i (blocks
  counted across a Swin's stages `depths`), sum(depths) + 1 for the final norm and the head.
  A `scan_layers` stack gets one id per layer (an array)."""
  names = path_names(path)
  last = sum(depths) + 1
  if names[0] != "backbone":
    return last
  top = names[1]
  if top in _EMBEDDINGS:
    return 0
  if top == "blocks":  # ViT: blocks/<i>/... or a stack blocks/...
    if is_layer_stack(path):
      return np.arange(1, sum(depths) + 1)
    return int(names[2]) + 1
  if top == "layers":  # Swin: layers/<stage>/blocks/<j>/... or layers/<stage>/downsample/...
    stage = int(names[2])
    before = sum(depths[:stage])
    if names[3] == "blocks":
      return before + int(names[4]) + 1
    return before + depths[stage]
  if top == "norm":
    return last
  raise ValueError(f"no layer-decay rule for parameter {'/'.join(map(str, names))}")


def backbone_depths(backbone) -> tuple[int, ...]:
  """Blocks per stage: a Swin's stages, or a ViT's one stack."""
  return tuple(getattr(backbone, "depths", (backbone.depth,)))


def layer_decay_scales(params, depths, decay: float):
  """Tree of learning-rate multipliers `decay ** (depth + 1 - layer_id)`, shaped to multiply
  each parameter (a scalar, or [layers, 1, ...] for a `scan_layers` stack)."""
  top = sum(depths) + 1

  def scale(path, p):
    ids = layer_id(path, depths)
    s = np.power(float(decay), top - np.asarray(ids, np.float64)).astype(np.float32)
    return s.reshape(s.shape + (1,) * (p.ndim - s.ndim))

  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies every update by its entry of `scales` (constants of the parameters' tree)."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(params, depths, *, learning_rate, weight_decay: float, layer_decay: float,
                   b1: float = 0.9, b2: float = 0.999, clip: float = 0.0):
  """AdamW with layer-wise decay: (Adam + wd * p on decayed weights) * layer scale * lr."""
  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
            optax.add_decayed_weights(weight_decay, mask=optim.decay_mask),
            scale_by_tree(layer_decay_scales(params, depths, layer_decay)),
            optax.scale_by_learning_rate(learning_rate)]
  return optax.chain(*parts)


# --- targets, mixup and cutmix --------------------------------------------------------------------

def smoothed_targets(labels, num_classes: int, smoothing: float):
  """One-hot targets with `smoothing` spread evenly over all classes (timm's on/off values):
  1 - smoothing + smoothing / C on the label, smoothing / C elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def soft_cross_entropy(logits, targets):
  """Per-example cross-entropy with soft targets: -sum_c t_c log softmax(logits)_c. With
  smoothed one-hots this is label-smoothing cross-entropy, with mixed ones the mixup loss."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


class MixConfig(NamedTuple):
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0         # probability that a batch is mixed at all
  switch_prob: float = 0.5  # probability of cutmix rather than mixup, when both are on

  @property
  def active(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


class MixDraw(NamedTuple):
  """The random draws of one batch's mix (timm's per-batch parameters)."""
  apply: jax.Array   # bool: the batch is mixed
  cutmix: jax.Array  # bool: by cutmix (else mixup)
  lam: jax.Array     # the Beta draw: the share of the batch's own images
  center: jax.Array  # int32 [2]: the cutmix box center (row, column)


def draw_mix(key, height: int, width: int, mix: MixConfig) -> MixDraw:
  k_apply, k_switch, k_lam, k_y, k_x = jax.random.split(key, 5)
  if mix.mixup_alpha > 0 and mix.cutmix_alpha > 0:
    cutmix = jax.random.uniform(k_switch) < mix.switch_prob
  else:
    cutmix = jnp.asarray(mix.cutmix_alpha > 0)
  alpha = jnp.where(cutmix, max(mix.cutmix_alpha, 1e-6), max(mix.mixup_alpha, 1e-6))
  lam = jax.random.beta(k_lam, alpha, alpha)
  center = jnp.stack([jax.random.randint(k_y, (), 0, height),
                      jax.random.randint(k_x, (), 0, width)]).astype(jnp.int32)
  return MixDraw(jax.random.uniform(k_apply) < mix.prob, cutmix, lam, center)


def cutmix_box(lam, center, height: int, width: int):
  """timm's box for ratio `lam`: sides int(side * sqrt(1 - lam)) around `center`, clipped to
  the image: int32 (top, bottom, left, right), bottom/right exclusive."""
  cut = jnp.sqrt(1.0 - lam)
  half_h = jnp.floor(height * cut).astype(jnp.int32) // 2
  half_w = jnp.floor(width * cut).astype(jnp.int32) // 2
  top, bottom = jnp.clip(center[0] - half_h, 0, height), jnp.clip(center[0] + half_h, 0, height)
  left, right = jnp.clip(center[1] - half_w, 0, width), jnp.clip(center[1] + half_w, 0, width)
  return jnp.stack([top, bottom, left, right])


def mix_batch(images, targets, draw: MixDraw):
  """(images, targets) mixed with the batch reversed, by `draw`: mixup blends the images by
  lam; cutmix pastes the partner's box and sets lam to the share of pixels left. Returns
  (images, targets, lam)."""
  height, width = images.shape[1], images.shape[2]
  partner = jnp.flip(images, axis=0)
  box = cutmix_box(draw.lam, draw.center, height, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])
  area = (box[1] - box[0]) * (box[3] - box[2])
  lam = jnp.where(draw.cutmix, 1.0 - area / (height * width), draw.lam)
  lam = jnp.where(draw.apply, lam, 1.0).astype(jnp.float32)
  cut = jnp.where(inside[None, :, :, None], partner, images)
  blend = lam * images + (1.0 - lam) * partner
  mixed = jnp.where(draw.apply, jnp.where(draw.cutmix, cut, blend), images)
  targets = lam * targets + (1.0 - lam) * jnp.flip(targets, axis=0)
  return mixed.astype(images.dtype), targets, lam


# --- the step -------------------------------------------------------------------------------------

class State(NamedTuple):
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def make_train_step(graphdef, tx, learning_rate, *, num_classes: int, smoothing: float,
                    mix: MixConfig):
  """step(state, batch, key) -> (state, metrics): one AdamW step on the mean soft-target loss
  of the (mixed) batch; drop-path and the mix draw from `key` folded with the step."""
  def step(state: State, batch, key):
    key = jax.random.fold_in(key, state.step)
    k_mix, k_drop = jax.random.split(key)
    images = batch["image"]
    targets = smoothed_targets(batch["label"], num_classes, smoothing)
    if mix.active:
      draw = draw_mix(k_mix, images.shape[1], images.shape[2], mix)
      images, targets, _ = mix_batch(images, targets, draw)

    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(images, key=k_drop)
      return jnp.mean(soft_cross_entropy(logits, targets))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "learning_rate": learning_rate(state.step)}
    return State(state.step + 1, params, opt_state), metrics

  return step


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, images):
  return nnx.merge(graphdef, params)(images)


def evaluate(graphdef, params, batches, sharding):
  """(top-1 %, top-5 %) of the classifier over eval-input batches (every valid example)."""
  logits, labels = features_lib.extract_features(
      functools.partial(_logits, graphdef, params), batches, sharding=sharding,
      name="fine-tuning evaluation")
  top = np.argsort(-logits, axis=1)[:, :5]
  hit = top == labels[:, None]
  return float(100.0 * hit[:, 0].mean()), float(100.0 * hit.any(axis=1).mean())


# --- the protocol's settings ----------------------------------------------------------------------

def protocol_defaults(variant: str) -> dict:
  """iBOT's fine-tuning recipe per size (ViT-Ti and custom small models as ViT-S)."""
  if variant == "b":
    return dict(epochs=100, layer_decay=0.65, drop_path=0.2, warmup_epochs=20.0)
  if variant == "l":
    return dict(epochs=50, layer_decay=0.75, drop_path=0.4, warmup_epochs=5.0)
  return dict(epochs=200, layer_decay=0.75, drop_path=0.1, warmup_epochs=20.0)


class Settings(NamedTuple):
  """Everything that defines a fine-tuning arm (its results and checkpoints say which)."""
  init: str = "pretrained"
  label_fraction: float = 1.0
  label_split: str = ""
  epochs: int = 0              # 0: the protocol's for the size (`protocol_defaults`)
  warmup_epochs: float = -1.0  # < 0: the protocol's
  base_lr: float = 1e-3        # per 256 images (BEiT ViT-B: 4e-3 at batch 1024)
  min_lr: float = 1e-6
  weight_decay: float = 0.05
  layer_decay: float = 0.0     # 0: the protocol's
  drop_path: float = -1.0      # < 0: the protocol's
  smoothing: float = 0.1
  mixup: float = 0.8
  cutmix: float = 1.0
  mix_prob: float = 1.0
  switch_prob: float = 0.5
  crop_scale: tuple = (0.08, 1.0)
  crop_ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
  flip: bool = True
  pooling: str = "cls"
  init_scale: float = 0.001
  clip_grad: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eval_every: int = 1          # epochs between evaluations (and checkpoints); the last always
  log_every: int = 50          # steps between progress lines
  seed: int = 0

  def resolved(self, variant: str) -> "Settings":
    d = protocol_defaults(variant)
    return self._replace(
        epochs=self.epochs or d["epochs"],
        warmup_epochs=self.warmup_epochs if self.warmup_epochs >= 0 else d["warmup_epochs"],
        layer_decay=self.layer_decay or d["layer_decay"],
        drop_path=self.drop_path if self.drop_path >= 0 else d["drop_path"])


def arm_name(s: Settings) -> str:
  """`pretrained_10pct`, `random_full`, `pretrained_split-NAME`: the arm's key and folder."""
  if s.label_split:
    labels = "split-" + os.path.splitext(os.path.basename(s.label_split))[0]
  elif s.label_fraction >= 1.0:
    labels = "full"
  else:
    labels = f"{100 * s.label_fraction:g}pct"
  return f"{s.init}_{labels}"


def validate(s: Settings, *, batch_size: int | None, num_devices: int):
  """One-sentence errors for settings that cannot work, before anything loads or compiles
  (`batch_size` None: not known yet, the run's)."""
  err = configuration.ConfigError
  if s.init not in INITS:
    raise err(f"--init must be one of {INITS}, got {s.init!r}.")
  if s.pooling not in POOLINGS:
    raise err(f"--pooling must be one of {POOLINGS}, got {s.pooling!r}.")
  if not 0.0 < s.label_fraction <= 1.0:
    raise err(f"--label_fraction must be in (0, 1], got {s.label_fraction}.")
  if s.label_split and not epath.Path(s.label_split).exists():
    raise err(f"--label_split file {s.label_split} does not exist.")
  if s.epochs < 0 or s.eval_every < 1 or s.log_every < 1:
    raise err("--epochs must be >= 0 (0: the protocol's), --eval_every and --log_every >= 1.")
  if s.base_lr <= 0 or s.min_lr < 0 or s.weight_decay < 0:
    raise err("--base_lr must be > 0, --min_lr and --weight_decay >= 0.")
  if not 0.0 <= s.layer_decay <= 1.0:
    raise err(f"--layer_decay must be in (0, 1] (0: the protocol's), got {s.layer_decay}.")
  if s.drop_path >= 1.0:
    raise err(f"--drop_path must be < 1, got {s.drop_path}.")
  if not 0.0 <= s.smoothing < 1.0:
    raise err(f"--smoothing must be in [0, 1), got {s.smoothing}.")
  if s.mixup < 0 or s.cutmix < 0:
    raise err("--mixup and --cutmix (Beta alphas) must be >= 0 (0: off).")
  if not (0.0 <= s.mix_prob <= 1.0 and 0.0 <= s.switch_prob <= 1.0):
    raise err("--mix_prob and --switch_prob must be probabilities in [0, 1].")
  lo, hi = s.crop_scale
  if not 0.0 < lo <= hi <= 1.0:
    raise err(f"--crop_scale must be two area fractions 0 < lo <= hi <= 1, got {s.crop_scale}.")
  if not 0.0 < s.crop_ratio[0] <= s.crop_ratio[1]:
    raise err(f"--crop_ratio must be 0 < lo <= hi, got {s.crop_ratio}.")
  if batch_size is None:
    return
  if batch_size <= 0 or batch_size % num_devices:
    raise err(f"--batch_size {batch_size} must be a positive multiple of the {num_devices} "
              "devices.")
  if MixConfig(s.mixup, s.cutmix, s.mix_prob, s.switch_prob).active and batch_size % 2:
    raise err(f"mixup/cutmix pair each image with the batch reversed: --batch_size {batch_size} "
              "must be even.")


# --- the run --------------------------------------------------------------------------------------

def _label_indices(s: Settings, labels):
  """Train indices of the arm's labels: all (None), a split file's, or a class-balanced subset."""
  if s.label_split:
    idx = knn.read_split_file(s.label_split)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(labels)):
      raise configuration.ConfigError(
          f"--label_split {s.label_split} holds indices outside the {len(labels)} train "
          "examples.")
    return idx
  if s.label_fraction >= 1.0:
    return None
  return knn.class_balanced_subset(labels, s.label_fraction, seed=s.seed)


def _build_backbone(workdir, s: Settings, step, load_backbone):
  """(config, backbone): the checkpoint's teacher, or a fresh one of the run's config."""
  if s.init == "pretrained":
    return load_backbone(workdir, step=step, which="teacher")
  from sove_jax import checkpoint
  from sove_jax.models import network
  config = checkpoint.read_config(workdir)
  with nnx.use_eager_sharding(False):
    backbone = network.build_backbone(config.model, config.data.global_size,
                                      nnx.Rngs(1000 + s.seed))
  return config, backbone


def finetune(workdir: str, settings: Settings, *, load_backbone, step=None,
             dataset=None, data_dir=None, train_split=None, eval_split=None, batch_size=None,
             max_train_examples=-1, max_eval_examples=-1, mesh=None) -> dict:
  """Fine-tunes one arm (resuming its checkpoint if any) and returns its record: final and best
  top-1/top-5, the per-evaluation curve, the data used and the resolved settings."""
  from sove_jax import checkpoint
  from sove_jax.data import labeled, pipeline, sources

  mesh = features_lib.batch_mesh() if mesh is None else mesh
  validate(settings, batch_size=batch_size, num_devices=mesh.devices.size)
  config, backbone = _build_backbone(workdir, settings, step, load_backbone)
  s = settings.resolved(config.model.variant)
  batch_size = batch_size or config.batch_size
  validate(s, batch_size=batch_size, num_devices=mesh.devices.size)
  data = features_lib.override_data(config.data, dataset=dataset, data_dir=data_dir,
                                    train_split=train_split, eval_split=eval_split)
  size = config.data.global_size

  # Labels of the train split (the first `max_train_examples`), and the arm's subset of them.
  train_source = sources.open_source(data, data.train_split)
  whole = s.label_fraction >= 1.0 and not s.label_split and max_train_examples < 0
  if whole and isinstance(train_source, sources.TfdsSource):
    indices = None  # streamed whole; a TFDS split's labels would take a pass to list
    num_classes = train_source.builder.info.features[data.label_key].num_classes
  else:
    labels = labeled.split_labels(train_source)
    if max_train_examples >= 0:
      labels = labels[:max_train_examples]
    indices = _label_indices(s, labels)
    if indices is None and len(labels) < len(train_source):
      indices = np.arange(len(labels))
    num_classes = int(labels.max()) + 1
  train_in = labeled.labeled_train_input(
      data, split=data.train_split, indices=indices, size=size, scale=s.crop_scale,
      ratio=s.crop_ratio, flip=s.flip, global_batch_size=batch_size, seed=s.seed)
  eval_batches = pipeline.eval_input(data, split=data.eval_split, global_batch_size=batch_size,
                                     max_examples=max_eval_examples)
  steps_per_epoch = train_in.steps_per_epoch
  total = s.epochs * steps_per_epoch
  warmup = min(int(round(s.warmup_epochs * steps_per_epoch)), total - 1)
  peak = s.base_lr * batch_size / 256.0
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=s.min_lr)

  # The model: backbone + head, drop-path set for training; parameters replicated.
  backbone.drop_path_rate = float(s.drop_path)
  model = Classifier(backbone, num_classes, pooling=s.pooling, init_scale=s.init_scale,
                     rngs=nnx.Rngs(2000 + s.seed))
  graphdef, params = nnx.split(model)
  params = params.to_pure_dict()
  tx = make_optimizer(params, backbone_depths(backbone), learning_rate=schedule,
                      weight_decay=s.weight_decay, layer_decay=s.layer_decay, b1=s.b1, b2=s.b2,
                      clip=s.clip_grad)
  replicated = jax.NamedSharding(mesh, jax.P())
  batch_sharding = jax.NamedSharding(mesh, jax.P(tuple(mesh.axis_names)))
  state = State(jnp.zeros((), jnp.int32), params, tx.init(params))
  state = jax.device_put(state, replicated)
  state_shardings = jax.tree.map(lambda _: replicated, state)
  mix = MixConfig(s.mixup, s.cutmix, s.mix_prob, s.switch_prob)
  step_fn = make_train_step(graphdef, tx, schedule, num_classes=num_classes,
                            smoothing=s.smoothing, mix=mix)
  train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)

  # Resume this arm if it has a checkpoint of the same settings.
  arm = arm_name(s)
  arm_dir = os.path.join(workdir, "finetune", arm)
  pretrained_step = ("latest" if step is None else step) if s.init == "pretrained" else None
  record = {"arm": arm, "init": s.init, "checkpoint_step": pretrained_step,
            "dataset": f"{data.source}:{data.name}" if data.name else data.source,
            "train_examples": int(train_in.num_examples), "num_classes": num_classes,
            "batch_size": batch_size, "steps": total, "settings": s._asdict(), "curve": []}
  ckpt = checkpoint.Checkpointer(arm_dir, keep=1)
  try:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    restored = ckpt.restore(abstract)
    if restored is not None:
      saved = restored[1]
      if saved["settings"] != json.loads(json.dumps(record["settings"])):
        raise configuration.ConfigError(
            f"{arm_dir} holds a fine-tuning run with other settings; remove it to start again.")
      state, record["curve"] = restored[0], saved["curve"]
      train_in.epoch = int(state.step) // steps_per_epoch
      reporting.say(f"{arm}: resumed at step {int(state.step)} of {total}")
    reporting.say(
        f"{arm}: {s.epochs} epochs x {steps_per_epoch} steps of {batch_size} on "
        f"{train_in.num_examples} labeled examples ({num_classes} classes), lr {peak:.2e}, "
        f"layer decay {s.layer_decay}, drop-path {s.drop_path}")
    key = jax.device_put(jax.random.PRNGKey(s.seed), replicated)
    start = int(state.step)
    t_start = t_last = time.monotonic()
    step_last, losses = start, []
    for i in range(start + 1, total + 1):
      batch = pipeline.to_global(next(train_in), batch_sharding)
      state, metrics = train_step(state, batch, key)
      losses.append(metrics["loss"])
      epoch, in_epoch = divmod(i, steps_per_epoch)
      if i % s.log_every == 0 or i == total:
        loss = float(np.mean(jax.device_get(losses)))
        line = (f"{arm}: epoch {(i - 1) // steps_per_epoch + 1}/{s.epochs} step {i}/{total} | "
                f"loss {loss:.4f} | lr {float(metrics['learning_rate']):.2e}")
        now = time.monotonic()
        if step_last > start:  # the first window holds the compilation: no rate from it
          rate = (i - step_last) / max(now - t_last, 1e-9)
          line += (f" | {rate * batch_size:,.0f} img/s | ETA "
                   f"{reporting.duration((total - i) / max(rate, 1e-9))}")
        reporting.say(line)
        t_last, step_last, losses = now, i, []
      if in_epoch == 0 and (epoch % s.eval_every == 0 or i == total):
        top1, top5 = evaluate(graphdef, state.params, eval_batches, batch_sharding)
        record["curve"].append({"epoch": epoch, "step": i, "top1": top1, "top5": top5})
        reporting.say(f"{arm}: epoch {epoch}: top-1 {top1:.2f}%  top-5 {top5:.2f}%")
        ckpt.save(i, state, {"settings": record["settings"], "curve": record["curve"]})
        t_last = time.monotonic()  # rates count training only
    record["minutes"] = (time.monotonic() - t_start) / 60.0
  finally:
    ckpt.close()
  last = record["curve"][-1]
  record.update(top1=last["top1"], top5=last["top5"],
                best_top1=max(c["top1"] for c in record["curve"]))
  return record


# --- results --------------------------------------------------------------------------------------

def write_record(path, record) -> dict:
  """Adds (or replaces) the arm's record in the JSON file of all arms; returns all of them."""
  path = epath.Path(path)
  arms = json.loads(path.read_text()) if path.exists() else {}
  arms[record["arm"]] = record
  path.write_text(json.dumps(arms, indent=2))
  return arms


def format_table(arms: dict) -> str:
  """One row per arm: init, labels, examples, epochs, final top-1/top-5, best top-1."""
  lines = [f"{'arm':<24}{'examples':>9}{'epochs':>7}{'top-1':>8}{'top-5':>8}{'best':>8}"]
  for name, r in sorted(arms.items()):
    lines.append(f"{name:<24}{r['train_examples']:>9}{r['settings']['epochs']:>7}"
                 f"{r['top1']:>8.2f}{r['top5']:>8.2f}{r['best_top1']:>8.2f}")
  return "\n".join(lines)


def finetune_checkpoint(workdir, settings: Settings, *, load_backbone, out=None, **kwargs):
  """Runs `finetune`, records the arm in `out` (default WORKDIR/finetune.json; process 0) and
  prints the table of every recorded arm. Returns the arm's record."""
  record = finetune(workdir, settings, load_backbone=load_backbone, **kwargs)
  if jax.process_index() == 0:
    arms = write_record(out or epath.Path(workdir) / RESULTS_FILE, record)
    logging.info("fine-tuning of %s (top-1 / top-5 %% at the end, best top-1 over "
                 "evaluations):\n%s", workdir, format_table(arms))
  return record


def _settings_from_flags(f) -> Settings:
  return Settings(
      init=f.init, label_fraction=f.label_fraction, label_split=f.label_split, epochs=f.epochs,
      warmup_epochs=f.warmup_epochs, base_lr=f.base_lr, min_lr=f.min_lr,
      weight_decay=f.weight_decay, layer_decay=f.layer_decay, drop_path=f.drop_path,
      smoothing=f.smoothing, mixup=f.mixup, cutmix=f.cutmix, mix_prob=f.mix_prob,
      switch_prob=f.switch_prob, crop_scale=tuple(float(x) for x in f.crop_scale),
      crop_ratio=tuple(float(x) for x in f.crop_ratio), flip=f.flip, pooling=f.pooling,
      init_scale=f.init_scale, clip_grad=f.clip_grad, eval_every=f.eval_every,
      log_every=f.log_every, seed=f.seed)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  try:
    if len(f.crop_scale) != 2 or len(f.crop_ratio) != 2:
      raise configuration.ConfigError("--crop_scale and --crop_ratio take two numbers: lo,hi.")
    settings = _settings_from_flags(f)
    validate(settings, batch_size=f.batch_size or None, num_devices=jax.device_count())
    args = features_lib.flag_arguments(f)
    del args["input_fn"]  # the fine-tuning input is its own (sove_jax.data.labeled)
    finetune_checkpoint(**args, settings=settings, out=f.out or None)
  except (configuration.ConfigError, FileNotFoundError) as e:
    logging.error("%s", e)
    sys.exit(1)


def _define_flags():
  from absl import flags
  features_lib.define_flags(flags)
  d = Settings()
  flags.DEFINE_enum("init", d.init, INITS, "Start from the checkpoint's teacher, or from a "
                    "random initialization of the same config (the baseline).")
  flags.DEFINE_float("label_fraction", d.label_fraction, "Fine-tune on a class-balanced subset "
                     "of the train labels (0.01, 0.1), or all of them (1).")
  flags.DEFINE_string("label_split", d.label_split, "File of train indices to fine-tune on, one "
                      "per line (overrides --label_fraction).")
  flags.DEFINE_integer("epochs", d.epochs, "Epochs (of the labeled subset); 0: the protocol's "
                       "for the model size (200 S, 100 B, 50 L).")
  flags.DEFINE_float("warmup_epochs", d.warmup_epochs, "Linear warm-up epochs; < 0: the "
                     "protocol's (20; 5 for ViT-L).")
  flags.DEFINE_float("base_lr", d.base_lr, "Peak learning rate per 256 images.")
  flags.DEFINE_float("min_lr", d.min_lr, "Learning rate at the end of the cosine.")
  flags.DEFINE_float("weight_decay", d.weight_decay, "AdamW weight decay (weights only).")
  flags.DEFINE_float("layer_decay", d.layer_decay, "Layer-wise learning-rate decay; 0: the "
                     "protocol's (0.75 S and L, 0.65 B).")
  flags.DEFINE_float("drop_path", d.drop_path, "Drop-path rate of the last block; < 0: the "
                     "protocol's (0.1 S, 0.2 B, 0.4 L).")
  flags.DEFINE_float("smoothing", d.smoothing, "Label smoothing.")
  flags.DEFINE_float("mixup", d.mixup, "Mixup Beta alpha (0: off).")
  flags.DEFINE_float("cutmix", d.cutmix, "CutMix Beta alpha (0: off).")
  flags.DEFINE_float("mix_prob", d.mix_prob, "Probability that a batch is mixed.")
  flags.DEFINE_float("switch_prob", d.switch_prob, "Probability of cutmix over mixup when both "
                     "are on.")
  flags.DEFINE_list("crop_scale", [f"{x:g}" for x in d.crop_scale], "Random-resized-crop area "
                    "range.")
  flags.DEFINE_list("crop_ratio", [f"{x:g}" for x in d.crop_ratio], "Random-resized-crop "
                    "aspect-ratio range.")
  flags.DEFINE_bool("flip", d.flip, "Random horizontal flips.")
  flags.DEFINE_enum("pooling", d.pooling, POOLINGS, "Classifier input: the [CLS] token "
                    "(iBOT), or [CLS] + mean patch token.")
  flags.DEFINE_float("init_scale", d.init_scale, "Head initialization scale (of std 0.02).")
  flags.DEFINE_float("clip_grad", d.clip_grad, "Global gradient-norm clip (0: off).")
  flags.DEFINE_integer("eval_every", d.eval_every, "Epochs between evaluations and "
                       "checkpoints.")
  flags.DEFINE_integer("log_every", d.log_every, "Steps between progress lines.")
  flags.DEFINE_integer("seed", d.seed, "Seed of the subset, the head, the order and the "
                       "augmentations.")
  flags.DEFINE_string("out", "", "Results JSON (default WORKDIR/finetune.json), shared by arms.")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
