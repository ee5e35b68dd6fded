"""Tests of the DINO / iBOT objectives (sove_jax.prototypes) and their head.

The references below are float64 NumPy written from the papers' definitions, loop by loop: for
each (teacher view, student view) pair, a softmax of the centered teacher logits at the teacher
temperature against a log-softmax of the student logits at 0.1; the gradient with respect to
the student logits is the closed form (softmax(s / T_s) - target) / T_s per term. The library
instead reuses SOVE's pair reduction (sums over views, no loop), so agreement checks it.
Relative error of x against a reference r is max|x - r| / max|r|.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import special

from sove_jax import prototypes as proto
from sove_jax.models import LOGICAL_AXES, PrototypeHead

TOL = 2e-6  # float32 against float64


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(x - ref)) / np.max(np.abs(ref))


# ----------------------------------------------------------------------------- float64 references


def ref_softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def ref_log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def ref_dino(student, teacher, center, t_temp, s_temp):
  """DINO's loss as its paper writes it: per image, the mean over pairs v (teacher, global)
  and u != v (student, any view) of H(Pt_v, Ps_u); also d(batch mean)/d student logits."""
  student, teacher, center = (np.asarray(a, np.float64) for a in (student, teacher, center))
  num_s, batch, _ = student.shape
  targets = [ref_softmax((teacher[v] - center) / t_temp) for v in range(teacher.shape[0])]
  pairs = [(v, u) for v in range(len(targets)) for u in range(num_s) if u != v]
  per_image = np.zeros(batch)
  grad = np.zeros_like(student)
  for v, u in pairs:
    per_image += -np.sum(targets[v] * ref_log_softmax(student[u] / s_temp), axis=-1)
    grad[u] += (ref_softmax(student[u] / s_temp) - targets[v]) / s_temp
  return per_image / len(pairs), grad / (len(pairs) * batch)


def ref_ibot_patch(student, teacher, center, mask, t_temp, s_temp):
  """iBOT's masked-patch loss: per view and image, the mean cross-entropy over the masked
  tokens (none masked: 0), then the mean over views; and its gradient (batch mean)."""
  student, teacher, center = (np.asarray(a, np.float64) for a in (student, teacher, center))
  mask = np.asarray(mask, bool)
  views, batch, tokens, _ = student.shape
  per_image = np.zeros(batch)
  grad = np.zeros_like(student)
  for v in range(views):
    for b in range(batch):
      n = mask[v, b].sum()
      for t in range(tokens):
        if not mask[v, b, t]:
          continue
        target = ref_softmax((teacher[v, b, t] - center) / t_temp)
        per_image[b] += -np.sum(target * ref_log_softmax(student[v, b, t] / s_temp)) / n / views
        grad[v, b, t] = ((ref_softmax(student[v, b, t] / s_temp) - target)
                         / s_temp / n / views / batch)
  return per_image, grad


def ref_center(center, teacher_rows, momentum):
  """DINO: center * m + (1 - m) * sum of the teacher rows / their number."""
  rows = np.asarray(teacher_rows, np.float64)
  return np.asarray(center, np.float64) * momentum + rows.sum(0) / len(rows) * (1 - momentum)


def ref_gelu(x):
  return 0.5 * x * (1 + special.erf(x / math.sqrt(2)))


def ref_head(params, x, trained_norm=False):
  """DINO's head: MLP, L2-normalize, weight-normalized prototypes (no bias), float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = ref_gelu(x @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
  h = ref_gelu(h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"])
  h = h @ p["mlp"]["fc3"]["kernel"] + p["mlp"]["fc3"]["bias"]
  h = h / np.linalg.norm(h, axis=-1, keepdims=True)
  v = p["last_layer"]["kernel"]
  w = v / np.linalg.norm(v, axis=0, keepdims=True)
  if trained_norm:
    w = w * p["last_layer"]["scale"]
  return h @ w


# ----------------------------------------------------------------------------- inputs


def logits(seed, shape, scale=3.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


@pytest.fixture(scope="module")
def dino_inputs():
  vs, vt, b, k = 5, 2, 4, 11  # 2 global views + 3 local crops
  return dict(student=logits(0, (vs, b, k)), teacher=logits(1, (vt, b, k)),
              center=logits(2, (k,), 1.0))


@pytest.fixture(scope="module")
def patch_inputs():
  v, b, l, k = 2, 3, 6, 9
  mask = np.random.default_rng(3).random((v, b, l)) < 0.4
  mask[0, 1] = False          # an image whose view 0 has no masked token
  mask[1, 2] = True           # and one fully masked
  return dict(student=logits(4, (v, b, l, k)), teacher=logits(5, (v, b, l, k)),
              center=logits(6, (k,), 1.0), mask=mask)


# ----------------------------------------------------------------------------- DINO


@pytest.mark.parametrize("t_temp", [0.04, 0.07])
def test_dino_loss_and_gradient_match_reference(dino_inputs, t_temp):
  x = dino_inputs
  ref, ref_grad = ref_dino(x["student"], x["teacher"], x["center"], t_temp, 0.1)
  got = proto.dino_loss_per_example(x["student"], x["teacher"], x["center"], teacher_temp=t_temp)
  assert got.shape == (4,) and got.dtype == jnp.float32
  assert rel_err(got, ref) < TOL
  loss_fn = lambda s: proto.dino_loss(s, x["teacher"], x["center"], teacher_temp=t_temp)
  assert rel_err(loss_fn(x["student"]), ref.mean()) < TOL
  assert rel_err(jax.grad(loss_fn)(jnp.asarray(x["student"])), ref_grad) < 1e-5


def test_dino_targets_carry_no_gradient(dino_inputs):
  x = dino_inputs
  g_teacher, g_center = jax.grad(
      lambda t, c: proto.dino_loss(x["student"], t, c, teacher_temp=0.04), argnums=(0, 1))(
          jnp.asarray(x["teacher"]), jnp.asarray(x["center"]))
  np.testing.assert_array_equal(g_teacher, 0.0)
  np.testing.assert_array_equal(g_center, 0.0)


def test_dino_teacher_temperature_may_be_traced(dino_inputs):
  """A warm-up schedule's value is a traced scalar inside the step."""
  x = dino_inputs
  fn = jax.jit(lambda t: proto.dino_loss(x["student"], x["teacher"], x["center"], teacher_temp=t))
  ref, _ = ref_dino(x["student"], x["teacher"], x["center"], 0.055, 0.1)
  assert rel_err(fn(jnp.float32(0.055)), ref.mean()) < TOL


def test_dino_centring_removes_a_shared_shift(dino_inputs):
  """Softmax is shift-invariant per row, but the center is per prototype: subtracting it is
  what keeps one prototype from dominating every image. A center equal to a constant offset
  added to one prototype's logits cancels that offset exactly."""
  x = dino_inputs
  shifted = x["teacher"].copy()
  shifted[..., 3] += 5.0
  offset = np.zeros_like(x["center"])
  offset[3] = 5.0
  a = proto.teacher_probs(x["teacher"], x["center"], 0.04)
  b = proto.teacher_probs(shifted, x["center"] + offset, 0.04)
  np.testing.assert_allclose(a, b, atol=2e-6)
  c = proto.teacher_probs(shifted, x["center"], 0.04)
  assert np.mean(np.asarray(c)[..., 3]) > np.mean(np.asarray(a)[..., 3]) + 0.1


# ----------------------------------------------------------------------------- iBOT


def test_ibot_patch_loss_and_gradient_match_reference(patch_inputs):
  x = patch_inputs
  ref, ref_grad = ref_ibot_patch(x["student"], x["teacher"], x["center"], x["mask"], 0.07, 0.1)
  got = proto.ibot_patch_loss_per_example(x["student"], x["teacher"], x["center"], x["mask"],
                                          teacher_temp=0.07)
  assert got.shape == (3,) and rel_err(got, ref) < TOL
  fn = lambda s: jnp.mean(proto.ibot_patch_loss_per_example(
      s, x["teacher"], x["center"], x["mask"], teacher_temp=0.07))
  grad = jax.grad(fn)(jnp.asarray(x["student"]))
  assert rel_err(grad, ref_grad) < 1e-5
  # Unmasked tokens receive no gradient.
  np.testing.assert_array_equal(np.asarray(grad)[~x["mask"]], 0.0)


def test_ibot_loss_is_dino_cls_plus_patch(dino_inputs, patch_inputs):
  d, p = dino_inputs, patch_inputs
  b = 3
  student_cls, teacher_cls = d["student"][:, :b], d["teacher"][:, :b]
  cls, patch = proto.ibot_loss_per_example(
      student_cls, teacher_cls, d["center"], p["student"], p["teacher"], p["center"], p["mask"],
      teacher_temp=0.05, teacher_patch_temp=0.06)
  ref_cls, _ = ref_dino(student_cls, teacher_cls, d["center"], 0.05, 0.1)
  ref_patch, _ = ref_ibot_patch(p["student"], p["teacher"], p["center"], p["mask"], 0.06, 0.1)
  assert rel_err(cls, ref_cls) < TOL and rel_err(patch, ref_patch) < TOL
  total = proto.ibot_loss(student_cls, teacher_cls, d["center"], p["student"], p["teacher"],
                          p["center"], p["mask"], teacher_temp=0.05, teacher_patch_temp=0.06,
                          cls_weight=0.5, patch_weight=2.0)
  assert rel_err(total, 0.5 * ref_cls.mean() + 2.0 * ref_patch.mean()) < TOL


# ----------------------------------------------------------------------------- centers


def test_center_update_matches_dino_and_ibot():
  k = 13
  cls = logits(7, (2, 5, k))          # [views, B, K]
  patch = logits(8, (2, 5, 6, k))     # [views, B, L, K]
  center = logits(9, (k,), 1.0)
  # DINO: teacher_output is the two views concatenated, [2B, K].
  got = proto.update_center(center, cls, 0.9)
  assert rel_err(got, ref_center(center, cls.reshape(10, k), 0.9)) < TOL
  # iBOT's patch center: mean over tokens per image, then over the 2B images.
  per_image = patch.reshape(10, 6, k).astype(np.float64).mean(1)
  got = proto.update_center(center, patch, 0.9)
  assert rel_err(got, ref_center(center, per_image, 0.9)) < TOL
  # Momentum 1 keeps the center; 0 replaces it by the batch mean.
  np.testing.assert_allclose(proto.update_center(center, cls, 1.0), center)
  np.testing.assert_allclose(proto.update_center(center, cls, 0.0), cls.reshape(10, k).mean(0),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_center_is_the_global_batch_mean_on_8_devices(axis_type):
  """Sharded over the batch, the center equals the single-device one: under jit the mean is
  global, and inside shard_map `axis_name` averages the per-device means."""
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  k = 16
  cls = logits(10, (2, 32, k))
  center = logits(11, (k,), 1.0)
  expected = ref_center(center, cls.reshape(64, k), 0.9)

  sharded = jax.device_put(cls, jax.NamedSharding(mesh, jax.P(None, "data")))
  got = jax.jit(proto.update_center)(center, sharded, 0.9)
  assert rel_err(got, expected) < TOL

  def per_device(c, t, *, axis_name):
    return proto.update_center(c, t, 0.9, axis_name=axis_name)[None]

  def run(axis_name):
    fn = jax.shard_map(lambda c, t: per_device(c, t, axis_name=axis_name), mesh=mesh,
                       in_specs=(jax.P(), jax.P(None, "data")), out_specs=jax.P("data"),
                       check_vma=False)
    return np.asarray(jax.jit(fn)(center, sharded))   # [8, K], one row per device

  rows = run("data")
  for row in rows:
    assert rel_err(row, expected) < TOL
  # Without the axis name each device sees its own 4 images: the test above can fail.
  local = run(None)
  assert max(rel_err(row, expected) for row in local) > 1e-2


# ----------------------------------------------------------------------------- head


def _count(state):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_parameter_count_at_paper_scale(norm_last_layer):
  """ViT-S width 384, hidden 2048, bottleneck 256, 65536 prototypes (DINO's ViT-S head)."""
  head = nnx.eval_shape(lambda: PrototypeHead(384, norm_last_layer=norm_last_layer,
                                              rngs=nnx.Rngs(0)))
  mlp = (384 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 256 + 256)
  expected = mlp + 256 * 65536 + (0 if norm_last_layer else 65536)
  assert _count(nnx.state(head, nnx.Param)) == expected
  assert _count(nnx.state(head)) == expected  # nothing but parameters


@pytest.fixture(scope="module")
def small_head():
  return PrototypeHead(24, hidden_dim=48, bottleneck_dim=16, num_prototypes=40,
                       dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_head_matches_reference_and_shapes(small_head):
  x = logits(12, (3, 5, 24), 1.0)
  y = small_head(x)
  assert y.shape == (3, 5, 40) and y.dtype == jnp.float32
  params = nnx.state(small_head, nnx.Param).to_pure_dict()
  assert rel_err(y, ref_head(params, x.astype(np.float64))) < 1e-5
  # norm_last_layer: the logits are cosine similarities.
  assert np.max(np.abs(np.asarray(y))) <= 1.0 + 1e-6
  # Token-wise, so iBOT can share it between [CLS] and patch tokens.
  np.testing.assert_allclose(small_head(x[:, 2]), y[:, 2], atol=1e-6)


def test_prototype_layer_is_weight_normalized(small_head):
  layer = small_head.last_layer
  np.testing.assert_allclose(np.linalg.norm(np.asarray(layer.weight()), axis=0), 1.0, rtol=1e-6)
  # PyTorch's default Linear draw: uniform in +-1/sqrt(bottleneck).
  v = np.asarray(layer.kernel[...])
  assert np.abs(v).max() <= 1 / 4 and np.abs(v).max() > 0.9 / 4
  x = logits(13, (7, 16), 1.0)
  y = layer(x)
  # Rescaling a prototype's v changes nothing...
  scaled = nnx.clone(layer)
  scaled.kernel.set_value(layer.kernel[...] * jnp.linspace(0.1, 10.0, 40)[None])
  np.testing.assert_allclose(scaled(x), y, rtol=2e-5, atol=2e-6)

  # ...and its gradient is orthogonal to v (the norm of v never receives a gradient).
  graphdef, state = nnx.split(layer)
  grads = jax.grad(lambda st: jnp.sum(jnp.sin(nnx.merge(graphdef, st)(x))))(state)
  g = np.asarray(grads["kernel"][...], np.float64)
  dots = np.sum(g * v, axis=0) / (np.linalg.norm(g, axis=0) * np.linalg.norm(v, axis=0))
  assert np.max(np.abs(dots)) < 1e-4


def test_trainable_prototype_norm():
  """norm_last_layer=False (iBOT's ViT recipes): g starts at 1, scales its prototype's logits,
  and is rank 2 ([1, K]) so that weight decay reaches it as it does PyTorch's [K, 1] weight_g."""
  head = PrototypeHead(8, hidden_dim=16, bottleneck_dim=8, num_prototypes=5,
                       norm_last_layer=False, dtype=jnp.float32, rngs=nnx.Rngs(1))
  scale = head.last_layer.scale
  assert scale.shape == (1, 5)
  np.testing.assert_array_equal(scale[...], 1.0)
  x = logits(14, (4, 8), 1.0)
  y = np.asarray(head(x))
  head.last_layer.scale.set_value(jnp.asarray([[1.0, 2.0, 1.0, 1.0, -3.0]]))
  params = nnx.state(head, nnx.Param).to_pure_dict()
  np.testing.assert_allclose(head(x), y * np.array([1, 2, 1, 1, -3.0]), rtol=1e-5, atol=1e-6)
  assert rel_err(head(x), ref_head(params, x.astype(np.float64), trained_norm=True)) < 1e-5


def test_head_logical_axes(small_head):
  specs = nnx.get_partition_spec(nnx.state(small_head, nnx.Param)).to_pure_dict()
  flat = {jax.tree_util.keystr(p): tuple(s) for p, s in
          jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda s: isinstance(s, jax.P))}
  for path, names in flat.items():
    assert set(names) <= set(LOGICAL_AXES) | {None}, path
    assert any(n is not None for n in names), path
  assert flat["['last_layer']['kernel']"] == ("proj_out", "prototypes")


def test_head_computes_in_bf16_and_returns_float32():
  head = PrototypeHead(8, hidden_dim=16, bottleneck_dim=8, num_prototypes=5, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 8))
  jaxpr = jax.make_jaxpr(lambda a: head(a))(x).jaxpr
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 4
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  assert jaxpr.outvars[0].aval.dtype == jnp.float32


# ----------------------------------------------------------------------------- freezing


def _toy_params():
  return {"backbone": {"w": jnp.ones((3, 3))},
          "head": {"mlp": {"fc1": {"kernel": jnp.ones((3, 2))}},
                   "last_layer": {"kernel": jnp.ones((2, 4))}}}


def test_freeze_last_layer_zeroes_only_the_prototypes_while_frozen():
  tree = _toy_params()
  frozen = proto.freeze_last_layer(tree, 2, 3)
  np.testing.assert_array_equal(frozen["head"]["last_layer"]["kernel"], 0.0)
  np.testing.assert_array_equal(frozen["head"]["mlp"]["fc1"]["kernel"], 1.0)
  np.testing.assert_array_equal(frozen["backbone"]["w"], 1.0)
  thawed = jax.jit(lambda t, s: proto.freeze_last_layer(t, s, 3))(tree, jnp.int32(3))
  np.testing.assert_array_equal(thawed["head"]["last_layer"]["kernel"], 1.0)
  assert proto.freeze_last_layer(tree, 0, 0) is tree
  with pytest.raises(ValueError, match="last_layer"):
    proto.freeze_last_layer({"w": jnp.ones(2)}, 0, 3)
  with pytest.raises(ValueError, match="freeze_steps"):
    proto.freeze_last_layer(tree, 0, 1.5)


def test_frozen_updates_leave_the_layer_untouched_under_adamw():
  """On the optimizer's updates the frozen layer neither moves nor decays (PyTorch's AdamW skips
  a parameter without gradient); it moves once thawed; the rest trains throughout."""
  tx = optax.adamw(1e-2, weight_decay=0.1)
  params = _toy_params()
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), params)
  history = []
  for step in range(4):
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = proto.freeze_last_layer(updates, step, 2)
    params = optax.apply_updates(params, updates)
    history.append(params)
  np.testing.assert_array_equal(history[1]["head"]["last_layer"]["kernel"], 1.0)
  assert np.all(np.asarray(history[2]["head"]["last_layer"]["kernel"]) < 1.0)
  assert np.all(np.asarray(history[0]["backbone"]["w"]) < 1.0)


