"""Tests of sove_jax.memory: FIFO order against a NumPy ring model, wrap-around, sharding."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sove_jax import memory


class RingModel:
  """A plain NumPy FIFO ring: row (ptr + i) % M takes the i-th new row."""

  def __init__(self, rows):
    self.rows, self.ptr = np.array(rows), 0

  def push(self, batch):
    for row in batch:
      self.rows[self.ptr] = row
      self.ptr = (self.ptr + 1) % len(self.rows)


def test_init_bank_random_unit_rows():
  bank = memory.init_bank(jax.random.key(0), 64, 16)
  chex.assert_shape(bank.embeddings, (64, 16))
  chex.assert_type([bank.embeddings, bank.ptr], [jnp.float32, jnp.int32])
  np.testing.assert_allclose(np.linalg.norm(bank.embeddings, axis=1), 1.0, rtol=1e-6)
  assert int(bank.ptr) == 0
  assert np.abs(np.asarray(bank.embeddings).mean(0)).max() < 0.5  # no shared direction
  other = memory.init_bank(jax.random.key(1), 64, 16)
  assert not np.allclose(bank.embeddings, other.embeddings)
  # A pytree: it travels through jit and tree utilities like any train-state field.
  assert len(jax.tree.leaves(bank)) == 2


class EnqueueTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_fifo_order_with_wrap_around(self):
    size, dim = 10, 3
    bank = memory.init_bank(jax.random.key(2), size, dim)
    model = RingModel(bank.embeddings)
    push = self.variant(memory.enqueue)
    rng = np.random.default_rng(0)
    # Sizes chosen so writes wrap at every position class, including a full-bank write.
    for num in (4, 4, 4, 7, 10, 1, 9, 3):
      batch = rng.normal(size=(num, dim)).astype(np.float32)
      bank = push(bank, batch)
      model.push(batch)
      chex.assert_shape(bank.embeddings, (size, dim))
      np.testing.assert_array_equal(bank.embeddings, model.rows)
      assert int(bank.ptr) == model.ptr
    # The newest `size` rows, read oldest first from the pointer, are the last rows pushed.
    order = (np.arange(size) + int(bank.ptr)) % size
    np.testing.assert_array_equal(np.asarray(bank.embeddings)[order][-3:], batch)

  def test_bfloat16_bank_and_no_gradient(self):
    bank = memory.init_bank(jax.random.key(3), 8, 4, dtype=jnp.bfloat16)
    batch = jnp.ones((3, 4), jnp.float32)
    out = memory.enqueue(bank, batch)
    chex.assert_type(out.embeddings, jnp.bfloat16)
    grad = jax.grad(lambda b: jnp.sum(memory.enqueue(bank, b).embeddings.astype(jnp.float32)))(
        batch)
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("name,call", [
    ("N=9", lambda b: memory.enqueue(b, jnp.zeros((9, 4)))),
    ("d=5", lambda b: memory.enqueue(b, jnp.zeros((2, 5)))),
    ("batch", lambda b: memory.enqueue(b, jnp.zeros((2, 2, 4)))),
    ("size", lambda b: memory.init_bank(jax.random.key(0), 0, 4)),
    ("dim", lambda b: memory.init_bank(jax.random.key(0), 8, 4.0)),
])
def test_configuration_errors(name, call):
  bank = memory.init_bank(jax.random.key(0), 8, 4)
  with pytest.raises(ValueError, match=name):
    jax.eval_shape(functools.partial(call, bank))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_batch_matches_unsharded(axis_type):
  assert jax.device_count() >= 8, "tests/conftest.py should provide 8 CPU devices"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  bank = memory.init_bank(jax.random.key(4), 20, 4)
  batches = np.random.default_rng(1).normal(size=(3, 8, 4)).astype(np.float32)
  push = jax.jit(memory.enqueue, donate_argnums=0)
  expected = bank
  for batch in batches:  # 20 rows, 8 per step: the third write wraps
    expected = jax.jit(memory.enqueue)(expected, batch)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(bank, jax.P())
    for batch in batches:
      sharded = push(sharded, jax.device_put(batch, jax.P("data")))
  np.testing.assert_array_equal(sharded.embeddings, expected.embeddings)
  assert int(sharded.ptr) == int(expected.ptr) == 4
