"""Patch masks for the two global crops (docs/method.md §9): the authors' blocks (default),
exact-ratio blocks, random.

TensorFlow ops, vectorized over a batch of masks and driven by a stateless seed, so a mask
depends only on its place in the stream. (Not numpy in tf.numpy_function: a Python callback in
flight while an iterator is torn down deadlocks on the GIL, which a resumed or stopped trainer
would hit.) True = masked. Each mask draws its ratio uniformly in ratio +- var.

"block" is the authors' rule (their loader is iBOT's `ImageFolderMask`, which follows BEiT):
the target is `high = ratio * h * w` patches (not rounded). Rounds of up to ten attempts each
place one rectangle: area uniform between `(min(h, w) // 3) ** 2` (16 on a 14 x 14 grid, 1 on
4 x 4) and `high - masked`, log aspect ratio uniform in (log 0.3, log 1/0.3), sides rounded,
both strictly shorter than the grid's, at a uniform position; an attempt succeeds when the
rectangle adds between 1 and `high - masked` new patches, and a round ends at its first
success. The mask is done when a whole round fails, so it may end short of the ratio (and
never exceeds `high`).

"block_exact" places BEiT rectangles of at least `min_patches` (default 4) the same way, up to
`round(ratio * L)`, then grows the last patches (fewer than `min_patches`, or all that could not
be placed) one by one onto the edge of the mask, so the count is exact and every connected
piece holds at least `min_patches` patches.

"random" masks exactly `round(ratio * L)` patches drawn uniformly.

Whatever the rule, a crop is masked at all with probability `prob` (iBOT's official recipe,
`--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`, picks ratio 0 for half of its crops: prob 0.5),
and no crop is masked before the epoch `start_epoch` (iBOT's `--pred_start_epoch`).
"""
from __future__ import annotations

import math

import tensorflow as tf

from sove_jax.data.augment import fold
# The rules' names and constants, shared with the device's generator (no TensorFlow there).
from sove_jax.configuration import EXACT_MIN_PATCHES, MASK_TYPES
from sove_jax.masks import ASPECT, ATTEMPTS, official_min_patches


def _blocks(seed, mask, count, min_patches, aspect, attempts):
  """("block_exact") BEiT's rectangle placement on masks [n, h, w] until < min_patches remain
  or tries run out."""
  n, h, w = mask.shape
  rows = tf.range(h, dtype=tf.float32)[None, :, None]
  cols = tf.range(w, dtype=tf.float32)[None, None, :]
  log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
  lo = float(min_patches)

  def body(step, mask, masked, fails):
    remaining = count - masked
    active = (remaining >= min_patches) & (fails < attempts)
    u = tf.random.stateless_uniform([n, 4], fold(seed, step))
    area = lo + u[:, 0] * (tf.cast(remaining, tf.float32) - lo)
    ratio = tf.exp(log_lo + u[:, 1] * (log_hi - log_lo))
    bh = tf.round(tf.sqrt(area * ratio))
    bw = tf.round(tf.sqrt(area / ratio))
    fits = (bh * bw >= lo) & (bh <= h) & (bw <= w)
    top = tf.floor(u[:, 2] * (h - bh + 1))[:, None, None]
    left = tf.floor(u[:, 3] * (w - bw + 1))[:, None, None]
    block = ((rows >= top) & (rows < top + bh[:, None, None]) &
             (cols >= left) & (cols < left + bw[:, None, None]))
    new = tf.reduce_sum(tf.cast(block & ~mask, tf.int32), axis=[1, 2])
    accept = active & fits & (new > 0) & (new <= remaining)
    mask = mask | (block & accept[:, None, None])
    masked = masked + tf.where(accept, new, 0)
    fails = tf.where(accept, 0, tf.where(active, fails + 1, fails))
    return step + 1, mask, masked, fails

  def cond(step, mask, masked, fails):
    return tf.reduce_any((count - masked >= min_patches) & (fails < attempts))

  zeros = tf.zeros([n], tf.int32)
  _, mask, masked, _ = tf.while_loop(cond, body, (tf.constant(0, tf.int64), mask, zeros, zeros))
  return mask, masked


