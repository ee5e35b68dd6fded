"""The SOVE objective (docs/method.md §3-§7): anchors, judges, concept log-probabilities, losses.

Importable alone (`from sove_jax import objective`); depends on JAX and Flax only. Everything is
a pure function of arrays. Configuration mistakes (sizes, ranks, option names) raise `ValueError`
naming the argument while tracing, before anything runs.

Memory is the design constraint at paper sizes (bank 65536 x 256, K = 8192 anchors, J = 9
judges, 4 tasks):
- the anchor-by-bank similarity (K x M, 2 GiB) is computed `chunk_size` anchors at a time and,
  with `anchor_sharding`, split over devices;
- the label matrix Y (K*J x K, docs/method.md §4) is never built: `P` is a sum over each
  concept's J judges (§5; why: §11);
- the embedding-by-judge logits are computed `chunk_size` concepts at a time, forward and in a
  custom backward pass that recomputes them, so no [N, K*J] array is ever stored, and the only
  [N, K] arrays are the log-probabilities and their cotangent.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

__all__ = [
    "Judges",
    "sample_anchors",
    "select_judges",
    "concept_log_probs",
    "class_loss",
    "class_loss_per_example",
    "patch_loss",
    "patch_loss_per_example",
    "koleo_loss_per_example",
]

_LABELS = ("soft", "onehot")


@flax.struct.dataclass
class Judges:
  """The judges of K concepts, J per concept (anchor first); a pytree.

  vectors: f32[K, J, d], judge embeddings; `vectors[:, 0]` are the anchors.
  weights: f32[K, J], each judge's label weight for its own concept; the label of judge (i, j)
    gives every other concept `(1 - weights[i, j]) / (K - 1)` (docs/method.md §4).
  """
  vectors: jax.Array
  weights: jax.Array

  @property
  def num_concepts(self) -> int:
    return self.vectors.shape[0]

  @property
  def judges_per_concept(self) -> int:
    return self.vectors.shape[1]


# --------------------------------------------------------------------------- validation helpers


def _check_int(name: str, value: Any, minimum: int) -> int:
  """Sizes must be static Python (or NumPy) ints: they fix array shapes at trace time."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be a Python int (a static size), got {value!r}")
  value = int(value)
  if value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}")
  return value


def _check_rank(name: str, x: Any, rank: int, layout: str) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {jnp.shape(x)}")


def check_masked_patch_inputs(student: tuple[str, Any], teacher: tuple[str, Any],
                              mask: Any) -> None:
  """The masked-patch losses' inputs (SOVE's here, iBOT's in prototypes.py): a student and a
  teacher array [V, B, L, K] of one shape, each given as (name, array), and `mask` [V, B, L]."""
  (student_name, s), (teacher_name, t) = student, teacher
  _check_rank(student_name, s, 4, "[V, B, L, K]")
  _check_rank(teacher_name, t, 4, "[V, B, L, K]")
  _check_rank("mask", mask, 3, "[V, B, L]")
  if jnp.shape(t) != jnp.shape(s):
    raise ValueError(f"{teacher_name} has shape {jnp.shape(t)}, expected {jnp.shape(s)} "
                     f"({student_name})")
  if jnp.shape(mask) != jnp.shape(s)[:3]:
    raise ValueError(f"mask has shape {jnp.shape(mask)}, expected {jnp.shape(s)[:3]} "
                     f"({student_name} [V, B, L])")


def _check_smoothing(smoothing: Any) -> None:
  if isinstance(smoothing, (int, float)) and not 0.0 <= smoothing <= 1.0:
    raise ValueError(f"smoothing={smoothing} must lie in [0, 1]")


# --------------------------------------------------------------------------- anchors and judges


