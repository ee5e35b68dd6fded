"""The optimizer and every schedule of the run (docs/method.md §8, §10).

AdamW with a linear warm-up then cosine learning rate, a cosine weight-decay ramp on weights only
(no bias, no norm scale), per-tensor gradient clipping (DINO's `clip_gradients`, one layer at a
time under `scan_layers`) or global norm clipping, and the non-optimizer schedules the step
reads: teacher EMA momentum and teacher temperature (the method's own: `sove` or `baseline`, and
iBOT's patch temperature). Every schedule is a pure function of the step, so a resumed run sees
the same values. The schedules are optax's; the teacher's EMA is `optax.incremental_update` (in
the step).
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sove_jax.models.vit import is_layer_stack, path_names

Schedule = Callable[[jax.Array], jax.Array]


class Schedules(NamedTuple):
  learning_rate: Schedule
  weight_decay: Schedule
  ema_momentum: Schedule
  teacher_temp: Schedule
  teacher_patch_temp: Schedule | None = None  # iBOT's patch targets; None for the others
  frozen_last_layer_steps: int = 0  # DINO, iBOT: steps the prototype layer is held still
  steps_per_epoch: int = 1          # what an epoch is in steps (the masks' start epoch)


def cosine(start: float, end: float, steps: int) -> Schedule:
  """`start` to `end` along half a cosine over `steps` steps, then `end`, for any two values
  (a ramp up from 0 too): optax's cosine decay shape, 1 -> 0, scaled onto the range."""
  shape = optax.cosine_decay_schedule(1.0, max(int(steps), 1))
  return lambda step: end + (start - end) * shape(step)


def warmed_up(start: float, end: float, steps: int) -> Schedule:
  """`start` to `end` linearly over `steps` steps, then `end` (a constant when steps <= 0)."""
  return optax.linear_schedule(start, end, steps) if steps > 0 else optax.constant_schedule(end)


def make_schedules(config, steps_per_epoch: int, total_steps: int) -> Schedules:
  """Learning rate: linear warm-up from 0, then cosine to `min_lr` (the peak scaled by
  batch / 256); weight decay and EMA momentum: cosine from start to end over the run; teacher
  temperatures: linear warm-up, then constant, from the method's block (`sove` or `baseline`);
  DINO's and iBOT's prototype layer frozen for `baseline.freeze_last_layer_epochs`."""
  o = config.optim
  total_steps = max(int(total_steps), 1)
  peak_lr = o.base_lr * config.batch_size / 256.0
  # optax needs a cosine of at least one step after the warm-up.
  warmup = min(max(round(o.warmup_epochs * steps_per_epoch), 0), total_steps - 1)
  common = dict(
      learning_rate=optax.warmup_cosine_decay_schedule(
          init_value=0.0, peak_value=peak_lr, warmup_steps=warmup, decay_steps=total_steps,
          end_value=o.min_lr),
      weight_decay=cosine(o.weight_decay, o.weight_decay_end, total_steps),
      ema_momentum=cosine(o.ema_momentum, o.ema_momentum_end, total_steps),
      steps_per_epoch=max(int(steps_per_epoch), 1))
  method = config.get("method", "sove")
  if method == "sove":
    s = config.sove
    temp_warmup = round(s.teacher_temp_warmup_epochs * steps_per_epoch)
    return Schedules(**common, teacher_temp=warmed_up(s.teacher_temp_warmup, s.teacher_temp,
                                                      temp_warmup))
  b = config.baseline
  temp_warmup = round(b.teacher_temp_warmup_epochs * steps_per_epoch)  # both, as iBOT's
  patch_temp = (warmed_up(b.teacher_patch_temp_warmup, b.teacher_patch_temp, temp_warmup)
                if method == "ibot" else None)
  return Schedules(**common,
                   teacher_temp=warmed_up(b.teacher_temp_warmup, b.teacher_temp, temp_warmup),
                   teacher_patch_temp=patch_temp,
                   frozen_last_layer_steps=max(
                       0, round(b.freeze_last_layer_epochs * steps_per_epoch)))


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """Scales each gradient tensor whose L2 norm exceeds `max_norm` down to it (DINO convention).

  A tensor is one layer's parameter: under `scan_layers` each layer slice of a stacked gradient
  is clipped on its own, exactly as the unstacked blocks are.
  """
  def update_fn(updates, state, params=None):
    del params

    def clip(path, g):
      axes = tuple(range(1, g.ndim)) if is_layer_stack(path) else None
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=True))
      return (g * jnp.minimum(1.0, max_norm / (norm + 1e-6))).astype(g.dtype)

    return jax.tree_util.tree_map_with_path(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def decays(path, param) -> bool:
  """Whether a parameter gets weight decay, by its role, as DINO, iBOT and the authors decide
  it (`*.bias` and 1-D tensors are exempt): never a bias, whatever its stored shape (the fused qkv
  bias is (3, heads, head_dim)); never a tensor that is 1-D per layer (LayerNorm scales); every
  other tensor (kernels, patch embedding, [CLS], mask token, position embedding) is decayed. A
  `scan_layers` stack is judged by its per-layer shape, so both layouts decay the same tensors.
  """
  if path_names(path)[-1] == "bias":
    return False
  return len(param.shape) - is_layer_stack(path) > 1


def decay_mask(params):
  """Tree of bools: which parameters `add_decayed_weights` decays (see `decays`)."""
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config, schedules: Schedules) -> optax.GradientTransformation:
  o = config.optim
  parts = []
  if o.clip > 0:
    parts.append(clip_per_tensor(o.clip) if o.clip_mode == "per_tensor"
                 else optax.clip_by_global_norm(o.clip))
  parts += [
      optax.scale_by_adam(b1=o.b1, b2=o.b2),
      optax.add_decayed_weights(schedules.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(schedules.learning_rate),
  ]
  return optax.chain(*parts)
