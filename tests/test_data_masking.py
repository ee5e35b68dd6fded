"""Patch masks, drawn on the host (TensorFlow, sove_jax.data.masking) and on the device (JAX,
sove_jax.masks), each checked alike: the authors' block rule against a NumPy re-implementation
of it; exact-ratio blocks (counts, ranges, blocks of >= min_patches); random masks; seeding."""
import functools
import math

import jax
import numpy as np
import pytest
from scipy import ndimage, stats

from sove_jax import configuration
from sove_jax import masks as device_masks
from sove_jax.data import masking


@functools.partial(jax.jit, static_argnums=(1, 2))
def _device_draw(key, shape, recipe):
  return device_masks.draw(key, shape, recipe)


def draw(where, seed, n, grid, mask_type, ratio, var=0.0) -> np.ndarray:
  """`n` masks bool [n, h * w] from the generator of `where` ("host" or "device") and a seed of
  two integers."""
  if where == "host":
    return masking.masks(seed, n, grid, mask_type, ratio, var).numpy()
  key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
  return np.asarray(_device_draw(key, (n,), device_masks.MaskRecipe(tuple(grid), mask_type,
                                                                    ratio, var)))


WHERE = pytest.mark.parametrize("where", ["host", "device"])


def _components(mask: np.ndarray) -> list[int]:
  """Sizes of the 4-connected pieces of a 2-D boolean mask."""
  seen = np.zeros_like(mask)
  sizes = []
  for start in zip(*np.nonzero(mask)):
    if seen[start]:
      continue
    stack, size = [start], 0
    seen[start] = True
    while stack:
      i, j = stack.pop()
      size += 1
      for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
        if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
          seen[a, b] = True
          stack.append((a, b))
    sizes.append(size)
  return sizes


@WHERE
@pytest.mark.parametrize("grid,ratio,var",
                         [((14, 14), 0.3, 0.0), ((14, 14), 0.3, 0.2), ((4, 4), 0.3, 0.0)])
def test_exact_block_masks_have_exact_counts_in_range_and_blocks_of_at_least_four(where, grid,
                                                                                  ratio, var):
  n, L = 400, grid[0] * grid[1]
  m = draw(where, [7, 1], n, grid, "block_exact", ratio, var)
  assert m.shape == (n, L) and m.dtype == bool
  counts = m.sum(1)
  count = configuration.masked_count
  lo, hi = count(ratio - var, L), count(ratio + var, L)
  assert counts.min() >= lo and counts.max() <= hi
  assert abs(counts.mean() / L - ratio) < 0.02
  if var:  # the ratio really varies over its whole range
    assert counts.min() <= lo + 0.1 * (hi - lo) and counts.max() >= hi - 0.1 * (hi - lo)
  for mask in m.reshape(n, *grid):
    assert min(_components(mask)) >= 4
  # Blocks, not scattered patches: far fewer pieces than a random mask of the same size.
  pieces = np.mean([len(_components(x)) for x in m.reshape(n, *grid)])
  scattered = draw(where, [7, 1], n, grid, "random", ratio, var)
  assert pieces < 0.5 * np.mean([len(_components(x)) for x in scattered.reshape(n, *grid)])


@WHERE
def test_random_masks_have_ratio_in_range_and_cover_every_patch(where):
  n, grid, L = 2000, (14, 14), 196
  m = draw(where, [3, 4], n, grid, "random", 0.7, 0.1)
  counts = m.sum(1)
  assert counts.min() >= configuration.masked_count(0.6, L)
  assert counts.max() <= configuration.masked_count(0.8, L)
  assert abs(counts.mean() / L - 0.7) < 0.01
  freq = m.mean(0)  # every position equally likely
  assert abs(freq.mean() - 0.7) < 0.01 and freq.min() > 0.6 and freq.max() < 0.8


@WHERE
@pytest.mark.parametrize("mask_type", masking.MASK_TYPES)
def test_masks_follow_the_seed(where, mask_type):
  a = draw(where, [1, 2], 64, (14, 14), mask_type, 0.3)
  b = draw(where, [1, 2], 64, (14, 14), mask_type, 0.3)
  c = draw(where, [1, 3], 64, (14, 14), mask_type, 0.3)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert (a[0] != a[1:]).any(axis=1).all()  # masks within a call differ too
  # A mask depends on its seed and its place only, not on how many are drawn with it.
  np.testing.assert_array_equal(draw(where, [1, 2], 8, (14, 14), mask_type, 0.3), a[:8])


