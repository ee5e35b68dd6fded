"""FIFO memory banks (docs/method.md §2): the class bank E_C and the patch bank E_P.

A bank is part of the train state and of every checkpoint: a pytree of its embeddings and a
write pointer. `enqueue` writes a batch at the pointer with `dynamic_update_slice`, wrapping
at the end, so the bank always holds the M most recent rows in FIFO order. It is a pure
function and works under `jax.jit` with the batch sharded over a mesh.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

__all__ = ["Bank", "init_bank", "enqueue"]


@flax.struct.dataclass
class Bank:
  """embeddings: [M, d] rows (oldest overwritten first); ptr: int32[] next row to write."""
  embeddings: jax.Array
  ptr: jax.Array

  @property
  def size(self) -> int:
    return self.embeddings.shape[0]

  @property
  def dim(self) -> int:
    return self.embeddings.shape[1]


def _check_size(name, value, minimum=1):
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be a Python int (a static size), got {value!r}")
  if value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}")
  return int(value)


def init_bank(key: jax.Array, size: int, dim: int, dtype=jnp.float32) -> Bank:
  """A bank of `size` random unit rows, pointer 0 (banks start as random unit vectors,
  docs/method.md §2)."""
  size = _check_size("size", size)
  dim = _check_size("dim", dim)
  rows = jax.random.normal(key, (size, dim), jnp.float32)
  rows = rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)
  return Bank(embeddings=rows.astype(dtype), ptr=jnp.zeros((), jnp.int32))


def enqueue(bank: Bank, batch: jax.Array) -> Bank:
  """Writes `batch` [N, d] at the pointer, wrapping at the end; returns the advanced bank.

  `dynamic_update_slice` clamps its start, so a write that would run past the end is split in
  two blocks of N rows: block 1 ends at min(ptr + N, M) and keeps its old rows before ptr;
  block 2 starts at row 0 and takes the rows that wrapped, keeping the others. Both are plain
  N-row slice updates (in place when the bank buffer is donated). Not differentiated.
  """
  if not isinstance(bank, Bank):
    raise ValueError(f"bank must be a Bank, got {type(bank).__name__}")
  if jnp.ndim(batch) != 2:
    raise ValueError(f"batch must have rank 2 [N, d], got shape {jnp.shape(batch)}")
  size, dim = bank.embeddings.shape
  num, batch_dim = jnp.shape(batch)
  if batch_dim != dim:
    raise ValueError(f"batch has d={batch_dim}, the bank holds d={dim}")
  if num > size:
    raise ValueError(f"batch has N={num} rows, exceeds bank size M={size}")
  if num == 0:
    return bank
  return _enqueue(bank, batch)


@jax.jit
def _enqueue(bank: Bank, batch: jax.Array) -> Bank:
  """enqueue after validation; jitted so that eager calls run compiled too."""
  size, _ = bank.embeddings.shape
  num = batch.shape[0]
  rows = lax.stop_gradient(jnp.asarray(batch)).astype(bank.embeddings.dtype)
  mesh = jax.typeof(rows).sharding.mesh
  if not mesh.empty and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    # Every device writes every row of its bank copy: gather a sharded batch explicitly (on
    # Auto meshes the partitioner inserts the same all-gather).
    rows = jax.sharding.reshard(rows, jax.P())
  ptr = jnp.asarray(bank.ptr, jnp.int32) % size
  offsets = jnp.arange(num, dtype=jnp.int32)

  # Block 1: bank rows [start, start + N), start = min(ptr, M - N); row r takes batch[r - ptr].
  start = jnp.minimum(ptr, size - num)
  src = start + offsets - ptr
  old = lax.dynamic_slice_in_dim(bank.embeddings, start, num, axis=0)
  new = jnp.where((src >= 0)[:, None], rows[jnp.clip(src, 0, num - 1)], old)
  emb = lax.dynamic_update_slice_in_dim(bank.embeddings, new, start, axis=0)

  # Block 2: bank rows [0, N); row r takes batch[M - ptr + r] when that index is < N (wrapped).
  src = size - ptr + offsets
  old = lax.dynamic_slice_in_dim(emb, 0, num, axis=0)
  new = jnp.where((src < num)[:, None], rows[jnp.clip(src, 0, num - 1)], old)
  emb = lax.dynamic_update_slice_in_dim(emb, new, 0, axis=0)

  return Bank(embeddings=emb, ptr=(ptr + num) % size)