def sample_anchors(key: jax.Array, bank_size: int, num_anchors: int) -> jax.Array:
  """`num_anchors` distinct bank rows drawn uniformly without replacement: int32[K].

  Every device must pass the same key so that all devices judge against the same concepts.
  """
  bank_size = _check_int("bank_size", bank_size, 1)
  num_anchors = _check_int("num_anchors", num_anchors, 1)
  if num_anchors > bank_size:
    raise ValueError(f"num_anchors={num_anchors} exceeds bank_size={bank_size}")
  # A uniformly random permutation's prefix is a uniformly random ordered subset.
  return jax.random.permutation(key, bank_size)[:num_anchors].astype(jnp.int32)


def _search_mesh(sharding: Any) -> tuple[Any, Any]:
  """(mesh, mesh axes splitting the anchor rows) of `anchor_sharding`; mesh None for a bare spec.

  A bare spec uses the mesh set with `jax.set_mesh`.
  """
  if isinstance(sharding, jax.sharding.NamedSharding):
    mesh, spec = sharding.mesh, sharding.spec
  elif isinstance(sharding, jax.sharding.PartitionSpec):
    mesh, spec = None, sharding
    if jax.sharding.get_abstract_mesh().empty:
      raise ValueError(f"anchor_sharding={sharding} is a bare spec but no mesh is set "
                       "(use jax.set_mesh or a jax.NamedSharding)")
  else:
    raise ValueError("anchor_sharding must be a jax.NamedSharding or a jax.P, "
                     f"got {sharding!r}")
  if len(spec) > 2 or (len(spec) == 2 and spec[1] is not None):
    raise ValueError(f"anchor_sharding={sharding} may split only the rows of [chunk, d]")
  if len(spec) == 0 or spec[0] is None:
    return mesh, ()
  return mesh, (spec[0] if isinstance(spec[0], tuple) else (spec[0],))


def _has_explicit_axes(mesh) -> bool:
  return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _replicate(anchor_sharding, arrays):
  """Every device judges with all concepts: pin the judges replicated on Auto meshes (the
  partitioner could otherwise leave them split like the search); Explicit meshes already are."""
  mesh, _ = _search_mesh(anchor_sharding)
  if _has_explicit_axes(mesh or jax.sharding.get_abstract_mesh()):
    return arrays
  spec = jax.P() if mesh is None else jax.sharding.NamedSharding(mesh, jax.P())
  return tuple(lax.with_sharding_constraint(x, spec) for x in arrays)