# ----------------------------------------------------------------------------- diagnostics, checks


def test_teacher_entropies_tell_collapse_modes_apart():
  k = 8
  uniform = np.full((6, k), 1.0 / k)
  one_proto = np.eye(k)[np.zeros(6, int)]
  spread = np.eye(k)[np.arange(8) % 4]   # sharp, 4 prototypes equally used
  np.testing.assert_allclose(proto.teacher_entropies(uniform), (math.log(k), math.log(k)),
                             rtol=1e-6)
  np.testing.assert_allclose(proto.teacher_entropies(one_proto), (0.0, 0.0), atol=1e-7)
  np.testing.assert_allclose(proto.teacher_entropies(spread), (0.0, math.log(4)), atol=1e-6)


def test_bad_inputs_raise_one_sentence_errors(dino_inputs, patch_inputs):
  x, p = dino_inputs, patch_inputs
  with pytest.raises(ValueError, match="student_logits must have rank 3"):
    proto.dino_loss(x["student"][0], x["teacher"], x["center"], teacher_temp=0.04)
  with pytest.raises(ValueError, match="center has shape"):
    proto.dino_loss(x["student"], x["teacher"], x["center"][:3], teacher_temp=0.04)
  with pytest.raises(ValueError, match="temperature=0"):
    proto.dino_loss(x["student"], x["teacher"], x["center"], teacher_temp=0.0)
  with pytest.raises(ValueError, match="Vs=2 views and teacher_logits Vt=5"):
    proto.dino_loss(x["teacher"], x["student"], x["center"], teacher_temp=0.04)
  with pytest.raises(ValueError, match="mask has shape"):
    proto.ibot_patch_loss_per_example(p["student"], p["teacher"], p["center"], p["mask"][:1],
                                      teacher_temp=0.07)
  with pytest.raises(ValueError, match="momentum=1.5"):
    proto.update_center(x["center"], x["teacher"], 1.5)
