"""Tests for the ViT backbone and the projection head (docs/method.md §9).

Behavior is checked on a tiny ViT (width 32, depth 2, 16 px, patch 4) built once per module;
the S/B/L parameter counts and full-size output shapes come from abstract evaluation, so no
large model is materialized.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sove_jax.models import (LOGICAL_AXES, VARIANTS, ProjectionHead, ViT, create_vit,
                             dot_product_attention, interpolate_pos_embed)

TINY = dict(width=32, depth=2, num_heads=2, patch_size=4, image_size=16, drop_path_rate=0.5)
GRID = 16 // 4


@pytest.fixture(scope="module")
def tiny():
  return create_vit("s", rngs=nnx.Rngs(0), **TINY)


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.key(1), (8, 16, 16, 3), jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "return_blocks"))
def _jitted(graphdef, params, x, mask, key, return_blocks):
  return nnx.merge(graphdef, params)(x, mask, key=key, return_blocks=return_blocks)


def run(model, x, mask=None, *, key=None, return_blocks=0):
  """The model's forward, compiled once per signature: cheaper on CPU than eager op dispatch."""
  graphdef, params = nnx.split(model)
  return _jitted(graphdef, params, x, mask, key, return_blocks)


def _spec(v):
  """Logical axis names of one `nnx.get_partition_spec` leaf."""
  return tuple(v.get_value() if isinstance(v, nnx.Variable) else v)


def _count(state):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def _abstract_forward(model, *shape):
  """Output shapes of `model` on a float32 batch of `shape`, traced, never run."""
  graphdef, state = nnx.split(model)
  fn = lambda s, x: nnx.merge(graphdef, s)(x, return_blocks=1)
  return jax.eval_shape(fn, state, jax.ShapeDtypeStruct(shape, jnp.float32))


# ------------------------------------------------------------------ sizes and shapes

@pytest.mark.parametrize("variant,expected", [("s", 21.7e6), ("b", 85.8e6), ("l", 303.5e6)])
def test_parameter_counts(variant, expected):
  model = nnx.eval_shape(lambda: create_vit(variant, rngs=nnx.Rngs(0)))
  params = _count(nnx.state(model, nnx.Param))
  assert abs(params / expected - 1) < 0.005, (variant, params)
  assert _count(nnx.state(model)) == params  # nothing but parameters in the module