def _official_blocks(seed, high, grid, min_area, aspect, attempts):
  """The authors' block masks [n, h, w] for float targets `high` [n] (see the module doc).

  One loop iteration is one round for every mask still running: its `attempts` attempts are
  drawn at once (failed attempts leave the mask as it is, so they all see the same mask), and
  the first that succeeds is placed. A mask stops when it reaches `high` or a whole round
  fails. (A loop of single attempts gives the same masks in distribution and runs about 10x
  more iterations, each a few microseconds of TensorFlow per op.) Attempts are rows and columns,
  their new patches counted by a matrix product; only the placed one is drawn as a [h, w]
  rectangle (the same masks as drawing every attempt's, at half the CPU per mask).
  """
  n = high.shape[0]
  h, w = grid
  rows = tf.range(h, dtype=tf.float32)[None, None, :]
  cols = tf.range(w, dtype=tf.float32)[None, None, :]
  log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
  lo = float(min_area)

  def running(masked, failed):
    return (tf.cast(masked, tf.float32) < high) & ~failed

  def body(step, mask, masked, failed):
    active = running(masked, failed)
    room = (high - tf.cast(masked, tf.float32))[:, None]
    u = tf.random.stateless_uniform([n, attempts, 4], fold(seed, step))
    area = lo + u[..., 0] * (room - lo)  # Python's random.uniform(lo, room), also when room < lo
    ratio = tf.exp(log_lo + u[..., 1] * (log_hi - log_lo))
    bh = tf.round(tf.sqrt(area * ratio))  # round half to even, as Python's round
    bw = tf.round(tf.sqrt(area / ratio))
    fits = (bh < h) & (bw < w)
    top = tf.floor(u[..., 2] * (h - bh + 1))[..., None]  # randint(0, h - bh)
    left = tf.floor(u[..., 3] * (w - bw + 1))[..., None]
    # Each attempt's rectangle as its rows [n, attempts, h] and columns [n, attempts, w]: the
    # patches it adds are its area less its overlap with the mask, rows' @ mask @ columns.
    in_rows = tf.cast((rows >= top) & (rows < top + bh[..., None]), tf.float32)
    in_cols = tf.cast((cols >= left) & (cols < left + bw[..., None]), tf.float32)
    overlap = tf.reduce_sum(tf.matmul(in_rows, tf.cast(mask, tf.float32)) * in_cols, axis=2)
    new = tf.reduce_sum(in_rows, axis=2) * tf.reduce_sum(in_cols, axis=2) - overlap  # exact
    ok = fits & (new > 0) & (new <= room)
    first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)  # first success
    accept = active & tf.reduce_any(ok, axis=1)
    pick = lambda x: tf.gather(x, first, axis=1, batch_dims=1)
    chosen = (pick(in_rows)[:, :, None] * pick(in_cols)[:, None, :]) > 0
    mask = mask | (chosen & accept[:, None, None])
    masked = masked + tf.where(accept, tf.cast(pick(new), tf.int32), 0)
    return step + 1, mask, masked, failed | (active & ~accept)

  def cond(step, mask, masked, failed):
    return tf.reduce_any(running(masked, failed))

  mask = tf.zeros([n, h, w], tf.bool)
  _, mask, _, _ = tf.while_loop(
      cond, body, (tf.constant(0, tf.int64), mask, tf.zeros([n], tf.int32), tf.zeros([n], bool)))
  return mask


