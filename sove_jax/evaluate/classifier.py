"""The fine-tuning classifier and its training step (the BEiT/iBOT recipes' pieces).

- `Classifier`: a backbone and a head on its [CLS] (or [CLS] + mean patch): a linear layer, or
  (iBOT's semi-supervised fine-tuning, `head_layer`) the projection head's first layer, a GELU
  and a linear layer.
- Layer-wise learning-rate decay: block i of a depth-L backbone learns at `layer_decay ** (L -
  i)` times the rate, the patch embedding, [CLS], mask token and position embedding at
  `layer_decay ** (L + 1)`, the final norm and the head at the full rate (BEiT's rule; a Swin's
  blocks are counted across its stages, a patch-merging layer with its stage's last block).
- AdamW whose weight decay follows pretraining's rule (`optim.decays`: no bias, no per-layer 1-D
  tensor) and exempts, as BEiT's `no_weight_decay()`, the [CLS] token and the position embedding
  (a Swin's relative position bias tables): `decay_mask`.
- Label smoothing and timm's "batch" mixup / cutmix: with probability `prob` a batch is mixed with
  itself reversed, by cutmix with probability `switch_prob` (when both are on), with a ratio drawn
  from Beta(alpha, alpha); a cutmix box's ratio is corrected to its clipped area, and the labels
  (smoothed one-hots) are mixed by the same ratio.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sove_jax import optim
from sove_jax.evaluate import features as features_lib
from sove_jax.models.vit import is_layer_stack, path_names, trunc_normal

POOLINGS = ("cls", "cls_meanpatch")
# BEiT's `no_weight_decay()`: the ViT's [CLS] and position embedding; the Swin's relative
# position bias tables (its `no_weight_decay_keywords`).
NO_DECAY = ("cls_token", "pos_embed", "relative_position_bias_table")


# --- the classifier -------------------------------------------------------------------------------

class Classifier(nnx.Module):
  """A backbone (ViT or Swin: [B, 1 + L, D] tokens, [CLS] first) and a head: linear, or with
  `head_layer` ({"kernel": [D, hidden], "bias": [hidden]}, the pretrained projection head's
  first layer) that layer, a GELU and a linear layer, as iBOT's `ClassProjHead` with
  `finetune_head_layer=1`. The last layer starts trunc-normal with std 0.02 x `init_scale`."""

  def __init__(self, backbone, num_classes: int, *, pooling: str = "cls",
               init_scale: float = 0.001, head_layer=None, rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    self.backbone = backbone
    self.pooling = pooling
    width = backbone.width * (2 if pooling == "cls_meanpatch" else 1)
    hidden = None
    if head_layer is not None:
      kernel = np.asarray(head_layer["kernel"], np.float32)
      if kernel.shape[0] != width:
        raise ValueError(f"the projection head's first layer takes {kernel.shape[0]} features, "
                         f"the classifier gives {width}")
      hidden = nnx.Linear(width, kernel.shape[1], rngs=rngs)
      hidden.kernel[...] = jnp.asarray(kernel)
      hidden.bias[...] = jnp.asarray(head_layer["bias"], jnp.float32)
      width = kernel.shape[1]
    self.hidden = hidden
    self.head = nnx.Linear(width, num_classes, kernel_init=trunc_normal(0.02 * init_scale),
                           bias_init=jax.nn.initializers.zeros, rngs=rngs)

  def __call__(self, images, *, key=None):
    """float32 logits [B, classes]; `key` turns drop-path on (training)."""
    tokens = self.backbone(images, key=key)
    pooled = tokens[:, 0]
    if self.pooling == "cls_meanpatch":
      pooled = jnp.concatenate([pooled, jnp.mean(tokens[:, 1:], axis=1)], axis=-1)
    pooled = pooled.astype(jnp.float32)
    if self.hidden is not None:
      pooled = jax.nn.gelu(self.hidden(pooled), approximate=False)
    return self.head(pooled)


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


def decays(path, param, no_decay=NO_DECAY) -> bool:
  """Whether fine-tuning decays a parameter: pretraining's rule (`optim.decays`), less the
  parameters named in `no_decay` (BEiT's exemptions)."""
  return optim.decays(path, param) and not set(map(str, path_names(path))) & set(no_decay)


def decay_mask(params, no_decay=NO_DECAY):
  """Tree of bools: which parameters `add_decayed_weights` decays (see `decays`)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: decays(p, x, no_decay), params)


def make_optimizer(params, depths, *, learning_rate, weight_decay: float, layer_decay: float,
                   b1: float = 0.9, b2: float = 0.999, clip: float = 0.0, no_decay=NO_DECAY):
  """AdamW with layer-wise decay: (Adam + wd * p on decayed weights) * layer scale * lr."""
  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
            optax.add_decayed_weights(weight_decay,
                                      mask=functools.partial(decay_mask, no_decay=no_decay)),
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


def accuracy(graphdef, params, batches, sharding):
  """(top-1 %, top-5 %) of the classifier over eval-input batches (every valid example)."""
  logits, labels = features_lib.extract_features(
      functools.partial(_logits, graphdef, params), batches, sharding=sharding,
      name="fine-tuning evaluation")
  top = np.argsort(-logits, axis=1)[:, :5]
  hit = top == labels[:, None]
  return float(100.0 * hit[:, 0].mean()), float(100.0 * hit.any(axis=1).mean())
