"""The KoLeo uniformity term (`objective.koleo_loss_per_example`, `sove.koleo_weight`).

Checked against a float64 NumPy reference written from the definition (Sablayrolles et al.,
2019; DINOv2's KoLeo): per view, each normalized embedding's nearest other embedding by an
explicit double loop, minus the log of their distance, averaged over views. Its gradient is
checked against central differences of that reference; in the step, the term enters the loss
with its weight and moves the student, and at weight 0 nothing of it is computed.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sove_jax import configuration, objective
from test_methods import _config, _setup
from batches import synthetic_batch


def ref_koleo(x, eps=1e-8):
  """[V, B, d] -> [B], float64, by the definition."""
  x = np.asarray(x, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
  views, batch, _ = x.shape
  out = np.zeros((views, batch))
  for v in range(views):
    for i in range(batch):
      best, nearest = -np.inf, None
      for j in range(batch):
        if j != i and x[v, i] @ x[v, j] > best:
          best, nearest = x[v, i] @ x[v, j], j
      out[v, i] = -np.log(max(np.linalg.norm(x[v, i] - x[v, nearest]), eps) + eps)
  return out.mean(axis=0)


def test_matches_the_float64_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 8)) * rng.uniform(0.5, 3.0, size=(2, 16, 1))  # not unit norm
  got = np.asarray(jax.jit(objective.koleo_loss_per_example)(jnp.asarray(x, jnp.float32)))
  assert got.shape == (16,)
  np.testing.assert_allclose(got, ref_koleo(x), rtol=2e-5, atol=2e-5)


def test_gradient_matches_central_differences_of_the_reference():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 4))
  w = rng.normal(size=(6,))
  grad = np.asarray(jax.grad(lambda e: jnp.sum(w * objective.koleo_loss_per_example(e)))(
      jnp.asarray(x, jnp.float32)))
  h, num = 1e-6, np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    num[idx] = (w @ ref_koleo(up) - w @ ref_koleo(down)) / (2 * h)
  np.testing.assert_allclose(grad, num, rtol=2e-3, atol=2e-4 * np.abs(num).max())


def test_repeated_embeddings_stay_finite():
  """Two images with one embedding: the floor, -log(2 eps), and a finite gradient."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 8)), jnp.float32)
  x = x.at[0, 1].set(x[0, 0])
  value, grad = jax.value_and_grad(lambda e: jnp.sum(objective.koleo_loss_per_example(e)))(x)
  per_example = objective.koleo_loss_per_example(x)
  np.testing.assert_allclose(per_example[:2], -np.log(2e-8), rtol=1e-6)
  assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all()


def test_descending_it_spreads_a_narrow_cone():
  """What it is for: embeddings crowded in a cone (mean cosine about 0.9) spread out as the term is
  descended, and their nearest-neighbor distances grow."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(np.array([1.0] + [0.0] * 7) + 0.15 * rng.normal(size=(1, 32, 8)), jnp.float32)

  def stats(e):
    e = np.asarray(e[0] / jnp.linalg.norm(e[0], axis=-1, keepdims=True))
    cos = e @ e.T
    off = cos[~np.eye(len(e), dtype=bool)]
    return off.mean(), np.sqrt(2 - 2 * np.max(np.where(np.eye(len(e)), -1, cos), axis=1)).min()

  step = jax.jit(jax.grad(lambda e: jnp.mean(objective.koleo_loss_per_example(e))))
  before = stats(x)
  for _ in range(200):
    x = x - 0.05 * step(x)
  after = stats(x)
  assert before[0] > 0.8 and after[0] < before[0] - 0.2, (before, after)
  assert after[1] > 2 * before[1], (before, after)


@pytest.mark.parametrize("shape, words", [((4, 8), "rank 3"), ((2, 1, 8), "B >= 2")])
def test_bad_shapes_raise(shape, words):
  with pytest.raises(ValueError, match=words):
    objective.koleo_loss_per_example(jnp.zeros(shape))


def test_in_the_step_it_adds_its_weighted_term_and_moves_the_student():
  """One step from the same state and batch at weight 0 and 0.1: at 0 no `koleo_loss` metric and
  the loss is the two SOVE losses; at 0.1 the loss is theirs plus 0.1 x KoLeo, and the student
  lands elsewhere."""
  out = {}
  for weight in (0.0, 0.1):
    config = _config(**{"sove.koleo_weight": weight})
    setup, st, _ = _setup(config, jax.devices()[:1])
    new, metrics = setup.step(st, synthetic_batch(config))
    out[weight] = jax.device_get((new.student, metrics))
  (off_params, off), (on_params, on) = out[0.0], out[0.1]
  assert "koleo_loss" not in off
  np.testing.assert_allclose(off["loss"], off["cls_loss"] + off["patch_loss"], rtol=1e-6)
  assert on["finite"] and on["koleo_loss"] > 0
  np.testing.assert_allclose(on["cls_loss"], off["cls_loss"], rtol=1e-6)
  np.testing.assert_allclose(on["loss"], on["cls_loss"] + on["patch_loss"]
                             + 0.1 * on["koleo_loss"], rtol=1e-6)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(off_params),
                                               jax.tree.leaves(on_params))]
  assert max(moved) > 1e-6


@pytest.mark.parametrize("weight, batch, words", [
    (-0.1, 16, "sove.koleo_weight=-0.1 must be >= 0"),
    (0.1, 1, "sove.koleo_weight=0.1 needs batch_size >= 2"),
])
def test_bad_configs_raise_one_sentence(weight, batch, words):
  config = _config()
  config.sove.koleo_weight, config.batch_size = weight, batch
  with pytest.raises(configuration.ConfigError, match=words):
    configuration.validate(config, num_devices=1)
