"""Tests of sove_jax.objective against an independent float64 NumPy implementation of the
method (docs/method.md §3-§7).

The references below build the dense label matrix Y and follow the definitions literally
(loops over view pairs, explicit softmax, dense backpropagation); the library never builds Y
and works in log space, so agreement checks the reformulation, not a copy of it.
Relative error of x against a reference r is max|x - r| / max|r|.
"""
import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sove_jax import objective as obj

# ----------------------------------------------------------------------------- float64 references


def unit_rows(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(x - ref)) / np.max(np.abs(ref))


def ref_judges(bank, anchor_idx, k, smoothing, labels, exclude_idx=None):
  """docs/method.md §3 literally: similarities, excluded columns -inf, top-k by full sort."""
  bank = np.asarray(bank, np.float64)
  anchor_idx = np.asarray(anchor_idx)
  exclude_idx = anchor_idx if exclude_idx is None else np.asarray(exclude_idx)
  anchors = bank[anchor_idx]
  sims = anchors @ bank.T
  sims[:, exclude_idx] = -np.inf
  order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  top = np.take_along_axis(sims, order, axis=1)
  vectors = np.concatenate([anchors[:, None], bank[order]], axis=1)
  nbr_w = np.clip(top, 0, 1) if labels == "soft" else np.full(top.shape, 1 - smoothing)
  weights = np.concatenate([np.full((len(anchor_idx), 1), 1 - smoothing), nbr_w], axis=1)
  return vectors, weights, order


def ref_label_matrix(weights):
  """Y[(i, j), c] = w_ij if c == i else (1 - w_ij) / (K - 1): the K*J x K matrix of
  docs/method.md §4."""
  num_c, num_j = weights.shape
  y = np.empty((num_c * num_j, num_c))
  for i in range(num_c):
    for j in range(num_j):
      y[i * num_j + j, :] = (1 - weights[i, j]) / (num_c - 1)
      y[i * num_j + j, i] = weights[i, j]
  return y


def ref_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def ref_log_probs(u, vectors, weights, tau):
  """log(softmax(<u, D>/tau) @ Y) over flattened leading dims, float64."""
  u = np.asarray(u, np.float64)
  num_c, num_j, dim = vectors.shape
  flat = np.asarray(vectors, np.float64).reshape(num_c * num_j, dim)
  p = ref_softmax(u.reshape(-1, dim) @ flat.T / tau)
  log_p = np.log(p @ ref_label_matrix(np.asarray(weights, np.float64)))
  return log_p.reshape(u.shape[:-1] + (num_c,))


def ref_log_probs_vjp(u, vectors, weights, tau, g):
  """Dense backpropagation of sum(g * log P) to u, float64."""
  u = np.asarray(u, np.float64)
  num_c, num_j, dim = vectors.shape
  flat = np.asarray(vectors, np.float64).reshape(num_c * num_j, dim)
  y = ref_label_matrix(np.asarray(weights, np.float64))
  p = ref_softmax(u.reshape(-1, dim) @ flat.T / tau)
  big_p = p @ y
  gp = (g.reshape(-1, num_c) / big_p) @ y.T
  gz = p * (gp - np.sum(p * gp, axis=-1, keepdims=True))
  return (gz @ flat / tau).reshape(u.shape)


def ref_class_loss_per_example(ls, pt):
  """docs/method.md §6 (paper eq. 2): mean over pairs (v teacher, u student, u != v) of
  -sum_c Pt[v] log Ps[u]."""
  ls, pt = np.asarray(ls, np.float64), np.asarray(pt, np.float64)
  total, pairs = 0.0, 0
  for v in range(pt.shape[0]):
    for u in range(ls.shape[0]):
      if u != v:
        total = total - np.sum(pt[v] * ls[u], axis=-1)
        pairs += 1
  return total / pairs


def ref_class_loss_grad_logps(ls, pt):
  """d(mean_b class loss)/d log Ps."""
  num_s, batch, _ = ls.shape
  num_t = pt.shape[0]
  g = np.zeros(ls.shape)
  for v in range(num_t):
    for u in range(num_s):
      if u != v:
        g[u] -= pt[v]
  return g / ((num_t * num_s - num_t) * batch)


