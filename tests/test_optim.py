"""Schedules, per-tensor clipping, weight-decay mask and EMA against NumPy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from sove_jax import optim


def _np_cosine(start, end, total, warmup, warm_start, step):
  if step < warmup:
    return warm_start + (start - warm_start) * step / warmup
  t = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
  return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("warmup", [0, 7])
def test_cosine_schedule_matches_reference(warmup):
  sched = optim.cosine_schedule(1.0, 0.01, 50, warmup)
  for step in [0, 1, 6, 7, 8, 25, 49, 50, 80]:
    np.testing.assert_allclose(float(sched(step)), _np_cosine(1.0, 0.01, 50, warmup, 0.0, step),
                               rtol=1e-5, atol=1e-7)


def test_teacher_temperature_warmup():
  sched = optim.linear_warmup_schedule(0.04, 0.07, 10)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 20)],
                             [0.04, 0.055, 0.07, 0.07], rtol=1e-6)
  assert float(optim.linear_warmup_schedule(0.04, 0.07, 0)(0)) == pytest.approx(0.07)


def test_make_schedules_scales_lr_by_batch_and_warmup():
  c = default.get_config()
  c.batch_size, c.optim.base_lr, c.optim.warmup_epochs = 512, 5e-4, 2.0
  s = optim.make_schedules(c, steps_per_epoch=10, total_steps=100)
  assert float(s.learning_rate(0)) == 0.0
  np.testing.assert_allclose(float(s.learning_rate(20)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(s.learning_rate(100)), c.optim.min_lr, rtol=1e-5)
  np.testing.assert_allclose(float(s.weight_decay(0)), c.optim.weight_decay, rtol=1e-6)
  np.testing.assert_allclose(float(s.weight_decay(100)), c.optim.weight_decay_end, rtol=1e-6)
  np.testing.assert_allclose(float(s.ema_momentum(100)), 1.0, rtol=1e-7)


def test_clip_per_tensor_matches_dino_rule():
  rng = np.random.default_rng(0)
  grads = {"a": rng.normal(size=(4, 5)) * 10, "b": rng.normal(size=(3,)) * 0.01}
  out, _ = optim.clip_per_tensor(3.0).update(jax.tree.map(jnp.asarray, grads), optax.EmptyState())
  for k, g in grads.items():
    norm = np.linalg.norm(g)
    coef = 3.0 / (norm + 1e-6)
    want = g * coef if coef < 1 else g
    np.testing.assert_allclose(np.asarray(out[k]), want, rtol=1e-5)
  assert np.linalg.norm(np.asarray(out["a"])) == pytest.approx(3.0, rel=1e-4)


def test_weight_decay_only_on_matrices():
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,)), "scale": jnp.ones((3,))}
  c = default.get_config()
  c.optim.clip = 0.0
  sched = optim.Schedules(lambda s: 1.0, lambda s: 0.5, lambda s: 0.0, lambda s: 0.0)
  tx = optim.make_optimizer(c, sched)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # Adam of a zero gradient is zero, so the update is -lr * wd * p on decayed leaves only.
  np.testing.assert_allclose(np.asarray(updates["kernel"]), -0.5 * np.ones((3, 3)))
  np.testing.assert_allclose(np.asarray(updates["bias"]), 0.0)
  np.testing.assert_allclose(np.asarray(updates["scale"]), 0.0)


def test_ema_formula():
  t, s = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}
  out = optim.ema(t, s, 0.9)
  np.testing.assert_allclose(np.asarray(out["w"]), 0.9 * np.array([1, 2]) + 0.1 * np.array([3, -2]),
                             rtol=1e-6)
