"""Patch masks: exact counts, ratios within their range, blocks of >= min_patches, seeded."""
import numpy as np
import pytest

from sove_jax.data import masking


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


@pytest.mark.parametrize("grid,ratio,var",
                         [((14, 14), 0.3, 0.0), ((14, 14), 0.3, 0.2), ((4, 4), 0.3, 0.0)])
def test_block_masks_have_exact_counts_in_range_and_blocks_of_at_least_four(grid, ratio, var):
  n, L = 400, grid[0] * grid[1]
  m = masking.masks([7, 1], n, grid, "block", ratio, var, min_patches=4).numpy()
  assert m.shape == (n, L) and m.dtype == bool
  counts = m.sum(1)
  lo, hi = masking.masked_count(ratio - var, L), masking.masked_count(ratio + var, L)
  assert counts.min() >= lo and counts.max() <= hi
  assert abs(counts.mean() / L - ratio) < 0.02
  if var:  # the ratio really varies over its whole range
    assert counts.min() <= lo + 0.1 * (hi - lo) and counts.max() >= hi - 0.1 * (hi - lo)
  for mask in m.reshape(n, *grid):
    assert min(_components(mask)) >= 4
  # Blocks, not scattered patches: far fewer pieces than a random mask of the same size.
  pieces = np.mean([len(_components(x)) for x in m.reshape(n, *grid)])
  scattered = masking.masks([7, 1], n, grid, "random", ratio, var).numpy()
  assert pieces < 0.5 * np.mean([len(_components(x)) for x in scattered.reshape(n, *grid)])


def test_random_masks_have_ratio_in_range_and_cover_every_patch():
  n, grid, L = 2000, (14, 14), 196
  m = masking.masks([3, 4], n, grid, "random", 0.7, 0.1).numpy()
  counts = m.sum(1)
  assert counts.min() >= masking.masked_count(0.6, L)
  assert counts.max() <= masking.masked_count(0.8, L)
  assert abs(counts.mean() / L - 0.7) < 0.01
  freq = m.mean(0)  # every position equally likely
  assert abs(freq.mean() - 0.7) < 0.01 and freq.min() > 0.6 and freq.max() < 0.8


def test_masks_follow_the_seed():
  a = masking.masks([1, 2], 64, (14, 14), "block", 0.3).numpy()
  b = masking.masks([1, 2], 64, (14, 14), "block", 0.3).numpy()
  c = masking.masks([1, 3], 64, (14, 14), "block", 0.3).numpy()
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert (a[0] != a[1:]).any(axis=1).all()  # masks within a call differ too