def test_full_size_output_shapes():
  width = VARIANTS["s"][0]
  model = nnx.eval_shape(lambda: create_vit("s", rngs=nnx.Rngs(0)))
  for (h, w) in [(224, 224), (96, 96), (224, 160)]:
    tokens, blocks = _abstract_forward(model, 3, h, w, 3)
    assert tokens.shape == (3, 1 + (h // 16) * (w // 16), width)
    assert tokens.dtype == jnp.float32
    assert len(blocks) == 1 and blocks[0].shape == tokens.shape


def test_tiny_outputs_at_other_sizes(tiny):
  for (h, w) in [(16, 16), (8, 8), (16, 12)]:
    out = run(tiny, jnp.ones((2, h, w, 3)))
    assert out.shape == (2, 1 + (h // 4) * (w // 4), 32) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


# ------------------------------------------------------------------ position embedding

def test_interpolation_identity_at_native_size():
  grid = jax.random.normal(jax.random.key(0), (5, 7, 3))
  np.testing.assert_array_equal(interpolate_pos_embed(grid, (5, 7)), grid)


def test_interpolation_matches_bicubic_a075():
  # PyTorch bicubic (A=-0.75, align_corners=False), [0, 1] -> 4 samples, by hand: outer samples
  # sit at source -0.25 / 1.25, weight of the far tap cubic(1.25) = -0.10546875; inner samples
  # at 0.25 / 0.75 get cubic(0.75) + cubic(1.75) = 0.26171875 - 0.03515625 of the value 1.
  grid = jnp.array([0.0, 1.0]).reshape(1, 2, 1)
  out = interpolate_pos_embed(grid, (1, 4))[0, :, 0]
  np.testing.assert_allclose(out, [-0.10546875, 0.2265625, 0.7734375, 1.10546875], atol=1e-6)
  # Constants survive any resize (weights sum to one), also downsampling 14 -> 6.
  const = jnp.full((14, 14, 2), 0.3)
  np.testing.assert_allclose(interpolate_pos_embed(const, (6, 9)), 0.3, rtol=1e-6)


def _keys_cubic(x, a=-0.75):
  """The cubic convolution kernel PyTorch's bicubic mode uses, at distance x."""
  x = abs(x)
  if x <= 1:
    return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
  return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0


@pytest.mark.parametrize("mode", ["size", "dino"])
def test_interpolation_samples_where_each_mode_says(mode):
  """Output i of a 14 -> 6 resize (224 -> 96 px at patch 16) reads source position
  (i + 0.5) * 14 / 6 - 0.5 ("size") or (i + 0.5) * 14 / 6.1 - 0.5 (DINO's scale factor
  (6 + 0.1) / 14), from the 4 nearest taps with edge clamping."""
  values = np.random.default_rng(0).standard_normal(14)
  grid = jnp.broadcast_to(jnp.asarray(values, jnp.float32)[:, None, None], (14, 3, 1))
  out = np.asarray(interpolate_pos_embed(grid, (6, 3), mode))[:, 0, 0]
  step = 14 / 6 if mode == "size" else 14 / 6.1
  want = []
  for i in range(6):
    src = (i + 0.5) * step - 0.5
    taps = range(int(np.floor(src)) - 1, int(np.floor(src)) + 3)
    want.append(sum(_keys_cubic(src - k) * values[min(max(k, 0), 13)] for k in taps))
  np.testing.assert_allclose(out, want, atol=1e-5)
  with pytest.raises(ValueError, match="mode"):
    interpolate_pos_embed(grid, (6, 3), "bilinear")


# ------------------------------------------------------------------ mask token

def test_all_false_mask_equals_no_mask(tiny, images):
  mask = jnp.zeros((8, GRID * GRID), bool)
  np.testing.assert_array_equal(run(tiny, images, mask), run(tiny, images))


def test_masked_positions_use_the_mask_token(tiny, images):
  mask = jnp.zeros((8, GRID * GRID), bool).at[0, 3].set(True).at[0, 9].set(True)
  plain, masked = run(tiny, images), run(tiny, images, mask)
  # Image 1 has no masked patch: batch elements are independent.
  np.testing.assert_array_equal(masked[1], plain[1])
  assert float(jnp.abs(masked[0, 1 + 3] - plain[0, 1 + 3]).max()) > 1e-3
  # The masked patch's pixels no longer matter: patch 3 is row 0, columns 12..15.
  edited = images.at[0, 0:4, 12:16].add(5.0)
  np.testing.assert_allclose(run(tiny, edited, mask), masked, atol=1e-6)
  # Position is added after the replacement, so two masked tokens stay distinguishable.
  assert float(jnp.abs(masked[0, 1 + 3] - masked[0, 1 + 9]).max()) > 1e-3


def test_gradient_reaches_mask_token(tiny, images):
  graphdef, params = nnx.split(tiny)

  @jax.jit
  def grad_of_mask_token(mask):
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(images, mask) ** 2)
    return jax.grad(loss)(params)["mask_token"][...]

  some = jnp.zeros((8, GRID * GRID), bool).at[:, :5].set(True)
  assert float(jnp.abs(grad_of_mask_token(some)).sum()) > 0
  assert float(jnp.abs(grad_of_mask_token(jnp.zeros_like(some))).sum()) == 0.0


# ------------------------------------------------------------------ drop-path

def test_drop_path_only_with_a_key(tiny, images):
  teacher = run(tiny, images)
  np.testing.assert_array_equal(teacher, run(tiny, images))  # deterministic without a key
  k1, k2 = jax.random.key(7), jax.random.key(8)
  student1 = run(tiny, images, key=k1)
  np.testing.assert_array_equal(student1, run(tiny, images, key=k1))
  assert float(jnp.abs(student1 - teacher).max()) > 1e-3
  assert float(jnp.abs(student1 - run(tiny, images, key=k2)).max()) > 1e-3
  # With the rate at zero a key changes nothing.
  no_drop = nnx.clone(tiny)
  no_drop.drop_path_rate = 0.0
  np.testing.assert_array_equal(run(no_drop, images, key=k1), teacher)


# ------------------------------------------------------------------ layer options

def test_return_blocks(tiny, images):
  tokens, blocks = run(tiny, images, return_blocks=2)
  assert len(blocks) == 2 and all(b.shape == tokens.shape for b in blocks)
  np.testing.assert_array_equal(blocks[-1], tokens)
  assert float(jnp.abs(blocks[0] - tokens).max()) > 1e-3
  with pytest.raises(ValueError):
    tiny(images, return_blocks=3)


def test_scan_layers_same_parameters_and_outputs(tiny, images):
  scanned = create_vit("s", rngs=nnx.Rngs(1), scan_layers=True, remat=True, **TINY)
  loop_params = nnx.state(tiny, nnx.Param)
  scan_params = nnx.state(scanned, nnx.Param)
  assert _count(scan_params) == _count(loop_params)
  specs = nnx.get_partition_spec(scan_params)
  assert _spec(specs["blocks"]["attn"]["qkv"]["kernel"]) == (
      "layers", "embed", None, "heads", "kv")
  # Loading the loop model's weights, stacked, reproduces its outputs, drop-path included.
  pure = nnx.to_pure_dict(loop_params)
  depth = TINY["depth"]
  pure["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *[pure["blocks"][i] for i in range(depth)])
  nnx.replace_by_pure_dict(scan_params, pure)
  nnx.update(scanned, scan_params)
  key = jax.random.key(3)
  np.testing.assert_allclose(run(scanned, images), run(tiny, images), atol=1e-5)
  np.testing.assert_allclose(run(scanned, images, key=key), run(tiny, images, key=key), atol=1e-5)
  # The trainer's pattern: split once, merge inside a jitted pure function, differentiate.
  graphdef, params = nnx.split(scanned)
  loss = lambda p, x: jnp.mean(nnx.merge(graphdef, p)(x, key=key, return_blocks=1)[0] ** 2)
  grads = jax.jit(jax.grad(loss))(params, images)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == len(jax.tree.leaves(params))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert float(jnp.abs(grads["blocks"]["mlp"]["fc1"]["kernel"][...]).sum()) > 0


# ------------------------------------------------------------------ attention padding

@pytest.mark.parametrize("tokens", [37, 197])
def test_padded_attention_equals_plain(tokens):
  q, k, v = jax.random.normal(jax.random.key(tokens), (3, 2, tokens, 2, 8))

  @jax.jit
  def outputs_and_grads(q, k, v):
    res = []
    for pad in (0, 128):
      f = lambda *a: dot_product_attention(*a, pad_multiple=pad)
      res.append((f(q, k, v), jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), (0, 1, 2))(q, k, v)))
    return res

  plain, padded = outputs_and_grads(q, k, v)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), padded, plain)


