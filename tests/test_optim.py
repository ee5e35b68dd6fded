"""Schedules, per-tensor clipping, weight-decay mask and EMA against NumPy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default, smoke
from sove_jax import optim
from sove_jax.interop import torch_weights
from sove_jax.models import network


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
      traced = jax.jit(lambda n: {k: f(n) for k, f in s._asdict().items() if callable(f)})(
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
  np.testing.assert_allclose(float(s.ema_momentum(100)), c.optim.ema_momentum_end, rtol=1e-7)


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


# ------------------------------------------------------------------ loop vs scan_layers layouts

DEPTH = 3


def _abstract_params(scan_layers: bool):
  """Shapes of the smoke network's parameters, blocks looped or stacked for a scan."""
  c = smoke.get_config()
  c.model.update(depth=DEPTH, scan_layers=scan_layers)
  _, state = network.abstract_network(c.model, c.data.global_size)
  return state.to_pure_dict()


def _stack(loop_tree):
  """The scan layout of a loop-layout tree: block i becomes slice i of each leaf."""
  blocks = loop_tree["backbone"]["blocks"]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(DEPTH)])
  return {**loop_tree, "backbone": {**loop_tree["backbone"], "blocks": stacked}}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decay_mask_is_the_pytorch_named_rule(scan_layers):
  """DINO/iBOT/SOP decay every parameter but `*.bias` and 1-D tensors, by PyTorch names and
  shapes. Our mask, laid over the parameters and exported to that layout, must say the same."""
  params = _abstract_params(scan_layers)
  mask = optim.decay_mask(params)
  mask_arrays = jax.tree.map(lambda m, p: np.full(p.shape, m, np.float32), mask, params)
  exported = torch_weights.to_torch_state_dict(mask_arrays["backbone"])
  assert len(exported) == 4 + 12 * DEPTH + 3
  for key, value in exported.items():
    exempt = key.endswith(".bias") or value.ndim == 1
    assert np.all(value == (0.0 if exempt else 1.0)), key
  # The cases the old `ndim > 1` rule (or a stacked layer axis) got wrong:
  assert exported["blocks.1.attn.qkv.bias"].max() == 0.0   # stored (3, heads, head_dim)
  assert exported["blocks.2.norm1.weight"].max() == 0.0
  assert exported["blocks.0.attn.proj.weight"].min() == 1.0
  assert exported["pos_embed"].min() == exported["cls_token"].min() == 1.0
  # The head (not exported) follows the same rule: Linear weights decayed, biases not.
  assert mask["head"] == {f"fc{i}": {"kernel": True, "bias": False} for i in (1, 2, 3)}


def _random_grads(params, max_norm, seed):
  """Gradients whose per-layer norms are spread over [0.3, 3] * max_norm: some get clipped,
  some do not, and layers of one stack differ."""
  rng = np.random.default_rng(seed)

  def draw(p):
    g = rng.standard_normal(p.shape)
    return jnp.asarray(g / np.linalg.norm(g) * max_norm * 10 ** rng.uniform(-0.5, 0.5),
                       jnp.float32)

  return jax.tree.map(draw, params)


def test_clipping_a_scan_model_equals_clipping_the_loop_model():
  max_norm = 3.0
  loop = _random_grads(_abstract_params(False), max_norm, seed=0)
  scan = _stack(loop)
  assert jax.tree.structure(scan) == jax.tree.structure(_abstract_params(True))
  clip = optim.clip_per_tensor(max_norm)
  want, _ = clip.update(loop, optax.EmptyState())
  got, _ = clip.update(scan, optax.EmptyState())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0),
               got, _stack(want))
  # Each slice of a stack was clipped on its own, and the test can tell: stacks mixing slices
  # above and below max_norm (clipping the whole stack as one tensor would scale all of them).
  mixed = 0
  for before, after in zip(jax.tree.leaves(scan["backbone"]["blocks"]),
                           jax.tree.leaves(got["backbone"]["blocks"])):
    norms = np.linalg.norm(np.asarray(before).reshape(DEPTH, -1), axis=1)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(after).reshape(DEPTH, -1), axis=1),
                               np.minimum(norms, max_norm), rtol=1e-5)
    mixed += 0 < (norms > max_norm).sum() < DEPTH
  assert mixed >= 3


@pytest.mark.slow
@pytest.mark.parametrize("clip_mode", ["per_tensor", "global"])
def test_optimizer_step_on_a_scan_model_equals_the_loop_model(clip_mode):
  """Clipping, Adam and weight decay together: the scan layout's update is the loop layout's,
  stacked (global-norm clipping is layout-independent by construction; checked too)."""
  c = default.get_config()
  c.optim.clip, c.optim.clip_mode = 3.0, clip_mode
  sched = optim.Schedules(lambda s: 0.1, lambda s: 0.3, lambda s: 0.0, lambda s: 0.0)
  tx = optim.make_optimizer(c, sched)
  params = _random_grads(_abstract_params(False), 1.0, seed=1)
  grads = _random_grads(params, c.optim.clip, seed=2)
  want, _ = tx.update(grads, tx.init(params), params)
  scan_params = _stack(params)
  got, _ = tx.update(_stack(grads), tx.init(scan_params), scan_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got, _stack(want))
