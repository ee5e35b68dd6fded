"""Swin Transformer backbone (Liu et al., 2021) with masked-image modelling, in Flax NNX.

The architecture is the reference Swin: a 4x4 patch embedding followed by a LayerNorm, four
stages of blocks that alternate regular and shifted window attention with a learned relative
position bias per head, a patch merging (2x2 neighbors concatenated, LayerNorm, linear 4C -> 2C
without bias) between stages, and a final LayerNorm. Swin-T: width 96, depths (2, 2, 6, 2),
heads (3, 6, 12, 24), window 7, MLP ratio 4; 28,288,354 parameters with the 1000-class
classifier of the reference (27,519,354 without it, plus 96 for the mask token). The SOVE paper
reports Swin-T/14, window 14 as iBOT and EsViT train it: `create_swin("t", window_size=14)`,
50,400 more parameters in the larger relative position tables.

How SOVE uses it, as iBOT does for its Swin:
- The [CLS] role is taken by the average of the final stage's tokens after the final LayerNorm;
  the patch tokens are the final stage's grid (7 x 7 at 224 px). The forward returns
  `[pooled, tokens...]`, the layout of the ViT's `[CLS, patches...]`, so the projection head and
  the step treat both backbones alike.
- Masked-image modelling draws its mask at the final stage's grid (what the loss compares), and
  the mask token replaces patch embeddings at the patch-embedding grid (56 x 56 at 224 px), after
  the patch LayerNorm. Each final token was merged from a block of `2 ** (stages - 1)` (8 for
  Swin-T) patches along each side, so `upsample_mask` repeats every mask entry over its 8 x 8
  block of patches, as iBOT does; where the patch grid is not a multiple of 8 (patch merging pads
  odd grids), the repeated mask is cropped to the patch grid.
- Window sizes and shifts are fixed at construction from `image_size` (the global crop), as in
  the reference: a stage whose grid is no larger than the window gets a window equal to its grid
  and no shift (Swin-T's last stage at 224 px: 7 x 7, one window, no shift). Other input sizes
  run with those windows: a grid that is not a multiple of the window is zero-padded at the
  bottom and right after the block's first LayerNorm and cropped after attention, as iBOT's Swin
  does for 96 px local crops (grids 24, 12, 6, 3 padded to 28, 14, 7, 7). As there, the padded
  positions are not removed from the attention of regular windows (their keys are the qkv bias),
  and shifted windows take their region mask over the padded grid: outputs equal the
  reference's at every size. Patch merging pads odd grids with a zero row or column.
- Shifted windows mask attention between the regions that the cyclic shift brings together with
  a boolean mask (probabilities exactly zero) where the reference adds -100 to the logits; the
  two agree to float precision unless logits span ~100.

Conventions shared with the ViT (models/vit.py): float32 parameters with logical axis names,
matmuls in `dtype` with LayerNorm, softmax and the residual stream in float32, drop-path (linear
in depth over all blocks) drawn only from the `key` argument, so the module holds parameters and
nothing else. LayerNorm eps is 1e-6 as in iBOT's Swin (the classification reference uses 1e-5:
`norm_eps`). The mask token starts truncated-normal (std 0.02) like the ViT's, not at zero as in
iBOT's Swin: with no position embedding added, a zero token reaches the first block's LayerNorm
as an exact zero vector, where the LayerNorm's input gradient is scale / sqrt(eps) = 1000x; on a
tiny Swin the mask token's gradient norm is then 1.8 against 1e-4 from a 0.02 start, dominating
the gradient norm (and, under global-norm clipping, shrinking every other update).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sove_jax.models.vit import Dense, Mlp, _named, drop_path, trunc_normal

# embed_dim, depths, heads (the paper's T/S/B; window 7 at 224 px)
SWIN_VARIANTS = {
    "t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}


def _ceil_to(n: int, m: int) -> int:
  return -(-n // m) * m


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
  """[N, N] int index into the (2w-1)^2-row bias table, N = w * w tokens in row-major order.

  Query (r1, c1) and key (r2, c2) read row (r1 - r2 + w - 1) * (2w - 1) + (c1 - c2 + w - 1), the
  reference's layout, so its tables load unchanged.
  """
  rows, cols = np.divmod(np.arange(window * window), window)
  dr = rows[:, None] - rows[None, :] + window - 1
  dc = cols[:, None] - cols[None, :] + window - 1
  return (dr * (2 * window - 1) + dc).astype(np.int32)


@functools.lru_cache(maxsize=None)
def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """Bool [windows, N, N]: which tokens of each shifted window may attend to which.

  `height` x `width` is the (padded) grid after the cyclic shift by -shift. Along each axis the
  last window holds positions from two or three original regions: the last `window - shift`
  positions before the wrap and the `shift` positions that wrapped from the start (and, when the
  grid is one window wide, everything before them). A token attends only within its region.
  """
  def labels(n):
    pos = np.arange(n)
    return np.where(pos < n - window, 0, np.where(pos < n - shift, 1, 2))

  region = labels(height)[:, None] * 3 + labels(width)[None, :]
  windows = region.reshape(height // window, window, width // window, window)
  windows = windows.transpose(0, 2, 1, 3).reshape(-1, window * window)
  return windows[:, :, None] == windows[:, None, :]


def window_partition(x, window: int):
  """[B, H, W, C] -> [B, (H/w)(W/w), w*w, C], windows row-major, tokens row-major within."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, window * window, c)