def ref_patch_loss_per_example(ls, pt, mask):
  ls, pt, mask = (np.asarray(a, np.float64) for a in (ls, pt, mask))
  ce = -np.sum(pt * ls, axis=-1)
  per_view = np.sum(mask * ce, axis=-1) / np.maximum(1, mask.sum(-1))
  return per_view.mean(0)


def ref_patch_loss_grad_logps(pt, mask):
  num_v, batch = mask.shape[:2]
  scale = mask / np.maximum(1, mask.sum(-1, keepdims=True))
  return -scale[..., None] * pt / (num_v * batch)


def make_problem(seed=0, bank_size=96, dim=8, num_anchors=7, k=3, smoothing=0.1,
                 labels="soft"):
  rng = np.random.default_rng(seed)
  bank = unit_rows(rng, (bank_size, dim)).astype(np.float32)
  anchor_idx = rng.choice(bank_size, num_anchors, replace=False).astype(np.int32)
  judges = obj.select_judges(bank, anchor_idx, k, smoothing, labels)
  return rng, bank, anchor_idx, judges


# ----------------------------------------------------------------------------- anchors and judges


def test_sample_anchors_distinct_and_uniform():
  idx = obj.sample_anchors(jax.random.key(3), 50, 50)
  chex.assert_shape(idx, (50,))
  assert idx.dtype == jnp.int32
  np.testing.assert_array_equal(np.sort(np.asarray(idx)), np.arange(50))

  draws = 6000
  keys = jax.random.split(jax.random.key(0), draws)
  idx = np.asarray(jax.vmap(lambda k: obj.sample_anchors(k, 10, 3))(keys))
  assert all(len(set(row)) == 3 for row in idx)
  # Each of 10 rows is in a draw of 3 with probability 0.3, in each slot with probability 0.1.
  counts = np.bincount(idx.ravel(), minlength=10)
  expected = draws * 3 / 10
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected * 0.7)), counts
  first = np.bincount(idx[:, 0], minlength=10)
  assert np.all(np.abs(first - draws / 10) < 5 * np.sqrt(draws * 0.09)), first


class JudgesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("soft_one_chunk", "soft", 0.1, 1024),
      ("onehot_chunked_with_padding", "onehot", 0.2, 3),
  )
  def test_matches_reference(self, labels, smoothing, chunk_size):
    rng = np.random.default_rng(1)
    bank = unit_rows(rng, (96, 8)).astype(np.float32)
    anchor_idx = rng.choice(96, 10, replace=False).astype(np.int32)
    fn = self.variant(functools.partial(obj.select_judges, num_neighbors=4, smoothing=smoothing,
                                        labels=labels, chunk_size=chunk_size))
    judges = fn(bank, anchor_idx)
    chex.assert_shape(judges.vectors, (10, 5, 8))
    chex.assert_shape(judges.weights, (10, 5))
    chex.assert_type([judges.vectors, judges.weights], jnp.float32)
    vectors, weights, order = ref_judges(bank, anchor_idx, 4, smoothing, labels)
    assert rel_err(judges.vectors, vectors) < 1e-5
    assert rel_err(judges.weights, weights) < 1e-5
    assert not np.isin(order, anchor_idx).any()

  @chex.variants(with_jit=True, without_jit=True)
  def test_anchors_never_neighbors(self):
    # Rows come in near-identical pairs and both rows of some pairs are anchors: without the
    # exclusion each such anchor's nearest neighbor would be its twin.
    rng = np.random.default_rng(2)
    base = unit_rows(rng, (24, 16))
    twins = unit_rows(rng, (24, 16)) * 1e-3 + base
    bank = np.concatenate([base, twins / np.linalg.norm(twins, axis=1, keepdims=True)])
    bank = bank.astype(np.float32)
    anchor_idx = np.array([0, 24, 1, 25, 2, 26, 3, 27], np.int32)
    fn = self.variant(functools.partial(obj.select_judges, num_neighbors=5, chunk_size=3))
    judges = fn(bank, anchor_idx)
    # Identify each neighbor vector by its nearest bank row.
    nbr_rows = np.argmax(np.asarray(judges.vectors[:, 1:]) @ bank.T, axis=-1)
    assert not np.isin(nbr_rows, anchor_idx).any()
    _, _, order = ref_judges(bank, anchor_idx, 5, 0.1, "soft")
    np.testing.assert_array_equal(nbr_rows, order)

  @chex.variants(with_jit=True, without_jit=True)
  def test_exclude_idx_official_setting(self):
    # 16 anchors drawn, the first 8 kept as concepts, all 16 excluded from neighbors.
    rng = np.random.default_rng(3)
    bank = unit_rows(rng, (64, 8)).astype(np.float32)
    idx = np.asarray(obj.sample_anchors(jax.random.key(1), 64, 16))
    fn = self.variant(lambda b, a, e: obj.select_judges(b, a, 4, exclude_idx=e))
    judges = fn(bank, idx[:8], idx)
    chex.assert_shape(judges.vectors, (8, 5, 8))
    vectors, weights, order = ref_judges(bank, idx[:8], 4, 0.1, "soft", exclude_idx=idx)
    assert not np.isin(order, idx).any()
    assert rel_err(judges.vectors, vectors) < 1e-5
    assert rel_err(judges.weights, weights) < 1e-5

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_neighbors_is_the_anchor_alone(self):
    rng = np.random.default_rng(4)
    bank = unit_rows(rng, (32, 8)).astype(np.float32)
    anchor_idx = np.array([5, 0, 31], np.int32)
    judges = self.variant(functools.partial(obj.select_judges, num_neighbors=0,
                                            smoothing=0.25))(bank, anchor_idx)
    chex.assert_shape(judges.vectors, (3, 1, 8))
    np.testing.assert_array_equal(judges.vectors[:, 0], bank[anchor_idx])
    np.testing.assert_allclose(judges.weights, np.full((3, 1), 0.75), rtol=1e-7)