def _grow(seed, mask, missing):
  """Adds `missing` [n] patches per mask, one at a time, each 4-adjacent to the mask."""
  n, h, w = mask.shape

  def body(step, mask, missing):
    m = tf.cast(mask, tf.int32)
    near = tf.pad(m[:, 1:], [[0, 0], [0, 1], [0, 0]]) | tf.pad(m[:, :-1], [[0, 0], [1, 0], [0, 0]])
    near |= tf.pad(m[:, :, 1:], [[0, 0], [0, 0], [0, 1]])
    near |= tf.pad(m[:, :, :-1], [[0, 0], [0, 0], [1, 0]])
    empty = ~tf.reduce_any(mask, axis=[1, 2])[:, None, None]
    candidate = ((near > 0) | empty) & ~mask
    score = tf.random.stateless_uniform([n, h, w], fold(seed, step))
    score += tf.cast(candidate, tf.float32)
    best = tf.argmax(tf.reshape(score, [n, h * w]), axis=1)  # a random candidate
    pick = tf.one_hot(best, h * w, on_value=True, off_value=False)
    pick = tf.reshape(pick, [n, h, w]) & candidate & (missing > 0)[:, None, None]
    return step + 1, mask | pick, missing - tf.cast(missing > 0, tf.int32)

  _, mask, _ = tf.while_loop(lambda s, m, missing: tf.reduce_any(missing > 0), body,
                             (tf.constant(0, tf.int64), mask, missing))
  return mask


def masks(seed, n: int, grid: tuple[int, int], mask_type: str, ratio: float, ratio_var: float = 0.0,
          min_patches: int = 0, aspect: tuple[float, float] = ASPECT,
          attempts: int = ATTEMPTS, *, prob: float = 1.0, start_epoch: int = 0,
          epoch=None) -> tf.Tensor:
  """`n` independent masks, bool [n, h * w], from a stateless seed (int [2]).

  `min_patches`: the smallest block; 0 takes the type's own ((min(h, w) // 3) ** 2 for "block",
  EXACT_MIN_PATCHES for "block_exact"); "random" ignores it. `prob`: each mask is kept with
  this probability, else empty (its own draw: the kept masks are those of prob 1). `epoch`
  (int, a tensor or not): before `start_epoch` every mask is empty; None means past the start.
  """
  mask = _masks(seed, n, grid, mask_type, ratio, ratio_var, min_patches, aspect, attempts)
  if prob < 1.0:
    mask &= (tf.random.stateless_uniform([n], fold(seed, 5)) < prob)[:, None]
  if epoch is not None and start_epoch > 0:
    mask &= tf.cast(epoch, tf.int64) >= start_epoch
  return mask


def _masks(seed, n, grid, mask_type, ratio, ratio_var, min_patches, aspect, attempts):
  """`masks` before the probability and the start: every mask drawn by its rule."""
  if mask_type not in MASK_TYPES:
    raise ValueError(f"mask_type must be one of {MASK_TYPES}, not {mask_type!r}")
  h, w = grid
  num_patches = h * w
  u = tf.random.stateless_uniform([n], fold(seed, 0))
  ratios = ratio + ratio_var * (2.0 * u - 1.0)
  if mask_type == "block":
    min_area = min_patches or official_min_patches(grid)
    mask = _official_blocks(fold(seed, 4), ratios * num_patches, grid, min_area, aspect, attempts)
    return tf.reshape(mask, [n, num_patches])
  count = tf.cast(tf.floor(ratios * num_patches + 0.5), tf.int32)
  if mask_type == "random":
    scores = tf.random.stateless_uniform([n, num_patches], fold(seed, 1))
    rank = tf.argsort(tf.argsort(scores, axis=1), axis=1)
    return rank < count[:, None]
  min_patches = min_patches or EXACT_MIN_PATCHES
  mask = tf.zeros([n, h, w], tf.bool)
  mask, masked = _blocks(fold(seed, 2), mask, count, min_patches, aspect, attempts)
  mask = _grow(fold(seed, 3), mask, count - masked)
  return tf.reshape(mask, [n, num_patches])