def test_model_with_cudnn_padding_on_xla_equals_plain(tiny, images):
  padded = nnx.clone(tiny)
  for block in padded.blocks:
    block.attn.attention = "xla_padded"
  np.testing.assert_allclose(run(padded, images), run(tiny, images), atol=2e-5)


def test_bad_options_raise():
  with pytest.raises(ValueError):
    ViT(width=32, depth=1, num_heads=2, attention="flash", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError):
    ViT(width=24, depth=1, num_heads=2, attention="cudnn", rngs=nnx.Rngs(0))  # head dim 12
  with pytest.raises(ValueError):
    create_vit("xl", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ parameters

def _eqns(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (jit, custom_vjp, checkpoint) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def test_bf16_compute_float32_parameters_and_statistics(tiny, images):
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(tiny)))
  jaxpr = jax.make_jaxpr(lambda x: tiny(x))(images).jaxpr
  eqns = list(_eqns(jaxpr))
  contractions = [e for e in eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
  # 2 blocks x (qkv, q.k, p.v, proj, fc1, fc2) + the patch embedding.
  assert len(contractions) == 13
  assert all(v.aval.dtype == jnp.bfloat16 for e in contractions for v in e.invars)
  exps = [e for e in eqns if e.primitive.name == "exp"]
  assert exps and all(e.invars[0].aval.dtype == jnp.float32 for e in exps)  # softmax in f32
  assert jaxpr.outvars[0].aval.dtype == jnp.float32


def test_state_is_parameters_with_logical_axes(tiny):
  state = nnx.state(tiny)
  assert _count(state) == _count(nnx.state(tiny, nnx.Param))
  specs = nnx.get_partition_spec(nnx.state(tiny, nnx.Param))
  flat = dict(nnx.to_flat_state(specs))
  shapes = dict(nnx.to_flat_state(state))
  for path, spec in flat.items():
    names = _spec(spec)
    assert len(names) == shapes[path][...].ndim, path
    assert any(n is not None for n in names), path
    assert set(names) <= set(LOGICAL_AXES) | {None}, path
  assert _spec(flat[("blocks", 0, "attn", "qkv", "kernel")]) == ("embed", None, "heads", "kv")
  assert _spec(flat[("blocks", 1, "mlp", "fc2", "kernel")]) == ("mlp", "embed")
  assert _spec(flat[("patch_embed", "kernel")]) == (None, None, "conv_in", "embed")


def test_init_statistics(tiny):
  fc1 = np.concatenate([np.asarray(b.mlp.fc1.kernel[...]).ravel() for b in tiny.blocks])
  assert abs(fc1.std() / 0.02 - 1) < 0.05
  assert np.abs(fc1).max() <= 2 * 0.02 / 0.8796 + 1e-6  # truncated at 2 sigma
  assert abs(np.asarray(tiny.pos_embed[...]).std() / 0.02 - 1) < 0.15
  for b in tiny.blocks:
    np.testing.assert_array_equal(b.attn.qkv.bias[...], 0.0)
    np.testing.assert_array_equal(b.norm1.scale[...], 1.0)
    np.testing.assert_array_equal(b.norm1.bias[...], 0.0)


# ------------------------------------------------------------------ projection head

def test_projection_head():
  head = ProjectionHead(32, rngs=nnx.Rngs(0))
  assert head.fc1.kernel.shape == (32, 2048) and head.fc2.kernel.shape == (2048, 2048)
  assert head.fc3.kernel.shape == (2048, 256)
  assert abs(np.asarray(head.fc2.kernel[...]).std() / 0.02 - 1) < 0.01
  x = jax.random.normal(jax.random.key(0), (2, 17, 32))
  y = head(x)
  assert y.shape == (2, 17, 256) and y.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)
  # Token-wise: a token's embedding does not depend on the others.
  np.testing.assert_allclose(head(x[:, 5:6]), y[:, 5:6], atol=1e-6)
  specs = nnx.get_partition_spec(nnx.state(head))
  assert _spec(specs["fc3"]["kernel"]) == ("proj_hidden", "proj_out")
  assert _count(nnx.state(head)) == _count(nnx.state(head, nnx.Param))


def test_logical_axes_shard_over_a_mesh(tiny, images):
  """Map "embed" to an FSDP axis: the sharded forward equals the unsharded one."""
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = {"embed": "fsdp"}
  graphdef, params = nnx.split(tiny)
  specs = nnx.get_partition_spec(params)
  shardings = jax.tree.map(
      lambda v: jax.NamedSharding(mesh, jax.P(*(rules.get(n) for n in _spec(v)))), specs,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  sharded = jax.device_put(params, shardings)
  kernel = sharded["blocks"][0]["mlp"]["fc1"]["kernel"][...]
  assert kernel.sharding.spec == jax.P("fsdp", None)
  # FSDP: the batch is split over both axes, so XLA gathers each weight before use.
  x = jax.device_put(images, jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))
  out = _jitted(graphdef, sharded, x, None, None, 0)
  np.testing.assert_allclose(out, run(tiny, images), atol=1e-5)
