"""Concept log-probabilities (docs/method.md §5): each embedding's soft vote over the K concepts,
computed `chunk_size` concepts at a time forward and in a custom backward pass, so that no
[N, K*J] array is stored."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from sove_jax.objective.checks import check_int, check_rank
from sove_jax.objective.judges import Judges

# --------------------------------------------------------------------------- concept probabilities
#
# With p = softmax(z) over all K*J judges, P[c] = sum_{j in c} p_j w_j + sum_{j not in c} p_j r_j,
# r_j = (1 - w_j) / (K - 1): two non-negative parts, so no cancellation even when w_j = 0. In logs:
#   log P[c] = logaddexp(log sum_{c' != c} R[c'], log W[c]),
#   R[c] = sum_{j in c} p_j r_j,  W[c] = sum_{j in c} p_j w_j,
# each a logsumexp over the concept's J judges, normalized by the logsumexp over all judges.


def _log_label_weights(weights):
  """log w and log r = log((1 - w) / (K - 1)) per judge; -inf where a weight is 0."""
  num_concepts = weights.shape[0]
  return jnp.log(weights), jnp.log1p(-weights) - math.log(num_concepts - 1)


def _chunk_bounds(total, chunk):
  """(number of full chunks, chunk, tail): the loops run full chunks, then one static tail."""
  chunk = min(chunk, total)
  return total // chunk, chunk, total % chunk


def _judge_logits(u, vectors, tau, start, size):
  """z = <u, D>/tau for concepts [start, start + size): [..., size, J] float32."""
  block = lax.dynamic_slice_in_dim(vectors, start, size, axis=0)
  return jnp.einsum("...d,kjd->...kj", u, block, preferred_element_type=jnp.float32) / tau


def _loop_chunks(num_concepts, chunk_size, body, carry):
  """carry = body(carry, start, size) over concept chunks: a loop of full chunks, then a tail.

  Sizes are static, so every chunk is a fixed-shape block; the loop keeps one chunk's
  temporaries alive at a time.
  """
  num_full, chunk, tail = _chunk_bounds(num_concepts, chunk_size)
  if num_full == 1:
    carry = body(carry, 0, chunk)
  else:
    carry = lax.fori_loop(0, num_full, lambda i, c: body(c, i * chunk, chunk), carry)
  if tail:
    carry = body(carry, num_full * chunk, tail)
  return carry


@functools.partial(jax.jit, static_argnums=0)
def _clp_forward(chunk_size, u, vectors, weights, tau):
  """Log concept probabilities [..., K] plus the per-embedding log partition function.

  Two passes over concept chunks, so the output is the only [..., K] array: the first keeps
  per-embedding running scalars (the log partition function; the largest log R with the
  logsumexp of all the others, which make log sum_{c' != c} R[c'] exact for every c); the
  second recomputes each chunk's logits and writes its log P. The extra logits matmul is
  cheap next to the judge search and saves two [..., K] buffers per call.
  """
  num_concepts = vectors.shape[0]
  log_w, log_r = _log_label_weights(weights)

  def chunk_masses(start, size):
    """Per-concept log R and log W of a chunk, unnormalized, and its logits."""
    z = _judge_logits(u, vectors, tau, start, size)
    lr = jax.nn.logsumexp(z + lax.dynamic_slice_in_dim(log_r, start, size, axis=0), axis=-1)
    lw = jax.nn.logsumexp(z + lax.dynamic_slice_in_dim(log_w, start, size, axis=0), axis=-1)
    return z, lr, lw

  def scalars(carry, start, size):
    log_norm, best, arg_best, rest = carry
    z, lr, _ = chunk_masses(start, size)
    log_norm = jnp.logaddexp(
        log_norm, jax.nn.logsumexp(jax.nn.logsumexp(z, axis=-1), axis=-1, keepdims=True))
    c_arg = jnp.argmax(lr, axis=-1, keepdims=True)
    c_best = jnp.max(lr, axis=-1, keepdims=True)
    c_rest = jax.nn.logsumexp(jnp.where(jnp.arange(size) == c_arg, -jnp.inf, lr), axis=-1,
                              keepdims=True)
    rest = jnp.logaddexp(jnp.logaddexp(rest, c_rest), jnp.minimum(best, c_best))
    arg_best = jnp.where(c_best > best, c_arg + start, arg_best)
    return log_norm, jnp.maximum(best, c_best), arg_best, rest

  # Built from u so that they carry u's batch sharding (needed with explicit mesh axes).
  row = jnp.zeros_like(u[..., :1], jnp.float32)
  log_norm, best, arg_best, rest = _loop_chunks(
      num_concepts, chunk_size, scalars,
      (row - jnp.inf, row - jnp.inf, row.astype(jnp.int32), row - jnp.inf))
  total = jnp.logaddexp(best, rest)                      # log sum_c R[c]

  def log_probs(out, start, size):
    _, lr, lw = chunk_masses(start, size)
    # total - R[c] is exact except for the largest R, whose value is `rest`: every other R
    # is at most half the total, so the subtraction loses nothing.
    is_best = (start + jnp.arange(size)) == arg_best
    frac = jnp.where(is_best | ~jnp.isfinite(total), -jnp.inf, lr - total)
    log_others = jnp.where(is_best, rest, total + jnp.log1p(-jnp.exp(frac)))
    log_p = jnp.logaddexp(log_others, lw) - log_norm
    return lax.dynamic_update_slice_in_dim(out, log_p, start, axis=-1)

  log_p = _loop_chunks(num_concepts, chunk_size, log_probs,
                       row + jnp.zeros((num_concepts,), jnp.float32))
  return log_p, log_norm


def _clp_fwd(chunk_size, u, vectors, weights, tau):
  log_p, log_norm = _clp_forward(chunk_size, u.astype(jnp.float32), vectors, weights, tau)
  return log_p, (u, vectors, weights, tau, log_norm, log_p)


@functools.partial(jax.jit, static_argnums=0)
def _clp_bwd(chunk_size, residuals, g):
  """d/du of sum(g * log P), with every exponential bounded by 1.

  dL/dz_j = sum_c g_c p_j Y[j, c] / P_c - p_j sum_c g_c. Each ratio p_j Y[j, c] / P_c <= 1; for
  j in concept c the off-concept part is p_j r_j * sum_{c' != c} g_c' / P_c', written as
  exp(log p_j r_j - m_c) * sum_{c' != c} g_c' exp(m_c - log P_c') with m_c = min_{c' != c}
  log P_c' >= log p_j r_j, so neither factor overflows even when some P_c underflows float32.
  Only per-embedding scalars are precomputed; [..., K] terms are formed chunk by chunk.
  """
  u, vectors, weights, tau, log_norm, log_p = residuals
  num_concepts = vectors.shape[0]
  u32 = u.astype(jnp.float32)
  g = g.astype(jnp.float32)
  log_w, log_r = _log_label_weights(weights)

  # Per-embedding scalars, each from a pass over concept chunks, so that no [..., K] temporary
  # beyond g and log P exists: the smallest two log P (m1 at arg_min, m2), the sum of g, and
  # the two scaled sums of g that the off-concept term needs.
  row = jnp.zeros_like(log_p[..., :1])
  cut = lambda x, start, size: lax.dynamic_slice_in_dim(x, start, size, axis=-1)

  def smallest_two(carry, start, size):
    m1, m2, arg_min, g_sum = carry
    lp = cut(log_p, start, size)
    c_arg = jnp.argmin(lp, axis=-1, keepdims=True)
    c1 = jnp.min(lp, axis=-1, keepdims=True)
    c2 = jnp.min(jnp.where(jnp.arange(size) == c_arg, jnp.inf, lp), axis=-1, keepdims=True)
    return (jnp.minimum(m1, c1),
            jnp.minimum(jnp.maximum(m1, c1), jnp.minimum(m2, c2)),
            jnp.where(c1 < m1, c_arg + start, arg_min),
            g_sum + jnp.sum(cut(g, start, size), axis=-1, keepdims=True))

  m1, m2, arg_min, g_sum = _loop_chunks(
      num_concepts, chunk_size, smallest_two,
      (row + jnp.inf, row + jnp.inf, row.astype(jnp.int32), row))

  def scaled_sums(carry, start, size):
    total, without_min = carry
    lp, g_blk = cut(log_p, start, size), cut(g, start, size)
    is_min = (start + jnp.arange(size)) == arg_min
    total = total + jnp.sum(g_blk * jnp.exp(m1 - lp), axis=-1, keepdims=True)
    without_min = without_min + jnp.sum(
        g_blk * jnp.exp(jnp.where(is_min, -jnp.inf, m2 - lp)), axis=-1, keepdims=True)
    return total, without_min

  total, without_min = _loop_chunks(num_concepts, chunk_size, scaled_sums, (row, row))

  def body(du, start, size):
    g_blk, lp_blk = cut(g, start, size), cut(log_p, start, size)
    blk_min = (start + jnp.arange(size)) == arg_min
    m_other = jnp.where(blk_min, m2, m1)                 # min over c' != c of log P_c'
    s_other = jnp.where(blk_min, without_min, total - g_blk * jnp.exp(m1 - lp_blk))
    z = _judge_logits(u32, vectors, tau, start, size)
    lp = z - log_norm[..., None]                         # log p_j
    lw_blk = lax.dynamic_slice_in_dim(log_w, start, size, axis=0)
    lr_blk = lax.dynamic_slice_in_dim(log_r, start, size, axis=0)
    dz = (jnp.exp(lp + lr_blk - m_other[..., None]) * s_other[..., None]
          + g_blk[..., None] * jnp.exp(lp + lw_blk - lp_blk[..., None])
          - jnp.exp(lp) * g_sum[..., None])
    block = lax.dynamic_slice_in_dim(vectors, start, size, axis=0)
    return du + jnp.einsum("...kj,kjd->...d", dz, block, preferred_element_type=jnp.float32)

  du = _loop_chunks(num_concepts, chunk_size, body, jnp.zeros_like(u32))
  return (du / tau).astype(u.dtype), None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _concept_log_probs(chunk_size, u, vectors, weights, tau):
  return _clp_forward(chunk_size, u.astype(jnp.float32), vectors, weights, tau)[0]


_concept_log_probs.defvjp(_clp_fwd, _clp_bwd)


def concept_log_probs(embeddings: jax.Array,
                      judges: Judges,
                      temperature: float | jax.Array,
                      *,
                      chunk_size: int = 512) -> jax.Array:
  """log P[..., c]: softmax over all K*J judges, summed per concept with labels Y
  (docs/method.md §5).

  Computed in log space in float32 (inputs may be bf16), finite for every valid input, also
  where P underflows (smoothing 0, one-hot labels, small temperatures). Y is never built: each
  concept's J judges are reduced directly. Gradients flow to `embeddings` only; judges and
  temperature are constants. `chunk_size` concepts are processed at a time: the logits
  [..., chunk_size, J] are computed twice forward and once more in a custom backward pass,
  never stored, so the memory is the [..., K] output (kept for the backward pass) plus one
  chunk.

  Args:
    embeddings: [..., d] unit vectors.
    judges: Judges with vectors [K, J, d], weights [K, J] (K >= 2).
    temperature: positive scalar (may be traced, e.g. a warm-up schedule).
    chunk_size: concepts per chunk.

  Returns:
    float32 [..., K].
  """
  if not isinstance(judges, Judges):
    raise ValueError(f"judges must be a Judges, got {type(judges).__name__}")
  check_rank("judges.vectors", judges.vectors, 3, "[K, J, d]")
  check_rank("judges.weights", judges.weights, 2, "[K, J]")
  num_concepts, num_judges, dim = jnp.shape(judges.vectors)
  if jnp.shape(judges.weights) != (num_concepts, num_judges):
    raise ValueError(f"judges.weights has shape {jnp.shape(judges.weights)}, expected "
                     f"{(num_concepts, num_judges)} to match judges.vectors")
  if num_concepts < 2:
    raise ValueError(f"judges must hold at least 2 concepts, got {num_concepts}")
  if jnp.ndim(embeddings) < 1 or jnp.shape(embeddings)[-1] != dim:
    raise ValueError(f"embeddings has shape {jnp.shape(embeddings)}; its last dim must be "
                     f"d={dim} (judges.vectors)")
  if jnp.ndim(temperature) != 0:
    raise ValueError(f"temperature must be a scalar, got shape {jnp.shape(temperature)}")
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"temperature={temperature} must be > 0")
  chunk_size = check_int("chunk_size", chunk_size, 1)

  embeddings = jnp.asarray(embeddings)
  if not jnp.issubdtype(embeddings.dtype, jnp.floating):
    raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
  vectors = lax.stop_gradient(jnp.asarray(judges.vectors, jnp.float32))
  weights = lax.stop_gradient(jnp.asarray(judges.weights, jnp.float32))
  tau = lax.stop_gradient(jnp.asarray(temperature, jnp.float32))
  return _concept_log_probs(chunk_size, embeddings, vectors, weights, tau)
