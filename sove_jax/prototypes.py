"""The baselines' objectives: DINO and iBOT, losses over learned prototypes.

Importable alone (`from sove_jax import prototypes`); depends on JAX only. Pure functions of
arrays; the centers are arrays the caller keeps in its state and passes back each step.

DINO (Caron et al., 2021). The head (`sove_jax.models.PrototypeHead`) gives every view K
prototype logits. The teacher's logits of the global views are *centered* (a running mean of
them, `center`, is subtracted) and *sharpened* (softmax at a low temperature, warmed up from
0.04); the student's logits of all views, local crops included, go through a softmax at 0.1.
The loss is the cross-entropy between the teacher's distribution of global view v and the
student's of view u, for every pair u != v, averaged over pairs and over the batch. After the
step the center moves towards the batch mean of the teacher's logits with momentum 0.9.

iBOT (Zhou et al., 2022) adds masked image modelling to DINO's [CLS] loss: the student sees its
global views with masked patches, and at every masked position its patch distribution is
trained towards the teacher's (unmasked) one of the same view, through the same head, with a
separate center for patch tokens and its own teacher temperature (0.07, warmed up from 0.04).
Per image the patch loss is the mean over its masked tokens, then the mean over global views.

Both losses are the same cross-entropies as SOVE's, over prototypes instead of concepts, so
they reuse `objective.class_loss_per_example` (pairs u != v, student views first Vt global) and
`objective.patch_loss_per_example` (per-view masked means): the same reductions, tested once.

Across devices, under `jax.jit` with the batch sharded, every mean here is over the global
batch (the partitioner inserts the reduction); inside `jax.shard_map`, pass `axis_name` to
`update_center` so that the batch mean is averaged over devices, as DINO all-reduces it.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from sove_jax import objective
from sove_jax.objective.checks import check_rank

__all__ = [
    "CENTER_MOMENTUM",
    "STUDENT_TEMP",
    "batch_center",
    "dino_loss",
    "dino_loss_per_example",
    "freeze_last_layer",
    "ibot_loss",
    "ibot_loss_per_example",
    "ibot_patch_loss_per_example",
    "student_log_probs",
    "teacher_entropies",
    "teacher_probs",
    "update_center",
]

CENTER_MOMENTUM = 0.9   # DINO and iBOT, both centers
STUDENT_TEMP = 0.1      # DINO and iBOT, [CLS] and patch tokens


# --------------------------------------------------------------------------- checks


def _check_temperature(name: str, t: Any) -> None:
  if jnp.ndim(t) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(t)}")
  if isinstance(t, (int, float)) and t <= 0:
    raise ValueError(f"{name}={t} must be > 0")


def _check_center(name: str, center: Any, num_prototypes: int) -> None:
  if jnp.shape(center) != (num_prototypes,):
    raise ValueError(f"{name} has shape {jnp.shape(center)}, expected ({num_prototypes},): one "
                     "value per prototype")


def _check_momentum(momentum: Any) -> None:
  if jnp.ndim(momentum) != 0:
    raise ValueError(f"momentum must be a scalar, got shape {jnp.shape(momentum)}")
  if isinstance(momentum, (int, float)) and not 0.0 <= momentum <= 1.0:
    raise ValueError(f"momentum={momentum} must lie in [0, 1]")


# --------------------------------------------------------------------------- distributions


def teacher_probs(teacher_logits: jax.Array, center: jax.Array,
                  temperature: float | jax.Array) -> jax.Array:
  """Centered and sharpened teacher distribution, softmax((t - center) / T): float32 [..., K].

  No gradient flows through it (the teacher is a target).
  """
  _check_temperature("temperature", temperature)
  if jnp.ndim(teacher_logits) < 1:
    raise ValueError("teacher_logits must have a prototype axis [..., K]")
  _check_center("center", center, jnp.shape(teacher_logits)[-1])
  t = jnp.asarray(teacher_logits, jnp.float32) - jnp.asarray(center, jnp.float32)
  return lax.stop_gradient(jax.nn.softmax(t / jnp.asarray(temperature, jnp.float32), axis=-1))


def student_log_probs(student_logits: jax.Array,
                      temperature: float | jax.Array = STUDENT_TEMP) -> jax.Array:
  """log softmax(s / T) over the prototypes: float32 [..., K]."""
  _check_temperature("temperature", temperature)
  s = jnp.asarray(student_logits, jnp.float32)
  return jax.nn.log_softmax(s / jnp.asarray(temperature, jnp.float32), axis=-1)


# --------------------------------------------------------------------------- centers


def batch_center(teacher_logits: jax.Array, *, axis_name: str | Sequence[str] | None = None
                 ) -> jax.Array:
  """Mean of the teacher's logits over every leading axis (views, batch, tokens): float32 [K].

  For patch tokens this equals iBOT's mean over tokens then over images, since every image has
  the same number of tokens. `axis_name`: the `shard_map` axes the batch is split over; the
  local means are averaged over them (equal shards), giving the global batch mean.
  """
  t = jnp.asarray(teacher_logits, jnp.float32)
  if t.ndim < 2:
    raise ValueError(f"teacher_logits must have shape [..., N, K], got {t.shape}")
  mean = jnp.mean(t, axis=tuple(range(t.ndim - 1)))  # no reshape: batch axes may be sharded
  if axis_name is not None:
    mean = lax.pmean(mean, axis_name)
  return lax.stop_gradient(mean)


def update_center(center: jax.Array, teacher_logits: jax.Array,
                  momentum: float | jax.Array = CENTER_MOMENTUM, *,
                  axis_name: str | Sequence[str] | None = None) -> jax.Array:
  """The center's EMA step: momentum * center + (1 - momentum) * batch mean of the logits.

  Called after the loss, with the same teacher logits the loss was centered with: the [CLS]
  logits of the teacher's global views for DINO's (and iBOT's [CLS]) center, all the patch
  logits of those views for iBOT's patch center. Returns float32 [K].
  """
  _check_momentum(momentum)
  if jnp.ndim(teacher_logits) < 2:
    raise ValueError(f"teacher_logits must have shape [..., N, K], got {jnp.shape(teacher_logits)}")
  _check_center("center", center, jnp.shape(teacher_logits)[-1])
  m = jnp.asarray(momentum, jnp.float32)
  mean = batch_center(teacher_logits, axis_name=axis_name)
  return jnp.asarray(center, jnp.float32) * m + mean * (1.0 - m)


# --------------------------------------------------------------------------- DINO


def dino_loss_per_example(student_logits: jax.Array, teacher_logits: jax.Array,
                          center: jax.Array, *, teacher_temp: float | jax.Array,
                          student_temp: float | jax.Array = STUDENT_TEMP) -> jax.Array:
  """DINO's loss per image: mean over pairs (teacher view v, student view u != v). float32 [B].

  Args:
    student_logits: [Vs, B, K], view-major; the first Vt views are the global views the teacher
      saw (in the same order), the rest local crops.
    teacher_logits: [Vt, B, K], the teacher's logits of the global views (no gradient).
    center: [K], the teacher center before this step's update.
    teacher_temp: the (warmed-up) teacher temperature; may be traced.
    student_temp: 0.1 in DINO.
  """
  check_rank("student_logits", student_logits, 3, "[Vs, B, K]")
  check_rank("teacher_logits", teacher_logits, 3, "[Vt, B, K]")
  num_s, batch, num_k = jnp.shape(student_logits)
  num_t = jnp.shape(teacher_logits)[0]
  if jnp.shape(teacher_logits)[1:] != (batch, num_k):
    raise ValueError(f"teacher_logits has shape {jnp.shape(teacher_logits)}; [B, K] must match "
                     f"student_logits {jnp.shape(student_logits)}")
  if num_t > num_s or num_t * num_s - num_t < 1:
    raise ValueError(f"student_logits has Vs={num_s} views and teacher_logits Vt={num_t}: the "
                     "teacher's views are the student's first Vt, and a pair u != v must exist")
  pt = teacher_probs(teacher_logits, center, teacher_temp)
  return objective.class_loss_per_example(student_log_probs(student_logits, student_temp), pt)


def dino_loss(student_logits, teacher_logits, center, *, teacher_temp,
              student_temp=STUDENT_TEMP) -> jax.Array:
  """DINO's loss: the batch mean of `dino_loss_per_example`."""
  return jnp.mean(dino_loss_per_example(student_logits, teacher_logits, center,
                                        teacher_temp=teacher_temp, student_temp=student_temp))


# --------------------------------------------------------------------------- iBOT


def ibot_patch_loss_per_example(student_patch_logits: jax.Array,
                                teacher_patch_logits: jax.Array, patch_center: jax.Array,
                                mask: jax.Array, *, teacher_temp: float | jax.Array,
                                student_temp: float | jax.Array = STUDENT_TEMP) -> jax.Array:
  """iBOT's masked-patch loss per image. float32 [B].

  For each global view v: the cross-entropy between the teacher's centered, sharpened patch
  distribution (unmasked view v) and the student's (masked view v) at every masked token,
  averaged over the image's masked tokens (an image with none contributes 0); then the mean
  over views.

  Args:
    student_patch_logits: [V, B, L, K], the student's patch logits of its masked global views.
    teacher_patch_logits: [V, B, L, K], the teacher's of the same views, unmasked.
    patch_center: [K], the patch center before this step's update.
    mask: [V, B, L], true where the student's token was masked.
    teacher_temp: iBOT's teacher patch temperature (0.07, warmed up from 0.04); may be traced.
    student_temp: 0.1 in iBOT.
  """
  objective.check_masked_patch_inputs(("student_patch_logits", student_patch_logits),
                                      ("teacher_patch_logits", teacher_patch_logits), mask)
  pt = teacher_probs(teacher_patch_logits, patch_center, teacher_temp)
  return objective.patch_loss_per_example(
      student_log_probs(student_patch_logits, student_temp), pt, mask)


def ibot_loss_per_example(student_cls_logits: jax.Array, teacher_cls_logits: jax.Array,
                          center: jax.Array, student_patch_logits: jax.Array,
                          teacher_patch_logits: jax.Array, patch_center: jax.Array,
                          mask: jax.Array, *, teacher_temp: float | jax.Array,
                          teacher_patch_temp: float | jax.Array,
                          student_temp: float | jax.Array = STUDENT_TEMP
                          ) -> tuple[jax.Array, jax.Array]:
  """iBOT's two losses per image, ([CLS] [B], patch [B]), unweighted.

  The [CLS] loss is DINO's (`dino_loss_per_example`, local crops included, center `center`,
  `teacher_temp`); the patch loss is `ibot_patch_loss_per_example` (center `patch_center`,
  `teacher_patch_temp`). iBOT's total is lambda1 * [CLS] + lambda2 * patch, both weights 1.
  """
  cls = dino_loss_per_example(student_cls_logits, teacher_cls_logits, center,
                              teacher_temp=teacher_temp, student_temp=student_temp)
  patch = ibot_patch_loss_per_example(student_patch_logits, teacher_patch_logits, patch_center,
                                      mask, teacher_temp=teacher_patch_temp,
                                      student_temp=student_temp)
  return cls, patch


def ibot_loss(student_cls_logits, teacher_cls_logits, center, student_patch_logits,
              teacher_patch_logits, patch_center, mask, *, teacher_temp, teacher_patch_temp,
              student_temp=STUDENT_TEMP, cls_weight=1.0, patch_weight=1.0) -> jax.Array:
  """iBOT's loss: batch means of the two per-image losses, weighted (lambda1, lambda2)."""
  cls, patch = ibot_loss_per_example(
      student_cls_logits, teacher_cls_logits, center, student_patch_logits,
      teacher_patch_logits, patch_center, mask, teacher_temp=teacher_temp,
      teacher_patch_temp=teacher_patch_temp, student_temp=student_temp)
  return cls_weight * jnp.mean(cls) + patch_weight * jnp.mean(patch)


# --------------------------------------------------------------------------- diagnostics


def teacher_entropies(probs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean entropy of each distribution, entropy of the mean distribution), in nats.

  The two collapse modes of DINO show here: a teacher that puts every image on one prototype
  has both near 0; a uniform teacher has both near log K. A healthy run has the first low
  (sharp targets) and the second high (many prototypes in use).
  """
  p = jnp.asarray(probs, jnp.float32)
  plogp = lambda q: jnp.sum(jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0), -1)
  return -jnp.mean(plogp(p)), -plogp(jnp.mean(p, axis=tuple(range(p.ndim - 1))))


# --------------------------------------------------------------------------- freezing


def _under(path, layer_name: str) -> bool:
  keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
  return layer_name in keys


def freeze_last_layer(tree, step: int | jax.Array, freeze_steps: int, *,
                      layer_name: str = "last_layer"):
  """`tree` with every leaf under a `layer_name` key set to zero while step < freeze_steps.

  DINO and iBOT hold the prototype layer still for the first epoch ("freeze_last_layer = 1"):
  they drop its gradient before the optimizer step, so PyTorch's AdamW skips it altogether —
  no update, no weight decay. Apply this to the optimizer's *updates* (after `tx.update`,
  before `optax.apply_updates`): the layer then neither moves nor decays, exactly as in the
  references. Applied to the gradients instead, optax would still decay the weights, and
  Adam's moments would stay at zero while its step count (shared by all parameters in optax,
  per parameter in PyTorch) runs on, so the bias correction would be too weak at the thaw and
  the first updates several times too large. Kept this way, the moments have tracked the
  layer's gradient all along; only they, not the weights, differ from the reference's at the
  thaw (PyTorch starts them afresh).

  `tree` is a nested dict (or any pytree with dict keys / attribute names on its paths), e.g.
  the student's parameters as the train state stores them; `step` may be traced.
  """
  if isinstance(freeze_steps, bool) or not isinstance(freeze_steps, int) or freeze_steps < 0:
    raise ValueError(f"freeze_steps={freeze_steps!r} must be an int >= 0")
  if freeze_steps == 0:
    return tree
  paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  if not any(_under(p, layer_name) for p in paths):
    raise ValueError(f"no leaf of the tree lies under a {layer_name!r} key: nothing to freeze")
  thawed = jnp.asarray(step) >= freeze_steps
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.where(thawed, x, jnp.zeros_like(x)) if _under(p, layer_name) else x,
      tree)