def test_device_masks_are_the_same_on_one_device_or_sharded_over_eight():
  """Each device draws its share of the batch's masks (no trip to the host), the same masks."""
  recipe = device_masks.MaskRecipe((14, 14), "block", 0.3)
  key = jax.random.key(5)
  one = np.asarray(_device_draw(key, (16, 2), recipe))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = jax.sharding.NamedSharding(mesh, jax.P("data"))
  sharded = jax.jit(lambda k: device_masks.draw(k, (16, 2), recipe, sharding=batch),
                    out_shardings=batch)
  lowered = sharded.lower(key)
  assert "callback" not in lowered.as_text()
  out = lowered.compile()(key)
  assert out.sharding.is_equivalent_to(batch, 3) and out.shape == (16, 2, 196)
  np.testing.assert_array_equal(np.asarray(out), one)
  assert 0 < one.sum(-1).min() and one.sum(-1).max() <= 0.3 * 196


def test_config_module_lists_the_same_mask_types():
  assert configuration.MASK_TYPES == masking.MASK_TYPES == device_masks.MASK_TYPES


# ------------------------------------------------------------------ the authors' block rule

def authors_block_mask(rng, grid, ratio, *, min_area=None, attempts=10, aspect=(0.3, 1 / 0.3),
                       strict_fit=True):
  """NumPy re-implementation of the authors' block masks (iBOT's `ImageFolderMask`), one image.

  Written from the algorithm's description, with Python's own rounding and inclusive randint.
  The keyword arguments exist to build wrong variants, which the statistics must tell apart.
  """
  h, w = grid
  high = ratio * h * w
  low = (min(h, w) // 3) ** 2 if min_area is None else min_area
  log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
  mask = np.zeros(grid, bool)
  masked = 0
  while masked < high:
    room = high - masked
    added = 0
    for _ in range(attempts):
      area = low + rng.random() * (room - low)  # random.uniform(low, room)
      aspect_ratio = math.exp(log_aspect[0] + rng.random() * (log_aspect[1] - log_aspect[0]))
      bh, bw = round(math.sqrt(area * aspect_ratio)), round(math.sqrt(area / aspect_ratio))
      if (bh < h and bw < w) if strict_fit else (bh <= h and bw <= w):
        top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
        if 0 < new <= room:
          mask[top:top + bh, left:left + bw] = True
          added = new
          break
    if not added:
      break
    masked += added
  return mask


def _mask_statistics(masks: np.ndarray, grid) -> np.ndarray:
  """Per mask (so samples are independent): masked count, number of pieces, largest piece,
  rows and columns spanned, full rows and columns. Pieces are what blocks become; their sizes
  are the block sizes where blocks do not touch."""
  out = []
  for m in masks.reshape(-1, *grid):
    labels, pieces = ndimage.label(m)  # 4-connected
    largest = np.bincount(labels.ravel())[1:].max() if pieces else 0
    rows, cols = m.any(1), m.any(0)
    span = lambda x: np.ptp(np.nonzero(x)[0]) + 1 if x.any() else 0
    out.append((m.sum(), pieces, largest, span(rows), span(cols),
                m.all(1).sum() + m.all(0).sum()))
  return np.array(out)


STATISTICS = ("masked count", "pieces", "largest piece", "rows spanned", "columns spanned",
              "full lines")


def _same_distribution_p(a, b) -> float:
  """Chi-square p-value that two samples of a discrete statistic share one distribution
  (values seen fewer than 10 times in all are pooled into one bin)."""
  values = np.union1d(a, b)
  table = np.array([[np.sum(x == v) for v in values] for x in (a, b)])
  common = table.sum(0) >= 10
  table = np.concatenate([table[:, common], table[:, ~common].sum(1, keepdims=True)], axis=1)
  table = table[:, table.sum(0) > 0]
  return 1.0 if table.shape[1] < 2 else float(stats.chi2_contingency(table)[1])


def _p_values(ours, other):
  """{statistic: p-value} for two arrays of `_mask_statistics`."""
  return {name: _same_distribution_p(ours[:, i], other[:, i]) for i, name in enumerate(STATISTICS)}


# (grid, ratio, ratio_var, wrong variants this case must reject). The 14 x 14 grid is the paper's
# 224 px crop, 4 x 4 the default config's 28 px crop (patch 7), 3 x 8 a grid where the strict
# "shorter than the grid" rule decides many blocks.
CASES = [
    ((14, 14), 0.3, 0.0, ("min_area_4", "attempts_5", "attempts_20", "aspect_0.5", "exact")),
    ((14, 14), 0.3, 0.1, ("min_area_4",)),
    ((4, 4), 0.3, 0.0, ("min_area_4", "attempts_5", "aspect_0.5", "exact", "non_strict_fit")),
    ((3, 8), 0.5, 0.0, ("min_area_4", "attempts_5", "aspect_0.5", "non_strict_fit")),
]
WRONG = {"min_area_4": dict(min_area=4), "attempts_5": dict(attempts=5),
         "attempts_20": dict(attempts=20), "aspect_0.5": dict(aspect=(0.5, 2.0)),
         "non_strict_fit": dict(strict_fit=False)}
SAMPLES = 4000


@functools.cache
def _reference(grid, ratio, var, wrong=None):
  """SAMPLES masks of the NumPy rule (or of its `wrong` variant), the same for both generators."""
  rng = np.random.default_rng([sum(grid), int(100 * ratio), int(100 * var),
                               list(WRONG).index(wrong) + 1 if wrong else 0])
  return np.stack([authors_block_mask(rng, grid, rng.uniform(ratio - var, ratio + var)
                                      if var else ratio, **WRONG.get(wrong, {}))
                   for _ in range(SAMPLES)])


@WHERE
@pytest.mark.parametrize("grid,ratio,var,wrong_rules", CASES)
def test_block_masks_follow_the_authors_rule(where, grid, ratio, var, wrong_rules):
  """Each generator against the NumPy re-implementation: the same distributions of masked
  count (so of mean ratio and of ending short), pieces, largest piece and extent; and the same
  statistics reject each plausible wrong rule, so passing is not for lack of power."""
  L = grid[0] * grid[1]
  ours = draw(where, [11, 5], SAMPLES, grid, "block", ratio, var)
  reference = _reference(grid, ratio, var)

  ours_stats = _mask_statistics(ours, grid)
  p = _p_values(ours_stats, _mask_statistics(reference, grid))
  assert min(p.values()) > 1e-3, p
  count, ref_count = ours.sum(1), reference.reshape(SAMPLES, -1).sum(1)
  se = math.hypot(count.std(), ref_count.std()) / math.sqrt(SAMPLES)
  assert abs(count.mean() - ref_count.mean()) < 4 * se
  high = (ratio + var) * L
  assert count.max() <= math.floor(high + 1e-6)  # never more than the target: no top-up
  if not var:  # how often it ends short of the most it could mask
    short, ref_short = np.mean(count < math.floor(high)), np.mean(ref_count < math.floor(high))
    pooled = (short + ref_short) / 2
    assert abs(short - ref_short) <= 4 * math.sqrt(pooled * (1 - pooled) * 2 / SAMPLES)

  for name in wrong_rules:
    if name == "exact":  # our exact-ratio generator is not the authors' rule either
      other = draw(where, [11, 5], SAMPLES, grid, "block_exact", ratio, var)
    else:
      other = _reference(grid, ratio, var, name)
    p = _p_values(ours_stats, _mask_statistics(other, grid))
    assert min(p.values()) < 1e-6, (name, p)


@WHERE
def test_block_masks_on_the_default_4x4_grid(where):
  """What the authors' rule gives on the default config's 28 px crops (patch 7): the target is
  0.3 * 16 = 4.8 patches, which whole patches never reach, so masks stop at 4 (25%) and rarely
  at 3; the smallest block is (4 // 3) ** 2 = 1 patch, so pieces of 1 to 3 patches are common."""
  n, grid = 4000, (4, 4)
  m = draw(where, [2, 9], n, grid, "block", 0.3)
  counts = np.bincount(m.sum(1), minlength=17)
  assert counts[5:].sum() == 0 and counts[4] > 0.98 * n and counts[:3].sum() < 0.005 * n
  pieces = [_components(x) for x in m.reshape(n, *grid)]
  assert 1.3 < np.mean([len(x) for x in pieces]) < 1.6
  assert min(min(x) for x in pieces) == 1


# ----------------------------------------------------------------------------- iBOT's recipe


def draw_kept(where, seed, n, mask_type, prob, epoch=None, start=0) -> np.ndarray:
  """Masks of the default 4 x 4 grid at ratio 0.3 +- 0.2 (iBOT's), kept with `prob`."""
  grid = (4, 4)
  if where == "host":
    return masking.masks(seed, n, grid, mask_type, 0.3, 0.2, prob=prob, start_epoch=start,
                         epoch=epoch).numpy()
  key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
  recipe = device_masks.MaskRecipe(grid, mask_type, 0.3, 0.2, prob=prob, start_epoch=start)
  return np.asarray(jax.jit(device_masks.draw, static_argnums=(1, 2))(key, (n,), recipe,
                                                                      None, epoch))


@WHERE
@pytest.mark.parametrize("mask_type", ["block", "random"])
def test_a_crop_is_masked_with_the_recipes_probability(where, mask_type):
  """iBOT's official masking (--pred_ratio 0 0.3 --pred_ratio_var 0 0.2): about half the crops
  unmasked, the others masked as with probability 1 (the same masks: the keep is its own draw)."""
  n = 4000
  kept = draw_kept(where, [3, 9], n, mask_type, 0.5)
  every = draw_kept(where, [3, 9], n, mask_type, 1.0)
  # Each mask is the one of probability 1 or empty; of the crops masked at probability 1 (the
  # authors' blocks may place none at ratio 0.1: 1.6 patches), a binomial half is kept.
  same = (kept == every).all(1)
  assert (same | ~kept.any(1)).all()
  drawn = every.any(1)
  assert drawn.mean() > 0.9
  kept_share = kept.any(1)[drawn].mean()
  assert abs(kept_share - 0.5) < 4 * math.sqrt(0.25 / drawn.sum())
  quarter = draw_kept(where, [4, 1], n, mask_type, 0.25).any(1)
  assert abs(quarter.mean() / drawn.mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n) / 0.9


@WHERE
def test_no_crop_is_masked_before_the_start_epoch(where):
  early = draw_kept(where, [5, 2], 64, "block", 1.0, epoch=49, start=50)
  late = draw_kept(where, [5, 2], 64, "block", 1.0, epoch=50, start=50)
  assert not early.any() and late.any(1).all()
  np.testing.assert_array_equal(late, draw_kept(where, [5, 2], 64, "block", 1.0))


def test_probability_one_draws_the_masks_of_before():
  """data.mask_prob = 1 (every config but iBOT's official one) takes no extra draw: the masks
  are bit for bit those of the generator without the probability."""
  host = masking._masks([1, 2], 32, (4, 4), "block", 0.3, 0.0, 0, device_masks.ASPECT,
                        device_masks.ATTEMPTS).numpy()
  np.testing.assert_array_equal(masking.masks([1, 2], 32, (4, 4), "block", 0.3).numpy(), host)


def test_mask_probability_and_start_are_checked():
  from configs import default
  c = default.get_config()
  c.data.mask_prob = 1.5
  with pytest.raises(configuration.ConfigError, match="data.mask_prob must be a probability"):
    configuration.validate_data(c.data, patch_size=7, global_batch_size=8)
  c.data.mask_prob, c.data.mask_start_epoch = 0.5, -1
  with pytest.raises(configuration.ConfigError, match="mask_start_epoch=-1 must be a whole"):
    configuration.validate_data(c.data, patch_size=7, global_batch_size=8)
  c.data.mask_start_epoch = 2
  for augment in ("host", "device"):  # the step knows the epoch too (the schedules' epoch)
    c.data.augment = augment
    configuration.validate_data(c.data, patch_size=7, global_batch_size=8)


def test_the_training_input_masks_crops_as_the_config_says():
  """data.mask_prob and data.mask_start_epoch reach both generators: the host pipeline's
  batches (no crop masked in epoch 0, about half of them after) and the device's recipe."""
  from configs import default
  from sove_jax.data import pipeline, sources
  images = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
  d = default.get_config().data
  d.update(global_size=16, local_size=8, num_local=0, eval_resize=16, eval_crop=16, prefetch=1,
           mask_prob=0.5, mask_ratio_var=0.2, mask_start_epoch=1)
  configuration.validate_data(d, patch_size=4, global_batch_size=32)
  train = pipeline.TrainInput(sources.ArraySource(images, np.arange(64), name="arrays"), d,
                              patch_size=4, global_batch_size=32, seed=0, process_index=0,
                              process_count=1)
  first = np.concatenate([next(train)["mask"] for _ in range(2)])   # epoch 0: 2 batches
  later = np.concatenate([next(train)["mask"] for _ in range(8)])   # epochs 1 to 4
  assert not first.any()
  assert abs(later.any(-1).mean() - 0.5) < 4 * math.sqrt(0.25 / later[..., 0].size)
  recipe = device_masks.MaskRecipe.from_config(d, 4)
  assert (recipe.prob, recipe.start_epoch) == (0.5, 1)