# ------------------------------------------------------------------------ concept probabilities


class ConceptLogProbsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("one_chunk", 1024, jnp.float32),
      ("chunks_and_tail_bf16_input", 3, jnp.bfloat16),
  )
  def test_matches_reference(self, chunk_size, dtype):
    rng, _, _, judges = make_problem(seed=5, num_anchors=7, k=3)
    u = jnp.asarray(unit_rows(rng, (2, 3, 8)), dtype)
    fn = self.variant(functools.partial(obj.concept_log_probs, chunk_size=chunk_size))
    out = fn(u, judges, 0.1)
    chex.assert_shape(out, (2, 3, 7))
    chex.assert_type(out, jnp.float32)
    ref = ref_log_probs(np.asarray(u.astype(jnp.float32)), np.asarray(judges.vectors),
                        np.asarray(judges.weights), 0.1)
    assert rel_err(out, ref) < 1e-5
    np.testing.assert_allclose(np.exp(ref).sum(-1), 1.0, rtol=1e-12)  # the reference is a pmf

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_judge_no_smoothing_is_log_softmax_over_anchors(self):
    rng = np.random.default_rng(6)
    bank = unit_rows(rng, (40, 16)).astype(np.float32)
    anchor_idx = np.array([3, 17, 0, 39, 8, 21, 30, 12, 5], np.int32)
    judges = obj.select_judges(bank, anchor_idx, 0, smoothing=0.0)
    anchors = bank[anchor_idx].astype(np.float64)
    u = unit_rows(rng, (4, 16))
    # tau = 0.005: most probabilities underflow float32, the log-probabilities must not.
    for tau in (0.1, 0.005):
      out = self.variant(obj.concept_log_probs)(jnp.asarray(u, jnp.float32), judges, tau)
      z = u @ anchors.T / tau
      ref = z - z.max(-1, keepdims=True)
      ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
      assert np.all(np.isfinite(out))
      assert rel_err(out, ref) < 1e-5, tau

  @chex.variants(with_jit=True, without_jit=True)
  def test_onehot_without_smoothing_finite_with_gradients(self):
    # Smoothing 0 + one-hot: every r_j = 0, so P is a concept's own mass, which underflows
    # float32 at tau = 0.01; log P and its gradient must stay finite and accurate.
    rng, _, _, judges = make_problem(seed=7, num_anchors=6, k=2, smoothing=0.0, labels="onehot")
    u = unit_rows(rng, (5, 8))
    g = rng.normal(size=(5, 6))
    tau = 0.01
    fn = self.variant(lambda u: obj.concept_log_probs(u, judges, tau, chunk_size=4))
    out, vjp = jax.vjp(fn, jnp.asarray(u, jnp.float32))
    (du,) = vjp(jnp.asarray(g, jnp.float32))
    vectors, weights = np.asarray(judges.vectors), np.asarray(judges.weights)
    ref = ref_log_probs(u, vectors, weights, tau)
    assert np.exp(ref).min() < 1e-38  # the case is really beyond float32's range
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(du))
    assert rel_err(out, ref) < 1e-5
    assert rel_err(du, ref_log_probs_vjp(u, vectors, weights, tau, g)) < 1e-4

  def test_zero_weights_give_negative_w_minus_r(self):
    # Clipped negative similarities: w = 0 judges, so w - r < 0 for them.
    rng = np.random.default_rng(8)
    vectors = unit_rows(rng, (5, 4, 8))
    weights = rng.uniform(0.2, 1.0, size=(5, 4))
    weights[:, 2:] = 0.0
    weights[0, 0] = 1.0
    judges = obj.Judges(jnp.asarray(vectors, jnp.float32), jnp.asarray(weights, jnp.float32))
    u = unit_rows(rng, (6, 8))
    g = rng.normal(size=(6, 5))
    for tau in (0.1, 0.04):
      out, vjp = jax.vjp(lambda u: obj.concept_log_probs(u, judges, tau, chunk_size=2),
                         jnp.asarray(u, jnp.float32))
      (du,) = vjp(jnp.asarray(g, jnp.float32))
      assert rel_err(out, ref_log_probs(u, vectors, weights, tau)) < 1e-5
      assert rel_err(du, ref_log_probs_vjp(u, vectors, weights, tau, g)) < 1e-4

  @parameterized.parameters(0, 4)
  def test_dominant_concept_without_own_weight(self, c):
    # Concept c's judges all point along u and weigh 0, so nearly all of the softmax mass sits
    # on them while P[c] = sum over the other concepts' judges of p r, about e^-110: the
    # naive total - R[c] cancels to nothing, and 1 / P[c] overflows float32 in the backward.
    # With chunks of 2 concepts, c = 0 leads the first chunk and c = 4 is the tail.
    rng = np.random.default_rng(14)
    u = unit_rows(rng, (3, 8))
    vectors = unit_rows(rng, (5, 3, 8))
    vectors[c] = u[0]
    weights = rng.uniform(0.2, 0.9, size=(5, 3))
    weights[c] = 0.0
    judges = obj.Judges(jnp.asarray(vectors, jnp.float32), jnp.asarray(weights, jnp.float32))
    g = rng.normal(size=(3, 5))
    tau = 0.005
    out, vjp = jax.vjp(lambda u: obj.concept_log_probs(u, judges, tau, chunk_size=2),
                       jnp.asarray(u, jnp.float32))
    (du,) = vjp(jnp.asarray(g, jnp.float32))
    ref = ref_log_probs(u, vectors, weights, tau)
    assert ref[0, c] < -88  # P[c] is below float32's range for the first embedding
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(du))
    assert rel_err(out, ref) < 1e-5
    assert rel_err(du, ref_log_probs_vjp(u, vectors, weights, tau, g)) < 1e-4

  def test_gradient_reaches_embeddings_only(self):
    rng, _, _, judges = make_problem(seed=9)
    u = jnp.asarray(unit_rows(rng, (3, 8)), jnp.float32)
    grads = jax.grad(lambda u, j, t: jnp.sum(obj.concept_log_probs(u, j, t)[:, 0]),
                     argnums=(0, 1, 2))(u, judges, jnp.float32(0.1))
    assert np.abs(grads[0]).max() > 0
    for leaf in jax.tree.leaves(grads[1:]):
      np.testing.assert_array_equal(leaf, 0.0)


