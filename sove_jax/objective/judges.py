"""Anchors and judges (docs/method.md §3-§4): anchors drawn from a bank, each anchor's k nearest
bank entries found chunk by chunk (optionally split over devices), their label weights."""
from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax

from sove_jax.objective.checks import check_int, check_rank, check_smoothing

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


# --------------------------------------------------------------------------- anchors and judges


def sample_anchors(key: jax.Array, bank_size: int, num_anchors: int) -> jax.Array:
  """`num_anchors` distinct bank rows drawn uniformly without replacement: int32[K].

  Every device must pass the same key so that all devices judge against the same concepts.
  """
  bank_size = check_int("bank_size", bank_size, 1)
  num_anchors = check_int("num_anchors", num_anchors, 1)
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
  check_rank("bank", bank, 2, "[M, d]")
  check_rank("anchor_idx", anchor_idx, 1, "[K]")
  if not jnp.issubdtype(jnp.result_type(anchor_idx), jnp.integer):
    raise ValueError(f"anchor_idx must hold integers, got {jnp.result_type(anchor_idx)}")
  bank_size, _ = jnp.shape(bank)
  num_anchors = jnp.shape(anchor_idx)[0]
  if num_anchors > bank_size:
    raise ValueError(f"anchor_idx has num_anchors={num_anchors}, exceeds bank_size={bank_size}")
  if num_anchors < 2:
    raise ValueError(f"anchor_idx must hold at least 2 anchors (concepts), got {num_anchors}")
  k = check_int("num_neighbors", num_neighbors, 0)
  chunk_size = check_int("chunk_size", chunk_size, 1)
  check_smoothing(smoothing)
  if labels not in _LABELS:
    raise ValueError(f"labels={labels!r} must be one of {_LABELS}")
  if exclude_idx is None:
    exclude_idx = anchor_idx
  check_rank("exclude_idx", exclude_idx, 1, "[E]")
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
