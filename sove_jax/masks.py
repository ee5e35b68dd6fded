"""Patch masks drawn on the accelerator, inside the jitted step (data.augment = "device").

The same three rules as the host's `sove_jax.data.masking` (docs/method.md §9; read its module
doc for each rule), in JAX: one mask per `lax.while_loop`, vmapped over the batch, so a batch
of masks shards with the images it belongs to. With the views made on the device too
(`sove_jax.views`), the host sends nothing but decoded canvases (or, from an in-memory source,
indices), and a mask comes from the train state's key like every other draw of the step: a
resumed run masks the same patches.

The random streams differ from the host's (JAX's threefry, TensorFlow's Philox), so the masks
are the host's in distribution, not bit for bit; tests/test_data_masking.py runs the same
statistical checks, against the same NumPy re-implementation of the authors' rule, on both.
True = masked. Importable without TensorFlow (GPU and TPU hosts may lack it).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sove_jax.configuration import EXACT_MIN_PATCHES, MASK_TYPES

ASPECT = (0.3, 1 / 0.3)  # BEiT's block aspect range, both block rules
ATTEMPTS = 10            # tries per block (a round of the authors' rule)
KEEP_STREAM = 0x6b656570  # the draw that keeps a crop's mask when data.mask_prob < 1


def official_min_patches(grid: tuple[int, int]) -> int:
  """Smallest block area of the authors' rule: (min(h, w) // 3) ** 2 patches."""
  return (min(grid) // 3) ** 2


@dataclasses.dataclass(frozen=True)
class MaskRecipe:
  """How the step's masks are drawn: the `data.mask_*` fields and the token grid (hashable)."""
  grid: tuple[int, int]
  mask_type: str
  ratio: float
  ratio_var: float = 0.0
  min_patches: int = 0  # 0: the type's own smallest block
  prob: float = 1.0     # chance that a crop is masked at all (iBOT's official recipe: 0.5)
  start_epoch: int = 0  # no crop is masked before this epoch (iBOT's pred_start_epoch)

  @classmethod
  def from_config(cls, data_config, grid: int) -> MaskRecipe:
    d = data_config
    return cls((grid, grid), d.mask_type, float(d.mask_ratio), float(d.mask_ratio_var),
               int(d.mask_min_patches), float(d.mask_prob), int(d.mask_start_epoch))


def _rectangles(u, room, lo, grid):
  """BEiT rectangles from uniforms u [..., 4]: area uniform in (lo, room), log aspect uniform,
  sides rounded half to even (Python's round), position uniform over the places it fits.
  Returns (rows [..., h], cols [..., w]) as bool indicators, and sides (bh, bw)."""
  h, w = grid
  log_lo, log_hi = math.log(ASPECT[0]), math.log(ASPECT[1])
  area = lo + u[..., 0] * (room - lo)
  aspect = jnp.exp(log_lo + u[..., 1] * (log_hi - log_lo))
  bh, bw = jnp.round(jnp.sqrt(area * aspect)), jnp.round(jnp.sqrt(area / aspect))
  top = jnp.floor(u[..., 2] * (h - bh + 1))[..., None]
  left = jnp.floor(u[..., 3] * (w - bw + 1))[..., None]
  rows = jnp.arange(h, dtype=jnp.float32)
  cols = jnp.arange(w, dtype=jnp.float32)
  in_rows = (rows >= top) & (rows < top + bh[..., None])
  in_cols = (cols >= left) & (cols < left + bw[..., None])
  return in_rows, in_cols, bh, bw


def _new_patches(mask, in_rows, in_cols):
  """Patches each rectangle [..., h] x [..., w] would add to `mask` [h, w] (int32 [...])."""
  rect = in_rows[..., :, None] & in_cols[..., None, :]
  return jnp.sum(rect & ~mask, axis=(-2, -1), dtype=jnp.int32)


def official_block(key, high, grid, min_area: int):
  """One mask of the authors' rule, bool [h, w], for the float target `high` patches.

  A loop iteration is a round: its ATTEMPTS attempts are drawn at once (a failed attempt leaves
  the mask as it is, so all see the same mask) and the first success is placed; the loop ends
  at the target or after a round without success.
  """
  h, w = grid

  def running(carry):
    _, _, masked, failed = carry
    return (masked.astype(jnp.float32) < high) & ~failed

  def body(carry):
    step, mask, masked, failed = carry
    room = high - masked.astype(jnp.float32)
    u = jax.random.uniform(jax.random.fold_in(key, step), (ATTEMPTS, 4))
    in_rows, in_cols, bh, bw = _rectangles(u, room, float(min_area), grid)
    new = _new_patches(mask, in_rows, in_cols)
    ok = (bh < h) & (bw < w) & (new > 0) & (new.astype(jnp.float32) <= room)
    first = jnp.argmax(ok)
    accept = ok[first]
    chosen = in_rows[first][:, None] & in_cols[first][None, :] & accept
    return step + 1, mask | chosen, masked + jnp.where(accept, new[first], 0), ~accept

  init = (jnp.int32(0), jnp.zeros(grid, bool), jnp.int32(0), jnp.bool_(False))
  return jax.lax.while_loop(running, body, init)[1]


def exact_block(key, count, grid, min_patches: int):
  """One exact-ratio block mask, bool [h, w], of exactly `count` patches: BEiT rectangles of at
  least `min_patches` one attempt at a time (ATTEMPTS failures in a row end them), then single
  patches grown onto the mask's edge until the count is reached."""
  h, w = grid
  key_blocks, key_grow = jax.random.split(key)
  lo = float(min_patches)

  def placing(carry):
    _, _, masked, fails = carry
    return (count - masked >= min_patches) & (fails < ATTEMPTS)

  def place(carry):
    step, mask, masked, fails = carry
    remaining = count - masked
    u = jax.random.uniform(jax.random.fold_in(key_blocks, step), (4,))
    in_rows, in_cols, bh, bw = _rectangles(u, remaining.astype(jnp.float32), lo, grid)
    new = _new_patches(mask, in_rows, in_cols)
    accept = (bh * bw >= lo) & (bh <= h) & (bw <= w) & (new > 0) & (new <= remaining)
    mask = mask | (in_rows[:, None] & in_cols[None, :] & accept)
    return (step + 1, mask, masked + jnp.where(accept, new, 0),
            jnp.where(accept, 0, fails + 1))

  init = (jnp.int32(0), jnp.zeros(grid, bool), jnp.int32(0), jnp.int32(0))
  _, mask, masked, _ = jax.lax.while_loop(placing, place, init)

  def grow(carry):  # one patch 4-adjacent to the mask (anywhere if it is empty)
    step, mask, missing = carry
    m = jnp.pad(mask, 1)
    near = m[:-2, 1:-1] | m[2:, 1:-1] | m[1:-1, :-2] | m[1:-1, 2:]
    candidate = (near | ~mask.any()) & ~mask
    score = jax.random.uniform(jax.random.fold_in(key_grow, step), grid) + candidate
    pick = jnp.arange(h * w).reshape(grid) == jnp.argmax(score)
    return step + 1, mask | (pick & candidate), missing - 1

  init = (jnp.int32(0), mask, count - masked)
  return jax.lax.while_loop(lambda carry: carry[2] > 0, grow, init)[1]


def random_mask(key, count, grid):
  """`count` patches drawn uniformly without replacement, bool [h, w]."""
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (grid[0] * grid[1],))))
  return (rank < count).reshape(grid)


