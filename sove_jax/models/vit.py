"""Vision Transformer backbone for the SOVE student and teacher (docs/method.md §9), in Flax NNX.

Design points, each for a reason:
- Parameters are float32 and carry logical axis names (`nnx.with_partitioning`), so a config
  maps them onto a mesh (FSDP) without touching this file. Eager sharding is off: the model can
  be built anywhere (tests, `nnx.eval_shape`); the trainer places it with
  `nnx.get_partition_spec` + its axis rules.
- Matmuls and attention run in `dtype` (bf16); LayerNorm, softmax statistics and the residual
  stream stay float32, as PyTorch autocast does for DINO; the output is float32.
- Drop-path randomness comes only from the `key` argument, so the module holds parameters and
  nothing else, and a pure `nnx.split` / `nnx.merge` step can run it.
- Attention goes through `jax.nn.dot_product_attention`; `attention="cudnn"` pads the sequence to
  a multiple cuDNN flash attention accepts and masks the padded keys.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# width, depth, heads
VARIANTS = {"ti": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}

# cuDNN flash attention refuses sequence lengths such as 197 (224 px); its kernels tile the
# sequence in blocks of 64/128, so padding to a multiple of 128 gives a length it accepts.
CUDNN_SEQ_MULTIPLE = 128

# name -> (jax.nn.dot_product_attention implementation, sequence padding multiple).
# "xla_padded" runs the cudnn path's padding and masking on XLA, so CPU tests can check it.
ATTENTION = {
    "xla": (None, 0),
    "cudnn": ("cudnn", CUDNN_SEQ_MULTIPLE),
    "xla_padded": (None, CUDNN_SEQ_MULTIPLE),
}

LN_EPS = 1e-6
INIT_STD = 0.02
# jax's truncated normal (cut at +-2 sigma) has std 0.8796 sigma; dividing by it makes the
# initialized weights' standard deviation exactly INIT_STD.
_TRUNC_CORRECTION = 0.87962566103423978


def trunc_normal(std: float = INIT_STD):
  """Truncated normal (+-2 sigma) whose actual standard deviation is `std` (DINO/timm init)."""
  return jax.nn.initializers.truncated_normal(stddev=std / _TRUNC_CORRECTION)


def _named(init, names: Sequence[str | None]):
  """Attach logical axis names; eager sharding off so construction never needs a mesh."""
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


class Dense(nnx.Module):
  """Dense layer contracting several input axes into several output axes.

  Multi-axis kernels keep the per-head layout ([D, 3, H, Dh] for qkv, [H, Dh, D] for the output
  projection) so heads and head dims get their own logical axis names.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *,
               in_names: Sequence[str | None], out_names: Sequence[str | None],
               dtype=jnp.bfloat16, param_dtype=jnp.float32, out_dtype=None,
               rngs: nnx.Rngs):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    assert len(in_names) == len(in_shape) and len(out_names) == len(out_shape)
    self.kernel = nnx.Param(_named(trunc_normal(), (*in_names, *out_names))(
        rngs.params(), in_shape + out_shape, param_dtype))
    self.bias = nnx.Param(_named(jax.nn.initializers.zeros, out_names)(
        rngs.params(), out_shape, param_dtype))
    self.num_in = len(in_shape)
    self.dtype = dtype
    self.out_dtype = out_dtype

  def __call__(self, x):
    n = self.num_in
    kernel = self.kernel[...].astype(self.dtype)
    y = jax.lax.dot_general(
        x.astype(self.dtype), kernel,
        ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())),
        preferred_element_type=self.out_dtype)
    return y + self.bias[...].astype(y.dtype)