# ----------------------------------------------------------------------------- losses


def _views(seed, num_views, batch, extra=()):
  rng, _, _, judges = make_problem(seed=seed, num_anchors=6, k=2)
  student = unit_rows(rng, (num_views, batch) + extra + (8,)).astype(np.float32)
  teacher = unit_rows(rng, (2, batch) + extra + (8,)).astype(np.float32)
  return rng, judges, student, teacher


class LossesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_class_loss_and_gradient(self):
    _, judges, student, teacher = _views(seed=10, num_views=5, batch=3)
    vectors, weights = np.asarray(judges.vectors), np.asarray(judges.weights)

    def loss_fn(s, t):
      ls = obj.concept_log_probs(s, judges, 0.1, chunk_size=4)
      pt = jnp.exp(obj.concept_log_probs(t, judges, 0.04))
      per_ex = obj.class_loss_per_example(ls, pt)
      return obj.class_loss(ls, pt), per_ex

    (loss, per_ex), grad = self.variant(jax.value_and_grad(loss_fn, has_aux=True))(
        student, teacher)
    chex.assert_shape(per_ex, (3,))
    chex.assert_shape(grad, student.shape)
    ls = ref_log_probs(student, vectors, weights, 0.1)
    pt = np.exp(ref_log_probs(teacher, vectors, weights, 0.04))
    ref_per_ex = ref_class_loss_per_example(ls, pt)
    assert rel_err(per_ex, ref_per_ex) < 1e-5
    assert rel_err(loss, ref_per_ex.mean()) < 1e-5
    np.testing.assert_allclose(loss, np.mean(per_ex), rtol=1e-6)
    g_ls = ref_class_loss_grad_logps(ls, pt)
    assert rel_err(grad, ref_log_probs_vjp(student, vectors, weights, 0.1, g_ls)) < 1e-4

  @chex.variants(with_jit=True, without_jit=True)
  def test_patch_loss_and_gradient(self):
    rng, judges, student, teacher = _views(seed=11, num_views=2, batch=3, extra=(4,))
    vectors, weights = np.asarray(judges.vectors), np.asarray(judges.weights)
    mask = rng.uniform(size=(2, 3, 4)) < 0.5
    mask[0, 1] = False  # an image without masked patches contributes 0, not NaN

    def loss_fn(s, t, m):
      ls = obj.concept_log_probs(s, judges, 0.1)
      pt = jnp.exp(obj.concept_log_probs(t, judges, 0.04))
      return obj.patch_loss(ls, pt, m), obj.patch_loss_per_example(ls, pt, m)

    (loss, per_ex), grad = self.variant(jax.value_and_grad(loss_fn, has_aux=True))(
        student, teacher, mask)
    chex.assert_shape(per_ex, (3,))
    chex.assert_shape(grad, student.shape)
    ls = ref_log_probs(student, vectors, weights, 0.1)
    pt = np.exp(ref_log_probs(teacher, vectors, weights, 0.04))
    ref_per_ex = ref_patch_loss_per_example(ls, pt, mask)
    assert rel_err(per_ex, ref_per_ex) < 1e-5
    assert rel_err(loss, ref_per_ex.mean()) < 1e-5
    g_ls = ref_patch_loss_grad_logps(pt, mask)
    assert rel_err(grad, ref_log_probs_vjp(student, vectors, weights, 0.1, g_ls)) < 1e-4


