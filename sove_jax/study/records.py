"""A study's results and what they decide: records, metrics, searches, the settings reported.

Each finished arm x setting x seed is one line of `results.jsonl` (later lines win). A record
holds every stage's JSON under "stages"; records written before stages existed hold "knn" and
"linear_top1" instead and are read as the stages "knn" and "linear".
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import statistics
from typing import Iterable, Sequence

from sove_jax.study import spec as spec_lib
from sove_jax.study.spec import REPORT_K, Arm, Study


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash mid-write: that pair reruns
          continue
  return out


def append_jsonl(path: str, record: dict) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def settings_of(record: dict) -> tuple[tuple[str, float], ...]:
  """A record's searched values: "settings", or (before searches) its "base_lr"."""
  if "settings" in record:
    return tuple(sorted((k, float(v)) for k, v in record["settings"].items()))
  lr = record.get("base_lr")
  return () if lr is None else (("lr", float(lr)),)


def run_key(arm: str, settings) -> tuple:
  return (arm, tuple(sorted((k, float(v)) for k, v in settings)))


def stages_of(record: dict) -> dict:
  """{stage: its JSON} of a record (the old records' "knn" and "linear_top1" included)."""
  stages = dict(record.get("stages") or {})
  if "knn" not in stages and isinstance(record.get("knn"), dict):
    stages["knn"] = {"top1": {"full": record["knn"]}}
  if "linear" not in stages and record.get("linear_top1") is not None:
    stages["linear"] = {"top1": record["linear_top1"], "per_lr": record.get("linear_per_lr", {})}
  return stages


def dig(tree, path: str):
  for part in path.split(".") if path else ():
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def metric(study: Study, record: dict, stage_name: str) -> float | None:
  """The figure of stage `stage_name` in `record` (k-NN: top-1 at k = 20; linear: the best
  rate's top-1), None when that stage has not run on it."""
  try:
    path = study.stage(stage_name).metric_path
  except KeyError:
    path = {"knn": f"top1.full.{REPORT_K}", "linear": "top1"}.get(stage_name, "")
  value = dig(stages_of(record).get(stage_name), path)
  return None if value is None else float(value)


def records_by_run(study: Study, records: Iterable[dict]) -> dict[tuple, dict[int, dict]]:
  """{(arm, settings): {seed: record}} of this study's arms (later lines win)."""
  names = {a.name for a in study.arms}
  out: dict[tuple, dict[int, dict]] = collections.defaultdict(dict)
  for r in records:
    if r.get("arm") in names and isinstance(r.get("seed"), int):
      out[run_key(r["arm"], settings_of(r))][r["seed"]] = r
  return out


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (n - 1); std None for fewer than 2 values."""
  values = [float(v) for v in values if v is not None]
  if not values:
    return None, None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# --------------------------------------------------------------------------- searches


@dataclasses.dataclass
class SearchStep:
  """One coordinate's candidates as far as the results go: value -> mean score (complete ones)."""
  search: spec_lib.Search
  fixed: tuple[tuple[str, float], ...]
  values: list[float]
  scores: dict[float, float]
  best: float | None

  def settings(self, value: float) -> tuple[tuple[str, float], ...]:
    own = () if value == self.search.default else ((self.search.name, value),)
    return tuple(sorted(self.fixed + own))


def search_steps(study: Study, arm: Arm, by_run: dict) -> list[SearchStep]:
  """The arm's search coordinates so far; the last one's `best` is None while it runs."""
  steps, fixed = [], ()
  for search in arm.search:
    values = list(search.values)
    while True:
      step = SearchStep(search, fixed, sorted(values), {}, None)
      complete = True
      for v in step.values:
        runs = by_run.get(run_key(arm.name, step.settings(v)), {})
        scores = [metric(study, runs[s], study.select) if s in runs else None
                  for s in study.search_seeds]
        if any(x is None for x in scores):
          complete = False
        else:
          step.scores[v] = statistics.fmean(scores)
      if not complete:
        steps.append(step)
        return steps
      best = max(step.values, key=lambda v: step.scores[v])   # ties: the smaller value
      if search.factor and len(values) < search.max_values:
        if best == step.values[0]:
          values.append(best / search.factor)
          continue
        if best == step.values[-1]:
          values.append(best * search.factor)
          continue
      step.best = best
      steps.append(step)
      break
    own = () if best == search.default else ((search.name, best),)
    fixed = tuple(sorted(fixed + own))
  return steps


def chosen(study: Study, arm: Arm, by_run: dict) -> tuple | None:
  """The settings the arm's search chose (() without a search), None while it runs."""
  if not arm.search:
    return ()
  steps = search_steps(study, arm, by_run)
  if len(steps) < len(arm.search) or steps[-1].best is None:
    return None
  return steps[-1].settings(steps[-1].best)


def best_rate(study: Study, arm: Arm, by_run: dict) -> tuple[float | None, dict[float, float]]:
  """(best value, {value: score}) of an arm's one-coordinate search (a learning-rate sweep)."""
  steps = search_steps(study, arm, by_run)
  return (steps[0].best, steps[0].scores) if steps else (None, {})


def report_runs(study: Study, by_run: dict) -> dict[str, tuple]:
  """{arm: the settings its table row reports} for arms whose search is decided."""
  out = {}
  for arm in study.arms:
    if arm.same_as:
      continue
    settings = chosen(study, arm, by_run)
    if settings is not None:
      out[arm.name] = settings
  return out