def layer_norm(width: int, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm (eps 1e-6) computed in float32 whatever the compute dtype."""
  return nnx.LayerNorm(
      width, epsilon=LN_EPS, dtype=jnp.float32, param_dtype=param_dtype,
      scale_init=_named(jax.nn.initializers.ones, ("embed",)),
      bias_init=_named(jax.nn.initializers.zeros, ("embed",)), rngs=rngs)


def dot_product_attention(q, k, v, *, implementation=None, pad_multiple: int = 0):
  """Multi-head attention on [B, T, H, Dh] inputs.

  With `pad_multiple`, the sequence is zero-padded to a multiple of it and the padded keys are
  masked through `key_value_seq_lengths`; padded queries are computed and sliced off. This is
  what lets cuDNN flash attention take 197 or 37 tokens.
  """
  t = q.shape[1]
  if not pad_multiple or t % pad_multiple == 0:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  padded = -(-t // pad_multiple) * pad_multiple
  widths = ((0, 0), (0, padded - t), (0, 0), (0, 0))
  q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
  lengths = jnp.full((q.shape[0],), t, jnp.int32)
  out = jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :t]


class Attention(nnx.Module):
  """Multi-head self-attention: fused qkv projection, attention kernel, output projection."""

  def __init__(self, width: int, num_heads: int, *, dtype, param_dtype, attention: str,
               rngs: nnx.Rngs):
    head_dim = width // num_heads
    self.qkv = Dense((width,), (3, num_heads, head_dim), in_names=("embed",),
                     out_names=(None, "heads", "kv"), dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    self.proj = Dense((num_heads, head_dim), (width,), in_names=("heads", "kv"),
                      out_names=("embed",), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention = attention

  def __call__(self, x):
    qkv = self.qkv(x)  # [B, T, 3, H, Dh]
    implementation, pad_multiple = ATTENTION[self.attention]
    out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                implementation=implementation, pad_multiple=pad_multiple)
    return self.proj(out)


class Mlp(nnx.Module):
  """Linear-GELU-Linear; exact (erf) GELU as PyTorch's nn.GELU."""

  def __init__(self, width: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.fc1 = Dense((width,), (hidden,), in_names=("embed",), out_names=("mlp",),
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = Dense((hidden,), (width,), in_names=("mlp",), out_names=("embed",),
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def drop_path(x, key, rate):
  """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""
  if key is None or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  survive = jax.random.bernoulli(key, keep, shape)
  return jnp.where(survive, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class Block(nnx.Module):
  """Pre-norm transformer block; the residual stream stays float32."""

  def __init__(self, width: int, num_heads: int, mlp_hidden: int, *, dtype, param_dtype,
               attention: str, rngs: nnx.Rngs):
    self.norm1 = layer_norm(width, param_dtype, rngs)
    self.attn = Attention(width, num_heads, dtype=dtype, param_dtype=param_dtype,
                          attention=attention, rngs=rngs)
    self.norm2 = layer_norm(width, param_dtype, rngs)
    self.mlp = Mlp(width, mlp_hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, *, key=None, rate=0.0):
    k1, k2 = (None, None) if key is None else tuple(jax.random.split(key))
    x = x + drop_path(self.attn(self.norm1(x)), k1, rate).astype(x.dtype)
    x = x + drop_path(self.mlp(self.norm2(x)), k2, rate).astype(x.dtype)
    return x


def path_names(path) -> tuple:
  """The plain keys of a pytree path (dict keys, attribute names or sequence indices)."""
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def is_layer_stack(path) -> bool:
  """True for a parameter of `scan_layers` blocks, whose leading axis indexes the layer.

  `path` is a pytree path into a ViT's (or a whole network's) parameters. Scanned blocks are one
  subtree `blocks/{attn, mlp, norm1, norm2}` of stacked arrays; looped blocks are `blocks/0`,
  `blocks/1`, ... of per-layer arrays. The optimizer uses this to treat each layer slice of a
  stack as its own tensor, so both layouts are optimized the same way.
  """
  names = path_names(path)
  for here, below in zip(names, names[1:]):
    if here == "blocks":
      return not (isinstance(below, int) or str(below).isdigit())
  return False


def _bicubic_matrix(in_size: int, out_size: int, step: float | None = None) -> np.ndarray:
  """[out, in] matrix of PyTorch's bicubic resize (A = -0.75, align_corners=False, edge clamp).

  Output pixel i samples the input at (i + 0.5) * step - 0.5. PyTorch's step is in / out when
  `F.interpolate` gets a `size`, and 1 / scale_factor when it gets a `scale_factor`. Built in
  NumPy from static sizes, so resizing is one small matmul and the native size gives the
  identity matrix exactly.
  """
  a = -0.75

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  m = np.zeros((out_size, in_size), np.float64)
  step = in_size / out_size if step is None else step
  for i in range(out_size):
    src = (i + 0.5) * step - 0.5
    base = math.floor(src)
    t = src - base
    weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
    for tap, w in zip(range(base - 1, base + 3), weights):
      m[i, min(max(tap, 0), in_size - 1)] += w
  return m.astype(np.float32)


# How a position-embedding grid of n x n is resized to a grid of h x w (both bicubic):
#   "size": to exactly h x w, as F.interpolate(size=(h, w)): source step n / h.
#   "dino": as DINO, iBOT and the authors' `interpolate_pos_encoding`, F.interpolate(
#     scale_factor=((h + 0.1) / n, (w + 0.1) / n)): the output is still h x w, but the source
#     step is n / (h + 0.1), so positions sample slightly nearer the grid's origin (by up to
#     0.21 of a patch at 224 -> 96 px). Weights trained that way need it to give their features.
POS_INTERPOLATIONS = ("size", "dino")


def interpolate_pos_embed(grid, new_hw: tuple[int, int], mode: str = "size"):
  """Bicubic resize of a [h, w, D] position-embedding grid to [new_h, new_w, D] (`mode`: one of
  POS_INTERPOLATIONS). Same as PyTorch `F.interpolate(..., mode="bicubic",
  align_corners=False)` given `size=new_hw` ("size") or DINO's scale factors ("dino").
  """
  if mode not in POS_INTERPOLATIONS:
    raise ValueError(f"mode must be one of {POS_INTERPOLATIONS}, got {mode!r}")
  h, w, _ = grid.shape
  steps = (None, None) if mode == "size" else (h / (new_hw[0] + 0.1), w / (new_hw[1] + 0.1))
  mh = jnp.asarray(_bicubic_matrix(h, new_hw[0], steps[0]))
  mw = jnp.asarray(_bicubic_matrix(w, new_hw[1], steps[1]))
  return jnp.einsum("ih,jw,hwd->ijd", mh, mw, grid.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


class ViT(nnx.Module):
  """ViT backbone: patch embedding, [CLS], mask token, position embedding, blocks, final norm.

  `scan_layers=True` stacks the block parameters along a leading axis (logical name "layers")
  and runs them with `lax.scan` (one compiled block: ViT-L compile time); `remat=True`
  rematerializes each block in the backward pass (activation memory). Use both together for
  ViT-L: inside a scan, the recomputation cannot be scheduled early, so the memory saving is
  guaranteed; with unrolled blocks it is up to XLA's scheduler. `pos_interpolation` says how the
  position embedding is resized for inputs of another size (POS_INTERPOLATIONS; "dino" for
  weights trained by DINO, iBOT or the authors' code).
  """

  def __init__(self, *, width: int, depth: int, num_heads: int, patch_size: int = 16,
               image_size: int | tuple[int, int] = 224, in_channels: int = 3,
               mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, remat: bool = False, scan_layers: bool = False,
               attention: str = "xla", pos_interpolation: str = "size", rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    if attention not in ATTENTION:
      raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {attention!r}")
    if pos_interpolation not in POS_INTERPOLATIONS:
      raise ValueError(f"pos_interpolation must be one of {POS_INTERPOLATIONS}, "
                       f"got {pos_interpolation!r}")
    if attention == "cudnn" and ((width // num_heads) % 8 or jnp.dtype(dtype).itemsize != 2):
      raise ValueError("cuDNN attention needs a head dim divisible by 8 and a 16-bit dtype")
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)  # configs pass "bfloat16"
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    self.width, self.depth, self.num_heads = width, depth, num_heads
    self.patch_size = patch_size
    self.grid = (size[0] // patch_size, size[1] // patch_size)
    self.drop_path_rate = float(drop_path_rate)
    self.remat, self.scan_layers = remat, scan_layers
    self.pos_interpolation = pos_interpolation  # how other input sizes resize pos_embed
    self.dtype = dtype

    # Patch embedding = conv with kernel = stride = patch; PyTorch's Conv2d default init
    # (uniform, variance 1 / (3 fan_in)), which DINO keeps; bias zero.
    self.patch_embed = nnx.Conv(
        in_channels, width, kernel_size=(patch_size, patch_size),
        strides=(patch_size, patch_size), padding="VALID", dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_named(jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                           (None, None, "conv_in", "embed")),
        bias_init=_named(jax.nn.initializers.zeros, ("embed",)), rngs=rngs)
    num_patches = self.grid[0] * self.grid[1]
    self.cls_token = nnx.Param(_named(trunc_normal(), (None, None, "embed"))(
        rngs.params(), (1, 1, width), param_dtype))
    self.pos_embed = nnx.Param(_named(trunc_normal(), (None, None, "embed"))(
        rngs.params(), (1, 1 + num_patches, width), param_dtype))
    self.mask_token = nnx.Param(_named(trunc_normal(), (None, "embed"))(
        rngs.params(), (1, width), param_dtype))

    mlp_hidden = int(width * mlp_ratio)

    def make_block(r):
      return Block(width, num_heads, mlp_hidden, dtype=dtype, param_dtype=param_dtype,
                   attention=attention, rngs=r)

    if scan_layers:
      make_stacked = nnx.split_rngs(splits=depth)(nnx.vmap(
          make_block, in_axes=0, out_axes=0,
          transform_metadata={nnx.PARTITION_NAME: "layers"}))
      self.blocks = make_stacked(rngs)
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])
    self.norm = layer_norm(width, param_dtype, rngs)

  def _pos_embed(self, grid_hw: tuple[int, int]):
    """[1, 1 + h*w, D] position embedding, the patch part resized when the grid differs."""
    pos = self.pos_embed[...].astype(jnp.float32)
    cls_pos, patch_pos = pos[:, :1], pos[0, 1:]
    if tuple(grid_hw) != self.grid:
      patch_pos = patch_pos.reshape(*self.grid, -1)
      patch_pos = interpolate_pos_embed(patch_pos, grid_hw, self.pos_interpolation)
      patch_pos = patch_pos.reshape(-1, self.width)
    return jnp.concatenate([cls_pos, patch_pos[None]], axis=1)

  def _run_blocks(self, x, key, keep_last: int):
    """Apply the blocks; returns the output and the last `keep_last` block outputs."""
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    use_drop = key is not None and self.drop_path_rate > 0.0
    keys = jax.random.split(key, self.depth) if use_drop else None

    if self.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def layer(st, h, k, r):
        return nnx.merge(graphdef, st)(h, key=k, rate=r)

      if self.remat:
        layer = jax.checkpoint(layer, prevent_cse=False)

      def body(h, xs):
        st, k, r = xs
        h = layer(st, h, k, r)
        return h, (h if keep_last else None)

      xs = (state, keys, jnp.asarray(rates, jnp.float32) if use_drop else None)
      x, outs = jax.lax.scan(body, x, xs)  # outs: every layer's output, only when asked
      hidden = [outs[i] for i in range(self.depth - keep_last, self.depth)] if keep_last else []
      return x, hidden

    hidden = []
    for i, block in enumerate(self.blocks):
      k = keys[i] if use_drop else None
      rate = float(rates[i])
      if self.remat:
        graphdef, st = nnx.split(block)
        x = jax.checkpoint(
            lambda s, h, kk, g=graphdef, r=rate: nnx.merge(g, s)(h, key=kk, rate=r))(st, x, k)
      else:
        x = block(x, key=k, rate=rate)
      if i >= self.depth - keep_last:
        hidden.append(x)
    return x, hidden

  def __call__(self, images, mask=None, *, key=None, return_blocks: int = 0):
    """images: [B, H, W, C] float (NHWC); mask: bool [B, (H/p)*(W/p)] or None (True = masked);
    key: PRNG key for drop-path, None = deterministic (teacher / eval).

    Returns float32 [B, 1 + L, width] after the final LayerNorm ([CLS] first). With
    `return_blocks=n > 0`, returns (tokens, [last n block outputs, each through the final
    LayerNorm, float32 [B, 1 + L, width]]).
    """
    if not 0 <= return_blocks <= self.depth:
      raise ValueError(f"return_blocks must be in [0, {self.depth}], got {return_blocks}")
    x = self.patch_embed(images.astype(self.dtype))  # [B, h, w, D]
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d).astype(jnp.float32)
    if mask is not None:
      if mask.shape != (b, gh * gw):
        raise ValueError(f"mask shape {mask.shape} != {(b, gh * gw)}")
      x = jnp.where(mask[..., None], self.mask_token[...].astype(jnp.float32), x)
    cls = jnp.broadcast_to(self.cls_token[...].astype(jnp.float32), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1) + self._pos_embed((gh, gw))
    x, hidden = self._run_blocks(x, key, return_blocks)
    out = self.norm(x)
    if return_blocks:
      return out, [self.norm(h) for h in hidden]
    return out


def create_vit(variant: str, *, rngs: nnx.Rngs, **overrides) -> ViT:
  """ViT of a named size ("ti", "s", "b", "l"); keyword overrides win (e.g. depth=4)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; choose from {sorted(VARIANTS)}")
  width, depth, heads = VARIANTS[variant]
  kwargs = dict(width=width, depth=depth, num_heads=heads)
  kwargs.update(overrides)
  return ViT(**kwargs, rngs=rngs)
