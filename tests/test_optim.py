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
  """The schedules' formula: linear warm-up from `warm_start`, then half a cosine to `end`."""
  if step < warmup:
    return warm_start + (start - warm_start) * step / warmup
  t = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
  return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def _np_linear(start, end, steps, step):
  return end if steps <= 0 else start + (end - start) * min(step / steps, 1.0)


def _schedules(**fields):
  c = default.get_config()
  for name, value in fields.items():
    section, _, leaf = name.rpartition("__")
    (c[section] if section else c)[leaf] = value
  return c, optim.make_schedules(c, steps_per_epoch=10, total_steps=50)


@pytest.mark.parametrize("warmup_epochs,temp_epochs", [(0.0, 0.0), (0.7, 2.0)])
def test_optax_schedules_equal_the_formulas(warmup_epochs, temp_epochs):
  """optax's warm-up cosine, cosine and linear schedules give what the method's formulas say,
  for the learning rate, a weight-decay ramp up (also from 0), the EMA momentum and the
  teacher temperature (to float32 rounding of the range: a ramp from 0 cancels at its start)."""
  for wd in (0.04, 0.0):
    c, s = _schedules(optim__warmup_epochs=warmup_epochs, optim__weight_decay=wd,
                      sove__teacher_temp_warmup=0.02, sove__teacher_temp_warmup_epochs=temp_epochs)
    o, peak = c.optim, c.optim.base_lr * c.batch_size / 256
    warmup, temp_steps = round(warmup_epochs * 10), round(temp_epochs * 10)
    for step in [0, 1, 6, 7, 8, 19, 20, 25, 49, 50, 80]:
      want = {
          "learning_rate": _np_cosine(peak, o.min_lr, 50, warmup, 0.0, step),
          "weight_decay": _np_cosine(wd, o.weight_decay_end, 50, 0, 0.0, step),
          "ema_momentum": _np_cosine(o.ema_momentum, o.ema_momentum_end, 50, 0, 0.0, step),
          "teacher_temp": _np_linear(0.02, c.sove.teacher_temp, temp_steps, step),
      }
      traced = jax.jit(lambda n: {k: f(n) for k, f in s._asdict().items()})(
          jnp.int32(step))
      for name, value in want.items():
        np.testing.assert_allclose(float(traced[name]), value, rtol=2e-6, atol=5e-8,
                                   err_msg=f"{name} at step {step}")
        np.testing.assert_allclose(float(getattr(s, name)(step)), value, rtol=2e-6, atol=5e-8)


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


@pytest.mark.parametrize("momentum", [0.9, 0.996, 0.99999, 1.0])
def test_teacher_ema_by_optax_equals_the_formula(momentum):
  """The step's EMA, optax.incremental_update(student, teacher, 1 - m), is the method's
  t + (1 - m) (s - t); at m = 1 the teacher stays exactly as it is."""
  rng = np.random.default_rng(0)
  t, s = rng.normal(size=(64,)).astype(np.float32), rng.normal(size=(64,)).astype(np.float32)
  out = optax.incremental_update({"w": jnp.asarray(s)}, {"w": jnp.asarray(t)},
                                 1.0 - jnp.float32(momentum))
  want = t.astype(np.float64) + (1 - momentum) * (s.astype(np.float64) - t)
  np.testing.assert_allclose(np.asarray(out["w"]), want, rtol=1e-6, atol=1e-7)
  if momentum == 1.0:
    np.testing.assert_array_equal(np.asarray(out["w"]), t)