def _neighbor_search(bank, anchors, excluded, k, chunk_size, anchor_sharding):
  """Top-k bank rows (not excluded) per anchor, `chunk` anchors at a time: (sims, idx) [K, k].

  The [chunk, M] similarity is the only large temporary. With `anchor_sharding`, each chunk's
  rows are split over the named mesh axes with `jax.shard_map`: every device runs the matmul
  and top_k on its rows only (the SPMD partitioner would gather the similarity before a
  top_k), then the small [chunk, k] results are all-gathered so every device holds all judges.
  """
  num_anchors, dim = anchors.shape
  num_chunks = -(-num_anchors // chunk_size)
  chunk = -(-num_anchors // num_chunks)  # balanced chunks: little padding
  if anchor_sharding is not None:
    mesh, axes = _search_mesh(anchor_sharding)
    sizes = (mesh or jax.sharding.get_abstract_mesh()).shape
    shards = math.prod(sizes[a] for a in axes)
    chunk = -(-chunk // shards) * shards
  padded = num_chunks * chunk
  if padded > num_anchors:  # pad with a real anchor; its results are dropped below
    fill = jnp.broadcast_to(anchors[:1], (padded - num_anchors, dim))
    anchors = jnp.concatenate([anchors, fill], axis=0)

  def local_top_k(rows, bank, excluded):
    sims = rows @ bank.T
    sims = jnp.where(excluded[None, :], -jnp.inf, sims)
    return lax.top_k(sims, k)

  search = local_top_k
  if anchor_sharding is not None and axes:
    def local_search(rows, bank, excluded):
      top = local_top_k(rows, bank, excluded)
      return tuple(lax.all_gather(x, axes, axis=0, tiled=True) for x in top)

    mesh_kw = {} if mesh is None else {"mesh": mesh}
    # The all-gathered results are equal on every device; check_vma cannot infer that from
    # all_gather, so it is off.
    sharded_search = jax.shard_map(local_search, in_specs=(jax.P(axes), jax.P(), jax.P()),
                                   out_specs=(jax.P(), jax.P()), check_vma=False, **mesh_kw)
    if _has_explicit_axes(mesh or jax.sharding.get_abstract_mesh()):
      # Explicit axes: shard_map wants its inputs laid out as in_specs say already.
      place = lambda x, spec: jax.sharding.reshard(
          x, spec if mesh is None else jax.sharding.NamedSharding(mesh, spec))
      bank, excluded = place(bank, jax.P()), place(excluded, jax.P())
      search = lambda rows, bank, excluded: sharded_search(place(rows, jax.P(axes)), bank,
                                                           excluded)
    else:
      search = sharded_search

  if num_chunks == 1:
    top_sims, top_idx = search(anchors, bank, excluded)
  else:
    top_sims, top_idx = lax.map(lambda rows: search(rows, bank, excluded),
                                anchors.reshape(num_chunks, chunk, dim))
    top_sims = top_sims.reshape(padded, k)
    top_idx = top_idx.reshape(padded, k)
  return top_sims[:num_anchors], top_idx[:num_anchors]


def select_judges(bank: jax.Array,
                  anchor_idx: jax.Array,
                  num_neighbors: int,
                  smoothing: float = 0.1,
                  labels: str = "soft",
                  *,
                  exclude_idx: jax.Array | None = None,
                  chunk_size: int = 1024,
                  anchor_sharding: Any = None) -> Judges:
  """Judges of one task: each anchor plus its `num_neighbors` nearest bank rows
  (docs/method.md §3).

  Args:
    bank: [M, d] unit rows; not differentiated (stop_gradient).
    anchor_idx: int[K] distinct bank rows, the concepts' anchors.
    num_neighbors: k; J = k + 1. 0 gives the anchor alone (no search runs).
    smoothing: the anchor's weight is `1 - smoothing`.
    labels: "soft" (neighbor weight = clip(similarity to its anchor, 0, 1)) or "onehot"
      (every judge `1 - smoothing`).
    exclude_idx: int[E] bank rows that may not be neighbors; default `anchor_idx`. The official
      setting draws 64 anchors, keeps 32 as concepts and excludes all 64.
    chunk_size: anchors per similarity chunk: peak memory ~ chunk_size x M floats.
    anchor_sharding: optional jax.NamedSharding, or jax.P with a mesh set, for each chunk's
      [chunk, d] anchor rows, e.g. P("data"): under jit on a mesh each device then runs the
      similarity and top_k for its share of the rows (chunks are padded to a multiple of the
      shard count); the [K, k] results are all-gathered. Mesh axes not named repeat the work.

  Returns:
    Judges(vectors f32[K, J, d], weights f32[K, J]), replicated when sharded.
  """
  _check_rank("bank", bank, 2, "[M, d]")
  _check_rank("anchor_idx", anchor_idx, 1, "[K]")
  if not jnp.issubdtype(jnp.result_type(anchor_idx), jnp.integer):
    raise ValueError(f"anchor_idx must hold integers, got {jnp.result_type(anchor_idx)}")
  bank_size, _ = jnp.shape(bank)
  num_anchors = jnp.shape(anchor_idx)[0]
  if num_anchors > bank_size:
    raise ValueError(f"anchor_idx has num_anchors={num_anchors}, exceeds bank_size={bank_size}")
  if num_anchors < 2:
    raise ValueError(f"anchor_idx must hold at least 2 anchors (concepts), got {num_anchors}")
  k = _check_int("num_neighbors", num_neighbors, 0)
  chunk_size = _check_int("chunk_size", chunk_size, 1)
  _check_smoothing(smoothing)
  if labels not in _LABELS:
    raise ValueError(f"labels={labels!r} must be one of {_LABELS}")
  if exclude_idx is None:
    exclude_idx = anchor_idx
  _check_rank("exclude_idx", exclude_idx, 1, "[E]")
  num_excluded = jnp.shape(exclude_idx)[0]
  if k > bank_size - num_excluded:
    raise ValueError(
        f"num_neighbors={k} exceeds the {bank_size - num_excluded} bank rows that are not "
        f"excluded (bank_size={bank_size}, exclude_idx holds {num_excluded})")

  if anchor_sharding is not None:
    _search_mesh(anchor_sharding)
  return _select_judges(bank, anchor_idx, exclude_idx, smoothing, k=k, labels=labels,
                        chunk_size=chunk_size, anchor_sharding=anchor_sharding)


@functools.partial(jax.jit, static_argnames=("k", "labels", "chunk_size", "anchor_sharding"))
def _select_judges(bank, anchor_idx, exclude_idx, smoothing, *, k, labels, chunk_size,
                   anchor_sharding):
  """select_judges after validation; jitted so that eager calls run compiled too."""
  bank_size, _ = bank.shape
  num_anchors = anchor_idx.shape[0]
  bank = lax.stop_gradient(jnp.asarray(bank, jnp.float32))
  anchor_weight = jnp.asarray(1.0 - jnp.asarray(smoothing, jnp.float32), jnp.float32)
  anchors = bank[anchor_idx]
  anchor_w = jnp.broadcast_to(anchor_weight, (num_anchors, 1))
  if k == 0:
    return Judges(vectors=anchors[:, None, :], weights=anchor_w)

  excluded = jnp.zeros((bank_size,), jnp.bool_).at[exclude_idx].set(True)
  sims, nbr = _neighbor_search(bank, anchors, excluded, k, chunk_size, anchor_sharding)
  vectors = jnp.concatenate([anchors[:, None, :], bank[nbr]], axis=1)
  if labels == "soft":
    nbr_w = jnp.clip(sims, 0.0, 1.0)
  else:
    nbr_w = jnp.broadcast_to(anchor_weight, (num_anchors, k))
  weights = jnp.concatenate([anchor_w, nbr_w], axis=1)
  if anchor_sharding is not None:
    vectors, weights = _replicate(anchor_sharding, (vectors, weights))
  return Judges(vectors=vectors, weights=weights)


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
  _check_rank("judges.vectors", judges.vectors, 3, "[K, J, d]")
  _check_rank("judges.weights", judges.weights, 2, "[K, J]")
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
  chunk_size = _check_int("chunk_size", chunk_size, 1)

  embeddings = jnp.asarray(embeddings)
  if not jnp.issubdtype(embeddings.dtype, jnp.floating):
    raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
  vectors = lax.stop_gradient(jnp.asarray(judges.vectors, jnp.float32))
  weights = lax.stop_gradient(jnp.asarray(judges.weights, jnp.float32))
  tau = lax.stop_gradient(jnp.asarray(temperature, jnp.float32))
  return _concept_log_probs(chunk_size, embeddings, vectors, weights, tau)


# --------------------------------------------------------------------------- losses


def class_loss_per_example(student_log_probs: jax.Array, teacher_probs: jax.Array) -> jax.Array:
  """The paper's eq. 2 per image: the mean over (teacher view v, student view u != v) of the
  cross-entropy (docs/method.md §6). [B].

  Teacher views are the first Vt student views; teacher probabilities carry no gradient.
  """
  _check_rank("student_log_probs", student_log_probs, 3, "[Vs, B, K]")
  _check_rank("teacher_probs", teacher_probs, 3, "[Vt, B, K]")
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
  _check_rank("embeddings", embeddings, 3, "[V, B, d]")
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
