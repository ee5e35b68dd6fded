"""A study's readings, computed from its records with `stats`: each claim tested and marked
decided or not, a factorial's main effects, a dose-response slope, and the power of each.

The rules: a claim (arm A beats arm B in a metric) is tested with a pooled-variance t-test, the
standard deviation pooled over every row of the study's table (more degrees of freedom than
the two rows alone), Welch's test beside it; the p-values of the study's claims in one metric
are Holm-corrected as one family, and a claim is decided when its corrected p < 0.05 (it holds
when the difference has the claimed sign, is reversed otherwise). Factorial main effects use
the replicates' pure error; each is reported with its 95% interval and Holm-corrected p.
"""
from __future__ import annotations

import math

from sove_jax.study import records as rec
from sove_jax.study import stats
from sove_jax.study.spec import Study

LETTERS = "ABCDEFGHJKLMNOPQ"


def default_metric(study: Study) -> str:
  names = [s.name for s in study.report_stages]
  return "knn" if "knn" in names else (names[0] if names else study.select)


def rows(study: Study, by_run: dict, seeds=None) -> dict[str, dict[int, dict]]:
  """{arm: {seed: record}} of every table row at the setting it reports (`seeds`: only these)."""
  chosen = rec.report_runs(study, by_run)
  out = {}
  for arm in study.arms:
    target = arm.same_as or arm.name
    if target not in chosen:
      continue
    runs = by_run.get(rec.run_key(target, chosen[target]), {})
    wanted = set(study.seeds) | set(study.more_seeds) if seeds is None else set(seeds)
    out[arm.name] = {s: r for s, r in runs.items() if s in wanted}
  return out


def values(study: Study, runs: dict[int, dict], metric: str) -> list[float]:
  return [v for v in (rec.metric(study, r, metric) for _, r in sorted(runs.items()))
          if v is not None]


def pooled(study: Study, table: dict, metric: str) -> tuple[float, int] | None:
  """The within-row sd pooled over the table's rows (rows reporting the same runs once)."""
  seen, groups = set(), []
  for arm in study.arms:
    target = arm.same_as or arm.name
    if arm.name in table and target not in seen:
      seen.add(target)
      groups.append(values(study, table[arm.name], metric))
  try:
    return stats.pooled_sd(groups)
  except ValueError:
    return None


def claims(study: Study, table: dict) -> list[dict]:
  """Each claim with its tests; Holm over the claims of one metric."""
  out = []
  for c in study.claims:
    metric = c.get("metric") or default_metric(study)
    a = values(study, table.get(c["better"], {}), metric)
    b = values(study, table.get(c["worse"], {}), metric)
    verdict = dict(better=c["better"], worse=c["worse"], metric=metric, paper=c.get("paper"),
                   n=(len(a), len(b)), decided=False, reading="not decided", test=None)
    sd = pooled(study, table, metric)
    if sd is not None and len(a) >= 1 and len(b) >= 1 and len(a) + len(b) >= 3:
      verdict["test"] = stats.t_test(a, b, sd=sd[0], df=sd[1])
      verdict["sd"] = sd
      verdict["detectable"] = stats.detectable(stats.two_sample_se(sd[0], len(a), len(b)), sd[1])
      if len(a) > 1 and len(b) > 1 and (min(a) != max(a) or min(b) != max(b)):
        verdict["welch"] = stats.welch_test(a, b)
    out.append(verdict)
  for metric in {v["metric"] for v in out}:
    family = [v for v in out if v["metric"] == metric and v["test"] is not None]
    for v, p in zip(family, stats.holm([v["test"]["p"] for v in family])):
      v["holm_p"] = p
      v["decided"] = p < stats.ALPHA
      v["reading"] = ("not decided" if not v["decided"] else
                      "holds" if v["test"]["diff"] > 0 else "reversed")
  return out


def factorial(study: Study, table: dict, metric: str) -> dict | None:
  """Main effects of the study's factors (arms with `levels`), None before 2 runs a point."""
  names = [f["name"] for f in study.factors]
  letters = dict(zip(names, LETTERS))
  levels, ys = [], []
  for arm in study.arms:
    if arm.levels and arm.name in table:
      for v in values(study, table[arm.name], metric):
        levels.append(dict(arm.levels))
        ys.append(v)
  points = {tuple(sorted(lv.items())) for lv in levels}
  if len(ys) <= len(points):
    return None
  fit = stats.effects(levels, ys, names)
  ps = stats.holm([fit["effects"][n]["p"] for n in names])
  generators = [_to_letters(g, names, letters) for g in study.generators]
  for n, p in zip(names, ps):
    e = fit["effects"][n]
    e["holm_p"] = p
    e["aliases"] = [a for a in stats.aliases(letters[n], generators) if a != letters[n]]
  fit.update(letters=letters, runs=len(ys), points=len(points),
             resolution=stats.resolution(generators),
             detectable=stats.detectable(stats.factorial_se(fit["sd"], len(ys)), fit["df"]))
  return fit


def _to_letters(generator: str, names, letters) -> str:
  """A generator written in factor names ("K=J*labels*T") or letters ("E=ABC") as letters."""
  left, right = generator.split("=")
  if left in letters:
    return letters[left] + "=" + "".join(letters[n] for n in right.split("*"))
  return generator


def dose(study: Study, table: dict, metric: str) -> dict | None:
  """The straight-line fit of the metric on the dose (log2 of it with scale "log2")."""
  if not study.dose:
    return None
  log = study.dose.get("scale", "log2") == "log2"
  xs, ys, levels = [], [], {}
  for arm in study.arms:
    if arm.dose is not None and arm.name in table:
      vs = values(study, table[arm.name], metric)
      levels[arm.dose] = vs
      xs += [math.log2(arm.dose) if log else arm.dose] * len(vs)
      ys += vs
  if len(set(xs)) < 2 or len(xs) < 3:
    return None
  fit = stats.line_fit(xs, ys)
  fit.update(levels=dict(sorted(levels.items())), log2=log, runs=len(xs),
             detectable=stats.detectable(fit["se"], fit["df"]))
  return fit