def draw(key, shape: tuple[int, ...], recipe: MaskRecipe, sharding=None,
         epoch=None) -> jax.Array:
  """Independent masks, bool [*shape, h * w], from a JAX key. Mask i (in row-major order of
  `shape`) draws its ratio uniformly in ratio +- ratio_var, from fold_in(key, i): it depends on
  the key and i only. With `recipe.prob` < 1 a mask is kept with that probability and is empty
  otherwise (its own draw, so the kept masks are those of prob 1). `epoch` (an integer, traced
  or not): before `recipe.start_epoch` every mask is empty; None means past the start.
  `sharding` (of an array of `shape`) splits the loops over the devices."""
  if recipe.mask_type not in MASK_TYPES:
    raise ValueError(f"mask_type must be one of {MASK_TYPES}, not {recipe.mask_type!r}")
  grid = recipe.grid
  num_patches = grid[0] * grid[1]
  if recipe.mask_type == "block":
    min_area = recipe.min_patches or official_min_patches(grid)
    rule = lambda k, high, count: official_block(k, high, grid, min_area)
  elif recipe.mask_type == "block_exact":
    min_patches = recipe.min_patches or EXACT_MIN_PATCHES
    rule = lambda k, high, count: exact_block(k, count, grid, min_patches)
  else:
    rule = lambda k, high, count: random_mask(k, count, grid)

  def one(i):
    key_ratio, key_mask = jax.random.split(jax.random.fold_in(key, i))
    u = jax.random.uniform(key_ratio)
    high = (recipe.ratio + recipe.ratio_var * (2.0 * u - 1.0)) * num_patches
    count = jnp.floor(high + 0.5).astype(jnp.int32)  # configuration.masked_count, traced
    mask = rule(key_mask, high, count).reshape(num_patches)
    if recipe.prob < 1.0:
      keep = jax.random.uniform(jax.random.fold_in(key_ratio, KEEP_STREAM)) < recipe.prob
      mask = mask & keep
    return mask

  index = jnp.arange(math.prod(shape), dtype=jnp.int32).reshape(shape)
  if sharding is not None:
    index = jax.lax.with_sharding_constraint(index, sharding)
  for _ in shape:
    one = jax.vmap(one)
  drawn = one(index)
  if epoch is not None and recipe.start_epoch > 0:
    drawn = drawn & (jnp.asarray(epoch) >= recipe.start_epoch)
  return drawn
