"""The statistics a study's readings rest on, in one place.

- Two-sample t-tests: pooled variance (optionally with a standard deviation pooled over more
  groups than the two compared, which buys degrees of freedom) and Welch's; Holm's step-down
  correction for a family of claims.
- Two-level (fractional) factorials: the design from its generators, the defining relation,
  the aliases of each effect and the resolution; main effects with standard errors, 95%
  intervals and p-values, the error taken from replicates (pure error) where there are any.
- A straight-line fit (the dose-response of a setting), and power: the probability that a
  t-test detects an effect of a given size, the smallest effect detected at 80%, and the number
  of replicates a factorial needs for it.

Every function is checked against scipy.stats or a hand-computed value in tests/test_study.py.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
from scipy import optimize
from scipy import stats as sps

ALPHA = 0.05


def _two_sided(t: float, df: float) -> float:
  return float(2.0 * sps.t.sf(abs(t), df))


def _interval(estimate: float, se: float, df: float, level: float = 0.95) -> tuple[float, float]:
  half = float(sps.t.ppf(0.5 + level / 2, df)) * se
  return estimate - half, estimate + half


def pooled_sd(groups: Sequence[Sequence[float]]) -> tuple[float, int]:
  """(sd, degrees of freedom) pooled over groups: sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1));
  groups of one value add nothing."""
  ss, df = 0.0, 0
  for g in groups:
    g = np.asarray(g, float)
    if g.size > 1:
      ss += float(((g - g.mean()) ** 2).sum())
      df += g.size - 1
  if df == 0:
    raise ValueError("pooled_sd needs a group of at least 2 values")
  return math.sqrt(ss / df), df


def t_test(a: Sequence[float], b: Sequence[float], *, sd: float | None = None,
           df: int | None = None) -> dict:
  """Pooled-variance two-sample t-test of mean(a) - mean(b).

  Without `sd` the variance is pooled over a and b (Student's test, scipy's
  ttest_ind(equal_var=True)); with `sd` and its `df` (a pooled_sd over more groups), that sd.
  Returns diff, se, t, df, p (two-sided) and the 95% interval ci.
  """
  a, b = np.asarray(a, float), np.asarray(b, float)
  if sd is None:
    sd, df = pooled_sd([a, b])
  se = sd * math.sqrt(1 / a.size + 1 / b.size)
  diff = float(a.mean() - b.mean())
  t = diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0
  return dict(diff=diff, se=se, t=t, df=df, p=_two_sided(t, df) if se > 0 else float(diff == 0),
              ci=_interval(diff, se, df))


def welch_test(a: Sequence[float], b: Sequence[float]) -> dict:
  """Welch's t-test of mean(a) - mean(b) (scipy's ttest_ind(equal_var=False)): each group its
  own variance, Welch-Satterthwaite degrees of freedom. Same keys as t_test."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  se = math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  diff = float(a.mean() - b.mean())
  t = diff / se
  return dict(diff=diff, se=se, t=t, df=df, p=_two_sided(t, df), ci=_interval(diff, se, df))


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values, in the given order: the i-th smallest p times (m - i),
  made monotone and capped at 1. A claim is decided at level alpha when its adjusted p < alpha;
  the family-wise error rate is then at most alpha."""
  m = len(pvalues)
  order = sorted(range(m), key=lambda i: pvalues[i])
  adjusted, running = [0.0] * m, 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * pvalues[i]))
    adjusted[i] = running
  return adjusted


# --------------------------------------------------------------------------- power


def power(effect: float, se: float, df: float, alpha: float = ALPHA) -> float:
  """Probability that a two-sided t-test at level alpha rejects when the true effect is
  `effect` and its estimate has standard error `se` with `df` degrees of freedom (noncentral t)."""
  crit = float(sps.t.ppf(1 - alpha / 2, df))
  nc = abs(effect) / se
  p = float(sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc))
  if not math.isfinite(p):   # scipy's noncentral t fails far in its tail: power is 1 there
    p = float(sps.norm.sf(crit - nc) + sps.norm.cdf(-crit - nc))
  return p


def detectable(se: float, df: float, target: float = 0.8, alpha: float = ALPHA) -> float:
  """The smallest effect a two-sided t-test detects with probability `target`."""
  high = 4 * se
  while power(high, se, df, alpha) < target:
    high *= 2
  return float(optimize.brentq(lambda e: power(e, se, df, alpha) - target, 0.0, high))


def two_sample_se(sd: float, n_a: int, n_b: int) -> float:
  return sd * math.sqrt(1 / n_a + 1 / n_b)


def factorial_se(sd: float, runs: int) -> float:
  """Standard error of a two-level main effect (mean at + minus mean at -) over `runs` runs."""
  return 2 * sd / math.sqrt(runs)


def replicates_for(effect: float, sd: float, design_runs: int, *, target: float = 0.8,
                   alpha: float = ALPHA, max_replicates: int = 64) -> tuple[int, float]:
  """(replicates, power): the fewest replicates of a `design_runs`-point two-level design whose
  main effects detect `effect` with probability >= target, the error from the replicates
  (design_runs * (r - 1) degrees of freedom)."""
  for r in range(2, max_replicates + 1):
    runs = r * design_runs
    p = power(effect, factorial_se(sd, runs), design_runs * (r - 1), alpha)
    if p >= target:
      return r, p
  raise ValueError(f"more than {max_replicates} replicates needed")


# --------------------------------------------------------------------------- factorials


def _word(letters: str) -> frozenset:
  return frozenset(letters)


def _name(word: frozenset) -> str:
  return "".join(sorted(word)) or "I"


def defining_relation(generators: Sequence[str]) -> list[str]:
  """Words of the defining relation of generators like "E=ABC": each generator's word (ABCE)
  and every product of them (symmetric differences), sorted by length."""
  words = [_word(g.replace("=", "")) for g in generators]
  out = set()
  for k in range(1, len(words) + 1):
    for combo in itertools.combinations(words, k):
      w = frozenset()
      for x in combo:
        w = w ^ x
      out.add(w)
  return sorted((_name(w) for w in out), key=lambda s: (len(s), s))


def resolution(generators: Sequence[str]) -> int:
  """The shortest word of the defining relation (a full factorial: infinity)."""
  words = defining_relation(generators)
  return min(len(w) for w in words) if words else math.inf


def aliases(effect: str, generators: Sequence[str], max_order: int = 3) -> list[str]:
  """The effects aliased with `effect` ("A", "AB") up to `max_order` factors."""
  e = _word(effect)
  out = {_name(e ^ _word(w)) for w in defining_relation(generators)}
  return sorted((a for a in out if len(a) <= max_order), key=lambda s: (len(s), s))


def design(factors: str, generators: Sequence[str]) -> list[dict[str, int]]:
  """The two-level design on `factors` (letters, e.g. "ABCDEF"): a full factorial in the
  factors no generator defines, in standard order (the first factor alternating fastest), the
  others the products the generators give ("E=ABC": E = A * B * C)."""
  defined = {g.split("=")[0]: g.split("=")[1] for g in generators}
  base = [f for f in factors if f not in defined]
  rows = []
  for i in range(2 ** len(base)):
    row = {f: (1 if (i >> j) & 1 else -1) for j, f in enumerate(base)}
    for f, word in defined.items():
      row[f] = int(np.prod([row[x] for x in word]))
    rows.append({f: row[f] for f in factors})
  return rows


def effects(levels: Sequence[dict[str, int]], y: Sequence[float], factors: Sequence[str]) -> dict:
  """Main effects (mean of y at + minus at -) of a two-level design, one entry per factor with
  effect, se, t, df, p and the 95% ci, and the error used: "pure" (the spread of runs at the
  same design point, when any point is replicated) or "model" (the residual of a fit of the
  main effects). Assumes a balanced design (each factor half + and half -)."""
  y = np.asarray(y, float)
  x = np.array([[lv[f] for f in factors] for lv in levels], float)
  cells: dict[tuple, list[float]] = {}
  for row, v in zip(map(tuple, x), y):
    cells.setdefault(row, []).append(v)
  if any(len(v) > 1 for v in cells.values()):
    sd, df = pooled_sd(list(cells.values()))
    source = "pure"
  else:
    design_matrix = np.column_stack([np.ones(len(y)), x])
    beta, *_ = np.linalg.lstsq(design_matrix, y, rcond=None)
    resid = y - design_matrix @ beta
    df = len(y) - design_matrix.shape[1]
    if df < 1:
      raise ValueError("no degrees of freedom left for the error: replicate the design")
    sd = math.sqrt(float(resid @ resid) / df)
    source = "model"
  out = {}
  for j, f in enumerate(factors):
    hi, lo = y[x[:, j] > 0], y[x[:, j] < 0]
    est = float(hi.mean() - lo.mean())
    se = sd * math.sqrt(1 / hi.size + 1 / lo.size)
    t = est / se
    out[f] = dict(effect=est, se=se, t=t, df=df, p=_two_sided(t, df), ci=_interval(est, se, df))
  return dict(effects=out, sd=sd, df=df, error=source)


# --------------------------------------------------------------------------- dose-response


def line_fit(x: Sequence[float], y: Sequence[float]) -> dict:
  """Least-squares y = intercept + slope * x (scipy's linregress), with the slope's se, t,
  df = n - 2, two-sided p and 95% interval, and the residual sd."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  xm = x - x.mean()
  sxx = float(xm @ xm)
  slope = float(xm @ (y - y.mean())) / sxx
  intercept = float(y.mean() - slope * x.mean())
  resid = y - intercept - slope * x
  df = len(x) - 2
  sd = math.sqrt(float(resid @ resid) / df)
  se = sd / math.sqrt(sxx)
  if se == 0:   # the points lie on the line: a slope known exactly
    return dict(slope=slope, intercept=intercept, se=0.0, t=math.copysign(math.inf, slope),
                df=df, p=0.0 if slope else 1.0, ci=(slope, slope), sd=0.0)
  t = slope / se
  return dict(slope=slope, intercept=intercept, se=se, t=t, df=df, p=_two_sided(t, df),
              ci=_interval(slope, se, df), sd=sd)


def one_way_anova(groups: Sequence[Sequence[float]]) -> tuple[float, float]:
  """(F, p) of a one-way analysis of variance (scipy's f_oneway)."""
  groups = [np.asarray(g, float) for g in groups]
  allv = np.concatenate(groups)
  between = sum(g.size * (g.mean() - allv.mean()) ** 2 for g in groups)
  within = sum(((g - g.mean()) ** 2).sum() for g in groups)
  df_b, df_w = len(groups) - 1, allv.size - len(groups)
  f = (between / df_b) / (within / df_w)
  return float(f), float(sps.f.sf(f, df_b, df_w))
