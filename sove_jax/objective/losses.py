"""The losses (docs/method.md §6-§7): the [CLS] loss across views, the masked-patch loss, and the
KoLeo uniformity term; each per example, and as the batch mean."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sove_jax.objective.checks import check_masked_patch_inputs, check_rank


def class_loss_per_example(student_log_probs: jax.Array, teacher_probs: jax.Array) -> jax.Array:
  """The paper's eq. 2 per image: the mean over (teacher view v, student view u != v) of the
  cross-entropy (docs/method.md §6). [B].

  Teacher views are the first Vt student views; teacher probabilities carry no gradient.
  """
  check_rank("student_log_probs", student_log_probs, 3, "[Vs, B, K]")
  check_rank("teacher_probs", teacher_probs, 3, "[Vt, B, K]")
  num_s, batch, num_c = jnp.shape(student_log_probs)
  num_t = jnp.shape(teacher_probs)[0]
  if jnp.shape(teacher_probs)[1:] != (batch, num_c):
    raise ValueError(f"teacher_probs has shape {jnp.shape(teacher_probs)}; [B, K] must match "
                     f"student_log_probs {jnp.shape(student_log_probs)}")
  if num_t > num_s:
    raise ValueError(f"teacher_probs has Vt={num_t} views, more than student_log_probs' "
                     f"Vs={num_s}: teacher views are the first Vt student views")
  num_pairs = num_t * num_s - num_t
  if num_pairs < 1:
    raise ValueError("student_log_probs needs a view other than the teacher's (no pairs)")
  log_ps = jnp.asarray(student_log_probs, jnp.float32)
  pt = lax.stop_gradient(jnp.asarray(teacher_probs, jnp.float32))
  # All pairs, minus the Vt pairs u == v; elementwise products and sums over c only, so
  # nothing of size [Vt, Vs, B, K] and no transposed copy of the log-probs is formed. All terms
  # share one sign, so the difference loses no precision.
  all_pairs = jnp.sum(jnp.sum(pt, axis=0) * jnp.sum(log_ps, axis=0), axis=-1)
  same_view = jnp.sum(pt * log_ps[:num_t], axis=(0, 2))
  return (same_view - all_pairs) / num_pairs


def class_loss(student_log_probs: jax.Array, teacher_probs: jax.Array) -> jax.Array:
  """Paper eq. 2 (docs/method.md §6) for one task: the batch mean of `class_loss_per_example`."""
  return jnp.mean(class_loss_per_example(student_log_probs, teacher_probs))


def patch_loss_per_example(student_log_probs: jax.Array,
                           teacher_probs: jax.Array,
                           mask: jax.Array) -> jax.Array:
  """The paper's eq. 4 per image: masked-patch cross-entropy, averaged per view over masked
  patches (docs/method.md §7). [B]."""
  check_masked_patch_inputs(("student_log_probs", student_log_probs),
                            ("teacher_probs", teacher_probs), mask)
  log_ps = jnp.asarray(student_log_probs, jnp.float32)
  pt = lax.stop_gradient(jnp.asarray(teacher_probs, jnp.float32))
  m = lax.stop_gradient(jnp.asarray(mask).astype(jnp.float32))
  ce = -jnp.einsum("vblc,vblc->vbl", pt, log_ps)
  per_view = jnp.sum(m * ce, axis=-1) / jnp.maximum(1.0, jnp.sum(m, axis=-1))
  return jnp.mean(per_view, axis=0)


def patch_loss(student_log_probs: jax.Array, teacher_probs: jax.Array,
               mask: jax.Array) -> jax.Array:
  """Paper eq. 4 (docs/method.md §7) for one task: the batch mean of `patch_loss_per_example`."""
  return jnp.mean(patch_loss_per_example(student_log_probs, teacher_probs, mask))


def koleo_loss_per_example(embeddings: jax.Array, eps: float = 1e-8) -> jax.Array:
  """The KoLeo uniformity term per image (Sablayrolles et al., 2019, "Spreading vectors for
  similarity search"; DINOv2's KoLeo, the authors' `koleo_loss_weight`): minus the log distance
  from each L2-normalized embedding to its nearest other embedding of the same view, averaged
  over the views. [B].

  It is the Kozachenko-Leonenko entropy estimate's data term: lowering it spreads the batch over
  the sphere, against embeddings that crowd into a narrow cone. Each view's batch is one set (the
  authors: each global view's chunk of the batch; here the global batch, whatever the devices).
  The neighbor is chosen without gradient and the distance differentiated at both ends, as
  DINOv2's; a distance below `eps` counts as `eps` and passes no gradient (a repeated embedding
  gives -log(2 eps), not an infinite gradient).

  Args:
    embeddings: [V, B, d], B >= 2 (normalized here; unit vectors pass unchanged).
    eps: floor of the norms and the distances.
  """
  check_rank("embeddings", embeddings, 3, "[V, B, d]")
  if jnp.shape(embeddings)[1] < 2:
    raise ValueError(f"embeddings has shape {jnp.shape(embeddings)}: KoLeo needs B >= 2 images "
                     "per view (a nearest neighbor)")
  x = jnp.asarray(embeddings, jnp.float32)
  x = x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)), eps)
  sim = jnp.einsum("vbd,vcd->vbc", x, x, precision=lax.Precision.HIGHEST)
  batch = x.shape[1]
  sim = jnp.where(jnp.eye(batch, dtype=bool), -jnp.inf, lax.stop_gradient(sim))
  neighbor = jnp.take_along_axis(x, jnp.argmax(sim, axis=-1)[..., None], axis=1)   # [V, B, d]
  squared = jnp.sum(jnp.square(x - neighbor), axis=-1)
  distance = jnp.sqrt(jnp.maximum(squared, eps * eps))
  return -jnp.mean(jnp.log(distance + eps), axis=0)