def test_tasks_vmapped_equal_tasks_looped():
  # A trainer may vmap the whole task (anchors, judges, losses) over task keys.
  rng = np.random.default_rng(15)
  bank = jnp.asarray(unit_rows(rng, (128, 8)), jnp.float32)
  student = jnp.asarray(unit_rows(rng, (3, 4, 8)), jnp.float32)
  keys = jax.random.split(jax.random.key(5), 2)

  def task(key, s):
    idx = obj.sample_anchors(key, 128, 12)
    judges = obj.select_judges(bank, idx[:6], 3, exclude_idx=idx, chunk_size=4)
    ls = obj.concept_log_probs(s, judges, 0.1, chunk_size=4)
    pt = jnp.exp(obj.concept_log_probs(jax.lax.stop_gradient(s[:2]), judges, 0.04))
    return obj.class_loss(ls, pt)

  vmapped = jax.jit(jax.value_and_grad(
      lambda s: jnp.mean(jax.vmap(task, in_axes=(0, None))(keys, s))))(student)
  looped = jax.jit(jax.value_and_grad(
      lambda s: (task(keys[0], s) + task(keys[1], s)) / 2))(student)
  np.testing.assert_allclose(vmapped[0], looped[0], rtol=1e-6)
  np.testing.assert_allclose(vmapped[1], looped[1], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- validation


def _bank(m=16, d=4):
  return jnp.asarray(unit_rows(np.random.default_rng(0), (m, d)), jnp.float32)


_JUDGES = obj.Judges(jnp.zeros((4, 2, 8)), jnp.ones((4, 2)))

_BAD_CALLS = [
    ("num_anchors", lambda: obj.sample_anchors(jax.random.key(0), 65536, 70000)),
    ("num_anchors", lambda: obj.sample_anchors(jax.random.key(0), 16, 0)),
    ("bank_size", lambda: obj.sample_anchors(jax.random.key(0), 16.0, 4)),
    ("bank", lambda: obj.select_judges(jnp.zeros((16,)), jnp.arange(4), 2)),
    ("anchor_idx", lambda: obj.select_judges(_bank(), jnp.arange(4)[None], 2)),
    ("anchor_idx", lambda: obj.select_judges(_bank(), jnp.arange(17), 2)),
    ("anchor_idx", lambda: obj.select_judges(_bank(), jnp.zeros((3,)), 2)),
    ("num_neighbors", lambda: obj.select_judges(_bank(), jnp.arange(4), 13)),
    ("num_neighbors", lambda: obj.select_judges(_bank(), jnp.arange(4), 9,
                                                exclude_idx=jnp.arange(8))),
    ("num_neighbors", lambda: obj.select_judges(_bank(), jnp.arange(4), -1)),
    ("labels", lambda: obj.select_judges(_bank(), jnp.arange(4), 2, labels="hard")),
    ("smoothing", lambda: obj.select_judges(_bank(), jnp.arange(4), 2, smoothing=1.5)),
    ("chunk_size", lambda: obj.select_judges(_bank(), jnp.arange(4), 2, chunk_size=0)),
    ("anchor_sharding", lambda: obj.select_judges(_bank(), jnp.arange(4), 2,
                                                  anchor_sharding="data")),
    ("anchor_sharding", lambda: obj.select_judges(_bank(), jnp.arange(4), 2,
                                                  anchor_sharding=jax.P("data"))),
    ("embeddings", lambda: obj.concept_log_probs(jnp.zeros((3, 7)), _JUDGES, 0.1)),
    ("judges.vectors", lambda: obj.concept_log_probs(
        jnp.zeros((3, 8)), obj.Judges(jnp.zeros((4, 8)), jnp.ones((4, 2))), 0.1)),
    ("judges.weights", lambda: obj.concept_log_probs(
        jnp.zeros((3, 8)), obj.Judges(jnp.zeros((4, 2, 8)), jnp.ones((4, 3))), 0.1)),
    ("temperature", lambda: obj.concept_log_probs(jnp.zeros((3, 8)), _JUDGES, 0.0)),
    ("student_log_probs", lambda: obj.class_loss(jnp.zeros((3, 4)), jnp.zeros((2, 3, 4)))),
    ("teacher_probs", lambda: obj.class_loss(jnp.zeros((3, 2, 4)), jnp.zeros((2, 2, 5)))),
    ("teacher_probs", lambda: obj.class_loss(jnp.zeros((2, 2, 4)), jnp.zeros((3, 2, 4)))),
    ("mask", lambda: obj.patch_loss(jnp.zeros((2, 3, 4, 5)), jnp.zeros((2, 3, 4, 5)),
                                    jnp.zeros((2, 3, 5)))),
    ("teacher_probs", lambda: obj.patch_loss(jnp.zeros((2, 3, 4, 5)), jnp.zeros((2, 3, 4, 6)),
                                             jnp.zeros((2, 3, 4)))),
]


@pytest.mark.parametrize("name,call", _BAD_CALLS)
def test_configuration_errors_name_the_argument_at_trace_time(name, call):
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    jax.eval_shape(call)  # tracing only: the error comes before anything runs


def test_too_many_anchors_message():
  with pytest.raises(ValueError, match="num_anchors=70000 exceeds bank_size=65536"):
    obj.sample_anchors(jax.random.key(0), 65536, 70000)


# ----------------------------------------------------------------------------- 8 devices


def _mesh(axis_type=jax.sharding.AxisType.Auto):
  assert jax.device_count() >= 8, "tests/conftest.py should provide 8 CPU devices"
  return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"]


def _search(idx, chunk_size, sharding):
  return jax.jit(functools.partial(obj.select_judges, num_neighbors=4, exclude_idx=idx,
                                   chunk_size=chunk_size, anchor_sharding=sharding))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_judge_search_matches_unsharded(axis_type):
  mesh = _mesh(getattr(jax.sharding.AxisType, axis_type))
  rng = np.random.default_rng(12)
  bank = unit_rows(rng, (256, 16)).astype(np.float32)
  idx = np.asarray(obj.sample_anchors(jax.random.key(2), 256, 64))
  expected = _search(idx, 1024, None)(bank, idx[:40])
  ref_vectors, ref_weights, _ = ref_judges(bank, idx[:40], 4, 0.1, "soft", exclude_idx=idx)
  assert rel_err(expected.vectors, ref_vectors) < 1e-5
  assert rel_err(expected.weights, ref_weights) < 1e-5
  with jax.set_mesh(mesh):
    bank_r, idx_r = jax.device_put(bank, jax.P()), jax.device_put(idx[:40], jax.P())
    # One chunk; several chunks (rounded up to multiples of 8 rows, padded); a bare spec.
    for chunk_size, sharding in ((1024, jax.NamedSharding(mesh, jax.P("data"))),
                                 (12, jax.P("data", None))):
      got = _search(idx, chunk_size, sharding)(bank_r, idx_r)
      assert got.vectors.sharding.is_fully_replicated
      np.testing.assert_array_equal(got.vectors, expected.vectors)
      np.testing.assert_array_equal(got.weights, expected.weights)


def test_sharded_judge_search_splits_the_work():
  mesh = _mesh()
  rng = np.random.default_rng(13)
  bank = unit_rows(rng, (512, 32)).astype(np.float32)
  idx = np.asarray(obj.sample_anchors(jax.random.key(3), 512, 40))
  one = _search(idx, 1024, None).lower(bank, idx).compile()
  replicated = jax.NamedSharding(mesh, jax.P())
  per_device = _search(idx, 1024, jax.NamedSharding(mesh, jax.P("data"))).lower(
      jax.device_put(bank, replicated), jax.device_put(idx, replicated)).compile()
  # Per-device FLOPs of the compiled search: ~1/8 of the single-device figure...
  assert 0.09 <= _flops(per_device) / _flops(one) <= 0.2, (_flops(per_device), _flops(one))
  # ...and each device holds only its 5 rows of the 40 x 512 similarity fed to top_k.
  assert "f32[40,512]" in one.as_text()
  assert "f32[40,512]" not in per_device.as_text()
  assert "f32[5,512]" in per_device.as_text()


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_batch_matches_unsharded(axis_type):
  mesh = _mesh(getattr(jax.sharding.AxisType, axis_type))
  rng, judges, student, teacher = _views(seed=13, num_views=3, batch=8)
  patches = unit_rows(rng, (2, 8, 3, 8)).astype(np.float32)
  mask = rng.uniform(size=(2, 8, 3)) < 0.5

  def losses(s, t, p, m):
    ls = obj.concept_log_probs(s, judges, 0.1, chunk_size=4)
    pt = jnp.exp(obj.concept_log_probs(t, judges, 0.04))
    lp = obj.concept_log_probs(p, judges, 0.1)
    ptp = jnp.exp(obj.concept_log_probs(jax.lax.stop_gradient(p), judges, 0.04))
    return (obj.class_loss(ls, pt) + obj.patch_loss(lp, ptp, m),
            (obj.class_loss_per_example(ls, pt), obj.patch_loss_per_example(lp, ptp, m)))

  fn = jax.jit(jax.value_and_grad(losses, argnums=(0, 2), has_aux=True))
  expected = fn(student, teacher, patches, mask)
  with jax.set_mesh(mesh):
    batch = lambda x: jax.device_put(x, jax.P(None, "data"))
    got = fn(batch(student), batch(teacher), batch(patches), batch(mask))
  assert got[1][0].sharding.spec[1] == "data"  # gradients stay batch-sharded
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
