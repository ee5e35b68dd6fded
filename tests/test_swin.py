"""Tests for the Swin backbone (sove_jax/models/swin.py).

Behavior is checked on a tiny Swin (width 16, depths (2, 2, 2), heads (2, 4, 8), window 3,
patch 2, built for 24 px: stage grids 12, 6, 3, so the last stage has one window and no shift,
as Swin-T's at 224 px). Swin-T's parameter count and full-size shapes come from abstract
evaluation. Parity is against a PyTorch forward written here from the reference architecture
(Liu et al. 2021; iBOT's Swin for the padding of other sizes and the mask token), sharing no
code with the module.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sove_jax.models import LOGICAL_AXES, ProjectionHead
from sove_jax.models.network import Network
from sove_jax.models.swin import (SwinBlock, create_swin, relative_position_index,
                                  shifted_window_mask, stage_windows, upsample_mask)

torch = pytest.importorskip("torch")
F = torch.nn.functional

TINY = dict(embed_dim=16, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=3, patch_size=2,
            image_size=24, drop_path_rate=0.5, num_classes=5)
FINAL = 3  # final grid side at 24 px: 24 / 2 = 12 patches, merged twice


def _count(state):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def _spec(v):
  return tuple(v.get_value() if isinstance(v, nnx.Variable) else v)


def _random_swin(seed, **overrides):
  """A tiny float32 Swin with every parameter random (LayerNorm scales 1 + N(0, 0.1), the rest
  N(0, 0.1), relative position tables N(0, 1) so the bias matters), filled from NumPy."""
  model = nnx.eval_shape(lambda: create_swin(
      rngs=nnx.Rngs(0), **{**TINY, "dtype": jnp.float32, **overrides}))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)

  def value(path, x):
    name = path[-1].key
    std = 1.0 if name == "relative_position_bias_table" else 0.1
    return jnp.asarray((name == "scale") + std * rng.standard_normal(x.shape), jnp.float32)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(value, nnx.to_pure_dict(state)))
  nnx.update(model, state)
  return model


@pytest.fixture(scope="module")
def tiny():
  return _random_swin(0)


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.key(1), (4, 24, 24, 3), jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "return_blocks"))
def _jitted(graphdef, params, x, mask, key, return_blocks):
  return nnx.merge(graphdef, params)(x, mask, key=key, return_blocks=return_blocks)


def run(model, x, mask=None, *, key=None, return_blocks=0):
  graphdef, params = nnx.split(model)
  return _jitted(graphdef, params, x, mask, key, return_blocks)


# ------------------------------------------------------------------ the PyTorch reference

def _torch_relative_index(window):
  """The reference's construction: pairwise coordinate differences, shifted to start at 0, the
  row offset scaled by the number of column offsets."""
  coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
  flat = coords.flatten(1)
  rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
  rel[:, :, 0] += window - 1
  rel[:, :, 1] += window - 1
  rel[:, :, 0] *= 2 * window - 1
  return rel.sum(-1)


def _torch_state(model):
  """Our parameters in the PyTorch layout: Linear weights [out, in], Conv2d [out, in, kh, kw]."""
  p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
  lin = lambda d: (t(np.asarray(d["kernel"]).reshape(-1, np.asarray(d["bias"]).size).T),
                   t(np.asarray(d["bias"]).reshape(-1)))
  sd = {"patch_embed.proj.weight": t(np.transpose(p["patch_embed"]["kernel"], (3, 2, 0, 1))),
        "patch_embed.proj.bias": t(p["patch_embed"]["bias"]),
        "patch_embed.norm.weight": t(p["patch_norm"]["scale"]),
        "patch_embed.norm.bias": t(p["patch_norm"]["bias"]),
        "masked_embed": t(p["mask_token"]),
        "norm.weight": t(p["norm"]["scale"]), "norm.bias": t(p["norm"]["bias"])}
  if "head" in p:
    sd["head.weight"], sd["head.bias"] = lin(p["head"])
  for i, stage in p["layers"].items():
    for j, blk in stage["blocks"].items():
      pre = f"layers.{i}.blocks.{j}."
      for norm in ("norm1", "norm2"):
        sd[pre + norm + ".weight"] = t(blk[norm]["scale"])
        sd[pre + norm + ".bias"] = t(blk[norm]["bias"])
      sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"] = lin(blk["attn"]["qkv"])
      sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"] = lin(blk["attn"]["proj"])
      sd[pre + "attn.relative_position_bias_table"] = t(
          blk["attn"]["relative_position_bias_table"])
      for fc in ("fc1", "fc2"):
        sd[pre + f"mlp.{fc}.weight"], sd[pre + f"mlp.{fc}.bias"] = lin(blk["mlp"][fc])
    if stage.get("downsample"):
      pre = f"layers.{i}.downsample."
      sd[pre + "norm.weight"] = t(stage["downsample"]["norm"]["scale"])
      sd[pre + "norm.bias"] = t(stage["downsample"]["norm"]["bias"])
      sd[pre + "reduction.weight"] = t(np.asarray(stage["downsample"]["reduction"]).T)
  return sd


def _torch_swin(sd, images_nhwc, *, depths, heads, window, patch, image_size, eps=1e-6,
                mask=None):
  """Reference Swin forward: [pooled, tokens] after the final norm, and the classifier logits.

  Windows follow the reference's construction rule for `image_size`; other sizes are padded to
  window multiples after norm1 (padded keys attended, shifted-window regions over the padded
  grid) and odd grids padded before merging, as iBOT's Swin. The mask ([B, h, w] at the final
  grid) is repeated over the patch grid and cropped to it.
  """
  ln = lambda x, pre: F.layer_norm(x, x.shape[-1:], sd[pre + ".weight"], sd[pre + ".bias"], eps)
  linear = lambda x, pre: F.linear(x, sd[pre + ".weight"], sd.get(pre + ".bias"))
  x = F.conv2d(images_nhwc.permute(0, 3, 1, 2), sd["patch_embed.proj.weight"],
               sd["patch_embed.proj.bias"], stride=patch)
  b, c, h, w = x.shape
  x = ln(x.flatten(2).transpose(1, 2), "patch_embed.norm").reshape(b, h, w, c)
  if mask is not None:
    f = 2 ** (len(depths) - 1)
    up = mask.repeat_interleave(f, 1).repeat_interleave(f, 2)[:, :h, :w]
    x = torch.where(up[..., None], sd["masked_embed"][0], x)
  x = x.reshape(b, h * w, c)
  res = image_size // patch  # the construction-time resolution of each stage
  for s, depth in enumerate(depths):
    ws, shift = window, window // 2
    if res <= ws:
      ws, shift = res, 0
    n, nh = ws * ws, heads[s]
    index = _torch_relative_index(ws).view(-1)
    for j in range(depth):
      pre = f"layers.{s}.blocks.{j}."
      sh = shift if j % 2 else 0
      shortcut = x
      y = ln(x, pre + "norm1").view(b, h, w, c)
      y = F.pad(y, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
      hp, wp = y.shape[1], y.shape[2]
      attn_mask = None
      if sh:
        y = torch.roll(y, shifts=(-sh, -sh), dims=(1, 2))
        img = torch.zeros(hp, wp)
        label = 0
        for hs in (slice(0, -ws), slice(-ws, -sh), slice(-sh, None)):
          for wsl in (slice(0, -ws), slice(-ws, -sh), slice(-sh, None)):
            img[hs, wsl] = label
            label += 1
        mw = img.view(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, n)
        attn_mask = (mw[:, None, :] - mw[:, :, None]).ne(0).double() * -100.0
      win = y.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
      bw = win.shape[0]
      qkv = linear(win, pre + "attn.qkv").reshape(bw, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
      q, k, v = qkv[0] * (c // nh) ** -0.5, qkv[1], qkv[2]
      attn = q @ k.transpose(-2, -1)
      table = sd[pre + "attn.relative_position_bias_table"]
      attn = attn + table[index].view(n, n, nh).permute(2, 0, 1)[None]
      if attn_mask is not None:
        nw = attn_mask.shape[0]
        attn = (attn.view(bw // nw, nw, nh, n, n) + attn_mask[None, :, None]).view(bw, nh, n, n)
      out = linear((attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c), pre + "attn.proj")
      y = out.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
      if sh:
        y = torch.roll(y, shifts=(sh, sh), dims=(1, 2))
      x = shortcut + y[:, :h, :w].reshape(b, h * w, c)
      hidden = F.gelu(linear(ln(x, pre + "norm2"), pre + "mlp.fc1"))
      x = x + linear(hidden, pre + "mlp.fc2")
    if s < len(depths) - 1:
      pre = f"layers.{s}.downsample."
      y = x.view(b, h, w, c)
      y = F.pad(y, (0, 0, 0, w % 2, 0, h % 2))
      y = torch.cat([y[:, 0::2, 0::2], y[:, 1::2, 0::2], y[:, 0::2, 1::2], y[:, 1::2, 1::2]], -1)
      h, w, c = y.shape[1], y.shape[2], 2 * c
      x = F.linear(ln(y.reshape(b, h * w, 2 * c), pre + "norm"), sd[pre + "reduction.weight"])
      res //= 2
  x = ln(x, "norm")
  pooled = x.mean(1)
  logits = linear(pooled, "head") if "head.weight" in sd else None
  return torch.cat([pooled[:, None], x], 1), logits


# ------------------------------------------------------------------ sizes and shapes

def test_swin_t_parameter_count():
  """The reference Swin-T's learnable parameters: patch embedding and its norm, 12 blocks
  (norms, qkv, proj, relative position tables, MLPs), 3 patch mergings, the final norm and the
  1000-class classifier; buffers (relative position index, attention masks) are not parameters.
  Ours holds one more: the 96-wide mask token."""
  model = nnx.eval_shape(lambda: create_swin("t", num_classes=1000, rngs=nnx.Rngs(0)))
  params = _count(nnx.state(model, nnx.Param))
  assert params - model.mask_token.size == 28_288_354
  assert _count(nnx.state(model)) == params  # nothing but parameters in the module
  backbone = nnx.eval_shape(lambda: create_swin("t", rngs=nnx.Rngs(0)))
  assert _count(nnx.state(backbone, nnx.Param)) == 27_519_354 + 96
  assert backbone.windows == ((7, 3), (7, 3), (7, 3), (7, 0))  # last stage: one 7x7 window
  assert backbone.width == 768 and backbone.depth == 12 and backbone.stride == 32
  # Swin-T/14, the paper's (window 14 as iBOT and EsViT train it): the bias tables of stages 1-3
  # grow from 13^2 to 27^2 rows (stage 4's 7x7 grid keeps a 7x7 window): +560 x (2*3 + 2*6 + 6*12).
  t14 = nnx.eval_shape(lambda: create_swin("t", window_size=14, num_classes=1000,
                                           rngs=nnx.Rngs(0)))
  assert _count(nnx.state(t14, nnx.Param)) - 96 == 28_288_354 + 50_400
  assert t14.windows == ((14, 7), (14, 7), (14, 0), (7, 0))


def test_swin_t_output_shapes():
  model = nnx.eval_shape(lambda: create_swin("t", rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  fn = lambda s, x: nnx.merge(graphdef, s)(x, return_blocks=3)
  # 224: 56 -> 28 -> 14 -> 7; 96: 24 -> 12 -> 6 -> 3; 224x160: 7x5 final tokens.
  for (h, w), final in [((224, 224), (7, 7)), ((96, 96), (3, 3)), ((224, 160), (7, 5))]:
    assert model.token_grid(h, w) == final
    tokens, blocks = jax.eval_shape(fn, state, jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32))
    assert tokens.shape == (2, 1 + final[0] * final[1], 768) and tokens.dtype == jnp.float32
    # Last 3 blocks: stage 3's last (14x14 at 224, no final norm), then stage 4's two.
    stage3 = (-(-h // 16)) * (-(-w // 16))
    assert [b.shape for b in blocks] == [(2, 1 + stage3, 384), tokens.shape, tokens.shape]


def test_stage_windows_rule():
  assert stage_windows((56, 56), 7, 4) == [(7, 3), (7, 3), (7, 3), (7, 0)]
  # Built at 96 px (iBOT's rule shrinks windows to small grids and drops their shift).
  assert stage_windows((24, 24), 7, 4) == [(7, 3), (7, 3), (6, 0), (3, 0)]
  assert stage_windows((12, 12), 3, 3) == [(3, 1), (3, 1), (3, 0)]


def test_tiny_outputs_at_other_sizes(tiny):
  for (h, w) in [(24, 24), (16, 16), (20, 24), (8, 8)]:
    out = run(tiny, jnp.ones((2, h, w, 3)))
    fh, fw = tiny.token_grid(h, w)
    assert out.shape == (2, 1 + fh * fw, 64) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    # The [CLS] role: the average of the final tokens.
    np.testing.assert_allclose(out[:, 0], out[:, 1:].mean(1), atol=1e-6)


def test_return_blocks(tiny, images):
  out, blocks = run(tiny, images, return_blocks=6)
  assert [b.shape for b in blocks] == [(4, 1 + 144, 16)] * 2 + [(4, 1 + 36, 32)] * 2 + \
      [(4, 1 + 9, 64)] * 2
  np.testing.assert_array_equal(blocks[-1], out)
  for b in blocks:
    np.testing.assert_allclose(b[:, 0], b[:, 1:].mean(1), atol=1e-6)
  with pytest.raises(ValueError, match="return_blocks"):
    tiny(images, return_blocks=7)


# ------------------------------------------------------------------ windows

@pytest.mark.parametrize("window", [7, 3, 1])
def test_relative_position_index_is_the_references(window):
  np.testing.assert_array_equal(relative_position_index(window),
                                _torch_relative_index(window).numpy())


@pytest.mark.parametrize("shift,h,w", [(0, 6, 6), (1, 6, 6), (1, 5, 4), (0, 5, 4), (1, 3, 3)])
def test_attention_stays_inside_windows(shift, h, w):
  """Which input tokens each output token depends on, from the block's Jacobian, against the
  paper's partition: regular windows of side 3, or the same partition displaced by the shift
  (partial windows at the borders), over the grid padded to a multiple of 3. Exact zeros: the
  cyclic shift must not let a border token see the opposite border."""
  block = SwinBlock(8, 2, 3, shift, 2.0, eps=1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
                    rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, h, w, 8))
  jac = jax.jit(jax.jacfwd(lambda v: block(v)))(x)  # [1, h, w, 8, 1, h, w, 8]
  dep = np.asarray(jnp.any(jac[0, :, :, :, 0] != 0, axis=(2, 5)))  # [h, w, h, w]
  group = lambda i: (i + 3 - shift) // 3 if shift else i // 3
  rows, cols = np.arange(h), np.arange(w)
  same_row = group(rows)[:, None] == group(rows)[None, :]
  same_col = group(cols)[:, None] == group(cols)[None, :]
  expected = same_row[:, None, :, None] & same_col[None, :, None, :]
  np.testing.assert_array_equal(dep, expected)
  if shift and h == 6:
    assert not dep[0, 0, 5, 5] and dep[5, 5, 4, 4]  # wrapped together, yet kept apart


def test_shifted_window_mask_regions():
  m = shifted_window_mask(6, 6, 3, 1)  # 4 windows of 9 tokens
  assert m.shape == (4, 9, 9) and m.dtype == bool
  assert m[0].all()  # the top-left window holds no wrapped token
  # Bottom-right window, token rows 0..2 x cols 0..2: rows/cols 0-1 are original 4-5, row/col 2
  # wrapped from 0: four regions of sizes 4, 2, 2, 1.
  sizes = sorted(int(m[3][t].sum()) for t in range(9))
  assert sizes == [1, 2, 2, 2, 2, 4, 4, 4, 4]


# ------------------------------------------------------------------ masked-image modelling

def test_upsample_mask_blocks_and_crop():
  mask = jnp.array([[[True, False, False], [False, False, True]]])  # [1, 2, 3]
  up = np.asarray(upsample_mask(mask, 4, (7, 10)))
  expected = np.array([[bool(mask[0, r // 4, c // 4]) for c in range(10)] for r in range(7)])
  np.testing.assert_array_equal(up[0], expected)
  with pytest.raises(ValueError, match="does not cover"):
    upsample_mask(mask, 4, (9, 10))


def test_all_false_mask_equals_no_mask(tiny, images):
  np.testing.assert_array_equal(run(tiny, images, jnp.zeros((4, FINAL * FINAL), bool)),
                                run(tiny, images))


def test_masked_cells_use_the_mask_token(tiny, images):
  # Final cell (0, 2) of image 0 covers patches rows 0-3, cols 8-11: pixels rows 0-7, cols 16-23.
  mask = jnp.zeros((4, FINAL * FINAL), bool).at[0, 2].set(True)
  plain, masked = run(tiny, images), run(tiny, images, mask)
  np.testing.assert_array_equal(masked[1:], plain[1:])  # other images untouched
  assert float(jnp.abs(masked[0] - plain[0]).max()) > 1e-3
  edited = images.at[0, 0:8, 16:24].add(5.0)
  np.testing.assert_allclose(run(tiny, edited, mask), masked, atol=1e-6)
  outside = images.at[0, 8:16, 16:24].add(5.0)
  assert float(jnp.abs(run(tiny, outside, mask)[0] - masked[0]).max()) > 1e-3


def test_gradient_reaches_mask_token(tiny, images):
  graphdef, params = nnx.split(tiny)

  @jax.jit
  def grad_of_mask_token(mask):
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(images, mask) ** 2)
    return jax.grad(loss)(params)["mask_token"][...]

  some = jnp.zeros((4, FINAL * FINAL), bool).at[:, :2].set(True)
  assert float(jnp.abs(grad_of_mask_token(some)).sum()) > 0
  assert float(jnp.abs(grad_of_mask_token(jnp.zeros_like(some))).sum()) == 0.0


def test_mask_at_the_patch_grid_is_refused(tiny, images):
  with pytest.raises(ValueError, match="final stage's 3x3 grid"):
    tiny(images, jnp.zeros((4, 12 * 12), bool))


# ------------------------------------------------------------------ parity with PyTorch

@pytest.mark.parametrize("h,w,masked", [(24, 24, True), (16, 16, False), (20, 24, True)])
def test_forward_matches_pytorch_reference(tiny, h, w, masked):
  """24 px: the built size; 16 px: grids 8, 4, 2 padded to windows; 20x24: an odd grid merged
  with padding and a mask cropped at the border."""
  x = jax.random.normal(jax.random.key(h + w), (2, h, w, 3), jnp.float32)
  fh, fw = tiny.token_grid(h, w)
  mask = None
  if masked:
    mask = jax.random.bernoulli(jax.random.key(3), 0.4, (2, fh * fw))
  ours = run(tiny, x, mask)
  with torch.no_grad():
    ref, logits = _torch_swin(
        _torch_state(tiny), torch.from_numpy(np.asarray(x, np.float64)), depths=TINY["depths"],
        heads=TINY["num_heads"], window=3, patch=2, image_size=24,
        mask=None if mask is None else torch.from_numpy(np.array(mask).reshape(2, fh, fw)))
  np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4, rtol=1e-4)
  if h == w == 24 and masked:
    # The classifier reads the pooled token (the reference's ImageNet head).
    graphdef, params = nnx.split(tiny)
    ours_logits = jax.jit(lambda p, v: nnx.merge(graphdef, p).classify(v))(params, x)
    _, ref_logits = _torch_swin(
        _torch_state(tiny), torch.from_numpy(np.asarray(x, np.float64)), depths=TINY["depths"],
        heads=TINY["num_heads"], window=3, patch=2, image_size=24)
    np.testing.assert_allclose(ours_logits, ref_logits.numpy(), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ in the SOVE network

def test_network_calls_as_the_step_does(images):
  """The step's three calls: masked student globals, unmasked teacher globals, student locals
  ([CLS] only). The [CLS] embedding is the head of the pooled token; patch embeddings are one
  per final-grid cell, matching the mask the loss reads."""
  swin = create_swin(rngs=nnx.Rngs(0), **{**TINY, "num_classes": 0, "dtype": jnp.float32})
  net = Network(swin, ProjectionHead(swin.width, hidden_dim=32, out_dim=16, dtype=jnp.float32,
                                     rngs=nnx.Rngs(1)))
  mask = jnp.zeros((4, FINAL * FINAL), bool).at[:, ::2].set(True)
  cls, patches = net(images, mask, key=jax.random.key(0))
  assert cls.shape == (4, 16) and patches.shape == (4, FINAL * FINAL, 16)
  np.testing.assert_allclose(jnp.linalg.norm(patches, axis=-1), 1.0, rtol=1e-5)
  t_cls, _ = net(images)
  local_cls, none = net(images[:, :12, :12], key=jax.random.key(1), patch_tokens=False)
  assert none is None and local_cls.shape == t_cls.shape == (4, 16)
  np.testing.assert_allclose(net(images, patch_tokens=False)[0], t_cls, atol=1e-6)


# ------------------------------------------------------------------ determinism and drop-path

def test_determinism_and_drop_path(tiny, images):
  np.testing.assert_array_equal(run(tiny, images), run(tiny, images))
  a = nnx.state(create_swin(rngs=nnx.Rngs(7), **TINY), nnx.Param)
  b = nnx.state(create_swin(rngs=nnx.Rngs(7), **TINY), nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  key = jax.random.key(5)
  dropped = run(tiny, images, key=key)
  np.testing.assert_array_equal(dropped, run(tiny, images, key=key))
  assert float(jnp.abs(dropped - run(tiny, images)).max()) > 1e-3
  assert float(jnp.abs(dropped - run(tiny, images, key=jax.random.key(6))).max()) > 1e-3
  no_drop = _random_swin(0, drop_path_rate=0.0)
  np.testing.assert_array_equal(run(no_drop, images, key=key), run(tiny, images))


def test_remat_same_gradients(images):
  plain, remat = _random_swin(1), _random_swin(1, remat=True)

  def grads(model):
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(images, key=jax.random.key(0)) ** 2)
    return jax.jit(jax.grad(loss))(params)

  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5),
               grads(plain), grads(remat))


# ------------------------------------------------------------------ dtypes and sharding

def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def test_bf16_compute_float32_parameters_and_statistics(images):
  model = create_swin(rngs=nnx.Rngs(0), **{**TINY, "num_classes": 0})  # bf16 by default
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model)))
  eqns = list(_eqns(jax.make_jaxpr(lambda x: model(x))(images).jaxpr))
  contractions = [e for e in eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
  # 6 blocks x (qkv, q.k, p.v, proj, fc1, fc2) + 2 mergings + the patch embedding.
  assert len(contractions) == 39
  assert all(v.aval.dtype == jnp.bfloat16 for e in contractions for v in e.invars)
  exps = [e for e in eqns if e.primitive.name == "exp"]
  assert exps and all(e.invars[0].aval.dtype == jnp.float32 for e in exps)  # softmax in f32
  out = jax.eval_shape(lambda x: model(x), images)
  assert out.dtype == jnp.float32


def test_parameters_carry_logical_axes(tiny):
  state = nnx.state(tiny, nnx.Param)
  flat = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
  shapes = dict(nnx.to_flat_state(state))
  for path, spec in flat.items():
    names = _spec(spec)
    assert len(names) == shapes[path][...].ndim, path
    assert any(n is not None for n in names), path
    assert set(names) <= set(LOGICAL_AXES) | {None}, path
  attn = ("layers", 1, "blocks", 1, "attn")
  assert _spec(flat[attn + ("qkv", "kernel")]) == ("embed", None, "heads", "kv")
  assert _spec(flat[attn + ("relative_position_bias_table",)]) == (None, "heads")
  assert _spec(flat[("layers", 0, "downsample", "reduction")]) == ("mlp", "embed")
  assert _spec(flat[("mask_token",)]) == (None, "embed")
  assert _spec(flat[("head", "kernel")]) == ("embed", "classes")


def test_logical_axes_shard_over_a_mesh(tiny, images):
  """Map "embed" to an FSDP axis: the sharded forward equals the unsharded one."""
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  graphdef, params = nnx.split(tiny)
  shardings = jax.tree.map(
      lambda v: jax.NamedSharding(mesh, jax.P(*("fsdp" if n == "embed" else None
                                                for n in _spec(v)))),
      nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, nnx.Variable))
  sharded = jax.device_put(params, shardings)
  assert sharded["layers"][0]["blocks"][0]["mlp"]["fc1"]["kernel"][...].sharding.spec == \
      jax.P("fsdp", None)
  batch = jnp.concatenate([images, images[::-1]])  # 8 images, one per device
  x = jax.device_put(batch, jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))
  np.testing.assert_allclose(_jitted(graphdef, sharded, x, None, None, 0), run(tiny, batch),
                             atol=1e-5)


def test_init_and_bad_options():
  model = create_swin(rngs=nnx.Rngs(0), **TINY)
  token = np.asarray(model.mask_token[...])
  # Not zero (a zero token meets the first LayerNorm at its singular point), within 2 sigma.
  assert np.abs(token).min() > 0 and np.abs(token).max() <= 2 * 0.02 / 0.8796 + 1e-6
  np.testing.assert_array_equal(model.layers[0].blocks[0].norm1.scale[...], 1.0)
  np.testing.assert_array_equal(model.layers[0].blocks[0].attn.qkv.bias[...], 0.0)
  cases = [(dict(depths=(2, 2), num_heads=(2,)), "equal length"),
           (dict(num_heads=(3, 4, 8)), "not divisible"),
           (dict(image_size=1), "smaller than one"),
           (dict(window_size=0), "must be >= 1")]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      create_swin(rngs=nnx.Rngs(0), **{**TINY, **overrides})
  with pytest.raises(ValueError, match="unknown Swin variant"):
    create_swin("x", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no classifier"):
    create_swin(rngs=nnx.Rngs(0), **{**TINY, "num_classes": 0}).classify(jnp.ones((1, 24, 24, 3)))


# --- the evaluations read a Swin's tokens on its own grid -----------------------------------------

def test_patch_features_of_a_swin_land_on_its_token_grid(tiny):
  """A Swin's final tokens sit one per `stride` pixels (here 2 x 2 x 2 = 8), not one per patch:
  a 24 x 32 image gives a 3 x 4 grid whose cell (r, c) is token 1 + 4 r + c. (Reshaped by the
  patch size, as before, the 12 tokens cannot fill a 12 x 16 grid.)"""
  from sove_jax import sharding
  from sove_jax.evaluate import images as images_lib
  assert images_lib.token_stride(tiny) == tiny.stride == 8
  x = np.random.default_rng(0).normal(size=(2, 24, 32, 3)).astype(np.float32)
  mesh = sharding.batch_mesh(jax.devices()[:1])
  grid = np.asarray(images_lib.patch_features(tiny, mesh=mesh, normalize=False)(x))
  tokens = np.asarray(tiny(x))
  assert grid.shape == (2, 3, 4, tiny.width)
  for r in range(3):
    for c in range(4):
      np.testing.assert_allclose(grid[:, r, c], tokens[:, 1 + 4 * r + c], rtol=1e-5, atol=1e-6)
  # An image that is not a multiple of the stride is cut to whole strides first.
  cut = np.asarray(images_lib.patch_features(tiny, mesh=mesh, normalize=False)(
      np.pad(x, ((0, 0), (0, 5), (0, 7), (0, 0)))))
  np.testing.assert_allclose(cut, grid, rtol=1e-5, atol=1e-6)


def test_pca_and_video_of_a_swin_use_its_stride(tiny, tmp_path):
  """The PCA picture draws one block per token of stride 8; propagated label maps upsample by it."""
  import ml_collections
  from PIL import Image

  from sove_jax.evaluate import pca, video
  path = tmp_path / "a.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), np.uint8)).save(path)
  config = ml_collections.ConfigDict({"data": {"mean": (0.5,) * 3, "std": (0.25,) * 3,
                                               "global_size": 24}})
  canvas, summary = pca.pca_picture(config, tiny, [path], image_size=36, batch_size=8)
  assert summary["image_size"] == 32 and summary["grid"] == [4, 4]
  assert canvas.shape == (32, 2 * 32 + pca.GAP, 3)
  soft = jnp.zeros((3, 4, 2)).at[1, 2, 1].set(1.0)
  labels = np.asarray(video.label_map(soft, tiny.stride))
  assert labels.shape == (24, 32) and labels[12, 20] == 1 and labels[0, 0] == 0
