"""The optimizer and every schedule of the run (SPEC section 6).

AdamW with a linear warm-up then cosine learning rate, a cosine weight-decay ramp on weights only
(no bias, no norm scale), per-tensor gradient clipping (DINO's `clip_gradients`, one layer at a
time under `scan_layers`) or global norm clipping, and the non-optimizer schedules the step
reads: teacher EMA momentum and teacher temperature. Every schedule is a pure function of the
step, so a resumed run sees the same values.
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


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> Schedule:
  """Linear warm-up from `warmup_start` to `start`, then cosine from `start` to `end`."""
  total_steps = max(int(total_steps), 1)
  warmup_steps = min(max(int(warmup_steps), 0), total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_start + (start - warmup_start) * step / max(warmup_steps, 1)
    t = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cos = end + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * t))
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def linear_warmup_schedule(start: float, end: float, warmup_steps: int) -> Schedule:
  """Linear from `start` to `end` over `warmup_steps`, then constant (teacher temperature)."""
  def schedule(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(warmup_steps), 1), 0.0, 1.0)
    return jnp.asarray(start + (end - start) * t if warmup_steps > 0 else end, jnp.float32)

  return schedule


def make_schedules(config, steps_per_epoch: int, total_steps: int) -> Schedules:
  o, s = config.optim, config.sove
  peak_lr = o.base_lr * config.batch_size / 256.0
  warmup = round(o.warmup_epochs * steps_per_epoch)
  return Schedules(
      learning_rate=cosine_schedule(peak_lr, o.min_lr, total_steps, warmup),
      weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, total_steps),
      ema_momentum=cosine_schedule(o.ema_momentum, o.ema_momentum_end, total_steps),
      teacher_temp=linear_warmup_schedule(
          s.teacher_temp_warmup, s.teacher_temp,
          round(s.teacher_temp_warmup_epochs * steps_per_epoch)),
  )


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


def ema(teacher, student, momentum):
  """Teacher EMA: t + (1 - m) * (s - t), leaf by leaf."""
  return jax.tree.map(lambda t, s: t + (1.0 - momentum) * (s - t), teacher, student)