def window_reverse(x, window: int, height: int, width: int):
  """Inverse of `window_partition`: [B, nW, w*w, C] -> [B, H, W, C]."""
  b, _, _, c = x.shape
  x = x.reshape(b, height // window, width // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def upsample_mask(mask, factor: int, patch_grid: tuple[int, int]):
  """Bool [B, h, w] mask at the final stage's grid -> [B, gh, gw] at the patch grid.

  Final token (i, j) stands for patches [i*f, (i+1)*f) x [j*f, (j+1)*f), f = `factor`: each
  entry is repeated over that block, then the result is cropped to the patch grid (the blocks
  of the last row and column are partial when patch merging padded the grid).
  """
  gh, gw = patch_grid
  up = jnp.repeat(jnp.repeat(mask, factor, axis=1), factor, axis=2)
  if up.shape[1] < gh or up.shape[2] < gw:
    raise ValueError(f"a {mask.shape[1]}x{mask.shape[2]} mask repeated {factor} times does not "
                     f"cover the {gh}x{gw} patch grid")
  return up[:, :gh, :gw]


def stage_windows(grid: tuple[int, int], window: int, num_stages: int) -> list[tuple[int, int]]:
  """(window, shift) per stage for a model built at patch grid `grid` (the reference's rule).

  Stage i runs at grid / 2^i; if that grid's smaller side is no larger than `window`, the
  window shrinks to it and the shift is dropped (attention is global over the stage).
  """
  out = []
  h, w = grid
  for _ in range(num_stages):
    if min(h, w) <= window:
      out.append((min(h, w), 0))
    else:
      out.append((window, window // 2))
    h, w = h // 2, w // 2
  return out


def _layer_norm(width: int, eps: float, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm computed in float32 whatever the compute dtype."""
  return nnx.LayerNorm(
      width, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
      scale_init=_named(jax.nn.initializers.ones, ("embed",)),
      bias_init=_named(jax.nn.initializers.zeros, ("embed",)), rngs=rngs)


class WindowAttention(nnx.Module):
  """Multi-head self-attention inside each window, with a learned relative position bias.

  Attention logits and the softmax are float32; the contractions take `dtype` inputs.
  """

  def __init__(self, width: int, num_heads: int, window: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    head_dim = width // num_heads
    self.qkv = Dense((width,), (3, num_heads, head_dim), in_names=("embed",),
                     out_names=(None, "heads", "kv"), dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    self.proj = Dense((num_heads, head_dim), (width,), in_names=("heads", "kv"),
                      out_names=("embed",), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # One bias per head for each of the (2w-1)^2 relative offsets inside a window.
    self.relative_position_bias_table = nnx.Param(_named(trunc_normal(), (None, "heads"))(
        rngs.params(), ((2 * window - 1) ** 2, num_heads), param_dtype))
    self.window, self.num_heads, self.dtype = window, num_heads, dtype
    self.scale = head_dim ** -0.5

  def bias(self):
    """float32 [heads, N, N] relative position bias."""
    table = self.relative_position_bias_table[...].astype(jnp.float32)
    index = relative_position_index(self.window)
    return jnp.transpose(table[index], (2, 0, 1))

  def __call__(self, x, mask=None):
    """x: [B, windows, N, C]; mask: bool [windows, N, N] (True = may attend) or None."""
    qkv = self.qkv(x)  # [B, nW, N, 3, H, Dh]
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * self.scale + self.bias()
    if mask is not None:
      logits = jnp.where(jnp.asarray(mask)[None, :, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v.astype(self.dtype))
    return self.proj(out)


class SwinBlock(nnx.Module):
  """Pre-norm block: (shifted) window attention, then the MLP; the residual stream is float32."""

  def __init__(self, width: int, num_heads: int, window: int, shift: int, mlp_ratio: float, *,
               eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(width, eps, param_dtype, rngs)
    self.attn = WindowAttention(width, num_heads, window, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
    self.norm2 = _layer_norm(width, eps, param_dtype, rngs)
    self.mlp = Mlp(width, int(width * mlp_ratio), dtype=dtype, param_dtype=param_dtype,
                   rngs=rngs)
    self.window, self.shift = window, shift

  def attention(self, x):
    """The attention branch on [B, H, W, C] (before drop-path): pad, shift, attend, undo."""
    b, h, w, c = x.shape
    win, shift = self.window, self.shift
    hp, wp = _ceil_to(h, win), _ceil_to(w, win)
    y = self.norm1(x)
    y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    mask = None
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
      mask = shifted_window_mask(hp, wp, win, shift)
    y = window_reverse(self.attn(window_partition(y, win), mask), win, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    return y[:, :h, :w]

  def __call__(self, x, *, key=None, rate=0.0):
    k1, k2 = (None, None) if key is None else tuple(jax.random.split(key))
    x = x + drop_path(self.attention(x), k1, rate).astype(x.dtype)
    x = x + drop_path(self.mlp(self.norm2(x)), k2, rate).astype(x.dtype)
    return x


class PatchMerging(nnx.Module):
  """2x2 neighbors -> one token: concat (4C), LayerNorm, linear to 2C without bias."""

  def __init__(self, width: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.norm = _layer_norm(4 * width, eps, param_dtype, rngs)
    # The 4C concatenation is a widened hidden, as the MLP's: named like fc2's kernel.
    self.reduction = nnx.Param(_named(trunc_normal(), ("mlp", "embed"))(
        rngs.params(), (4 * width, 2 * width), param_dtype))
    self.dtype = dtype

  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    # Channel blocks in the reference's order: (even row, even col), (odd, even), (even, odd),
    # (odd, odd), i.e. column parity major, row parity minor.
    x = x.reshape(b, h2, 2, w2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h2, w2, 4 * c)
    x = self.norm(x)
    y = jnp.dot(x.astype(self.dtype), self.reduction[...].astype(self.dtype))
    return y.astype(jnp.float32)


class SwinStage(nnx.Module):
  """The blocks of one resolution (regular and shifted windows alternating), then merging."""

  def __init__(self, width: int, depth: int, num_heads: int, window: int, shift: int,
               mlp_ratio: float, downsample: bool, *, eps: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.blocks = nnx.List([
        SwinBlock(width, num_heads, window, shift if i % 2 else 0, mlp_ratio, eps=eps,
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for i in range(depth)])
    self.downsample = (PatchMerging(width, eps=eps, dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs) if downsample else None)


class Swin(nnx.Module):
  """Swin backbone: patch embedding + LayerNorm, mask token, stages, final LayerNorm.

  `remat=True` rematerializes each block in the backward pass (activation memory). There is no
  `scan_layers`: stages differ in shape and their blocks alternate shifts.
  """

  def __init__(self, *, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
               num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
               patch_size: int = 4, image_size: int | tuple[int, int] = 224,
               in_channels: int = 3, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
               num_classes: int = 0, norm_eps: float = 1e-6, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
    depths, num_heads = tuple(depths), tuple(num_heads)
    if len(depths) != len(num_heads) or not depths:
      raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of "
                       "equal length (one entry per stage)")
    widths = tuple(embed_dim * 2 ** i for i in range(len(depths)))
    for width, heads in zip(widths, num_heads):
      if width % heads:
        raise ValueError(f"stage width {width} is not divisible by its {heads} heads")
    if window_size < 1 or patch_size < 1:
      raise ValueError(f"window_size {window_size} and patch_size {patch_size} must be >= 1")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    grid = (size[0] // patch_size, size[1] // patch_size)
    if min(grid) < 1:
      raise ValueError(f"image_size {size} is smaller than one {patch_size}px patch")
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    self.embed_dim, self.depths, self.num_heads = embed_dim, depths, num_heads
    self.widths = widths
    self.width = widths[-1]          # the width of the output tokens (the head's input)
    self.depth = sum(depths)         # blocks in all stages (drop-path, return_blocks)
    self.patch_size = patch_size
    self.stride = patch_size * 2 ** (len(depths) - 1)  # input pixels per output token, per side
    self.grid = grid
    self.windows = tuple(stage_windows(grid, window_size, len(depths)))
    self.drop_path_rate = float(drop_path_rate)
    self.remat = remat
    self.dtype = dtype

    # Patch embedding as the ViT's (PyTorch Conv2d default init, zero bias), then LayerNorm.
    self.patch_embed = nnx.Conv(
        in_channels, embed_dim, kernel_size=(patch_size, patch_size),
        strides=(patch_size, patch_size), padding="VALID", dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_named(jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                           (None, None, "conv_in", "embed")),
        bias_init=_named(jax.nn.initializers.zeros, ("embed",)), rngs=rngs)
    self.patch_norm = _layer_norm(embed_dim, norm_eps, param_dtype, rngs)
    self.mask_token = nnx.Param(_named(trunc_normal(), (None, "embed"))(
        rngs.params(), (1, embed_dim), param_dtype))
    self.layers = nnx.List([
        SwinStage(widths[i], depths[i], num_heads[i], *self.windows[i], mlp_ratio,
                  downsample=i < len(depths) - 1, eps=norm_eps, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        for i in range(len(depths))])
    self.norm = _layer_norm(self.width, norm_eps, param_dtype, rngs)
    self.head = (Dense((self.width,), (num_classes,), in_names=("embed",), out_names=("classes",),
                       dtype=dtype, param_dtype=param_dtype, out_dtype=jnp.float32, rngs=rngs)
                 if num_classes else None)

  def token_grid(self, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of output tokens for a `height` x `width` image: the patch grid halved
    (rounding up, as merging pads) once per stage after the first."""
    h, w = height // self.patch_size, width // self.patch_size
    for _ in range(len(self.depths) - 1):
      h, w = -(-h // 2), -(-w // 2)
    return h, w

  def _embed(self, images, mask):
    x = self.patch_embed(images.astype(self.dtype))  # [B, gh, gw, C]
    x = self.patch_norm(x.astype(jnp.float32))
    if mask is not None:
      b, gh, gw, _ = x.shape
      fh, fw = self.token_grid(*images.shape[1:3])
      if mask.shape != (b, fh * fw):
        raise ValueError(f"mask shape {mask.shape} != {(b, fh * fw)}: Swin masks are drawn at "
                         f"the final stage's {fh}x{fw} grid")
      up = upsample_mask(mask.reshape(b, fh, fw), self.stride // self.patch_size, (gh, gw))
      x = jnp.where(up[..., None], self.mask_token[...].astype(jnp.float32), x)
    return x

  def _block(self, block, x, key, rate: float):
    if not self.remat:
      return block(x, key=key, rate=rate)
    graphdef, st = nnx.split(block)
    return jax.checkpoint(
        lambda s, h, k: nnx.merge(graphdef, s)(h, key=k, rate=rate))(st, x, key)

  def _pooled_tokens(self, x, normalize: bool):
    """[B, h, w, C] -> [B, 1 + h*w, C]: the token average first, then the tokens."""
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c)
    if normalize:
      tokens = self.norm(tokens)
    return jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)

  def __call__(self, images, mask=None, *, key=None, return_blocks: int = 0):
    """images: [B, H, W, C] float (NHWC); mask: bool [B, h*w] at the final stage's grid
    (`token_grid`) or None (True = masked); key: PRNG key for drop-path, None = deterministic.

    Returns float32 [B, 1 + h*w, width]: the average of the final tokens (the [CLS] role) and
    the final tokens, after the final LayerNorm. With `return_blocks=n > 0`, returns (tokens,
    [outputs of the last n blocks of all stages]) in iBOT's layout: each [B, 1 + h_i*w_i, C_i]
    with its token average first, final-stage blocks through the final LayerNorm, earlier ones
    as they are.
    """
    if not 0 <= return_blocks <= self.depth:
      raise ValueError(f"return_blocks must be in [0, {self.depth}], got {return_blocks}")
    x = self._embed(images, mask)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    use_drop = key is not None and self.drop_path_rate > 0.0
    keys = jax.random.split(key, self.depth) if use_drop else None
    hidden, i = [], 0
    last_stage = len(self.layers) - 1
    for s, stage in enumerate(self.layers):
      for block in stage.blocks:
        x = self._block(block, x, keys[i] if use_drop else None, float(rates[i]))
        if i >= self.depth - return_blocks:
          hidden.append(self._pooled_tokens(x, normalize=s == last_stage))
        i += 1
      if stage.downsample is not None:
        x = stage.downsample(x)
    out = self._pooled_tokens(x, normalize=True)
    if return_blocks:
      return out, hidden
    return out

  def classify(self, images, *, key=None):
    """float32 [B, num_classes] logits of the classifier on the pooled token."""
    if self.head is None:
      raise ValueError("this Swin has no classifier: build it with num_classes > 0")
    return self.head(self(images, key=key)[:, 0])


def create_swin(variant: str = "t", *, rngs: nnx.Rngs, **overrides) -> Swin:
  """Swin of a named size ("t", "s", "b"); keyword overrides win (e.g. depths=(2, 2))."""
  if variant not in SWIN_VARIANTS:
    raise ValueError(f"unknown Swin variant {variant!r}; choose from {sorted(SWIN_VARIANTS)}")
  embed_dim, depths, heads = SWIN_VARIANTS[variant]
  kwargs = dict(embed_dim=embed_dim, depths=depths, num_heads=heads)
  kwargs.update(overrides)
  return Swin(**kwargs, rngs=rngs)
