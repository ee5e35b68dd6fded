r"""Ablation studies at equal budget: arms x seeds, each trained, evaluated and tabulated.

    python -m sove_jax.study --arms=studies/table7.py --seeds=0,1,2 --out=runs/table7

A study is a list of arms, each a name and a set of config overrides in the command line's
syntax (`--config.sove.num_neighbors=3`), run for every seed at the same budget: the study's
common overrides fix the length, the batch and the base config for every arm, and an arm may not
change them. Each arm x seed is trained by `python -m sove_jax.main` in its own process, in
`OUT/<arm>/seed<N>` (`OUT/<arm>/lr<rate>/seed<N>` in a learning-rate sweep), then evaluated by
`python -m sove_jax.evaluate.knn` (k-NN on the whole test split; the tables show k = 20) and
`python -m sove_jax.evaluate.linear` (linear probe, best of its learning rates). The seed sets
the initialization and the data order, so at one seed every arm sees the same images.

The runner never imports TensorFlow or the trainer: it runs commands and reads the files they
write (`metrics.jsonl`, `knn.json`, `linear.json`). It is resumable: each finished arm x seed is
one line of `OUT/results.jsonl` and is skipped when the study runs again; a killed training run
resumes from its last checkpoint (the trainer does that for a workdir it finds), a finished
stage (training, k-NN, linear) is not repeated (`study.json` in the workdir remembers).
After every finished pair it rewrites `OUT/results.md` (one markdown table per group: mean and
standard deviation over seeds) and `OUT/results.png` (bars with the spread).

The study file is Python (a module-level `STUDY`, or `get_study()` returning it) or JSON:

    STUDY = dict(
        config="configs/default.py",            # base config of every arm
        overrides=["--config.total_steps=749"],  # the budget, common to every arm
        seeds=[0, 1, 2],                         # default of --seeds
        sweep_seeds=1,          # a sweep tries every rate on the first seed(s) only, and runs
                                # the best rate on the others (default: every seed)
        knn_args=[], linear_args=["--epochs=100"],   # extra flags of the evaluators
        notes="...",            # markdown printed under the report's first paragraph
        arms=[
            dict(name="SOVE", group="Table 7", overrides=[], base_lrs=[5e-4, 1e-3, 2e-3],
                 paper=dict(knn=70.0, linear=74.3)),   # the published figures, for the report
            dict(name="SOVE [CLS] only", group="Table 7",
                 overrides={"sove.patch_weight": 0.0}),
        ],
    )

`overrides` is a list of `--config.FIELD=VALUE` strings or a dict {FIELD: value}. An arm with
`base_lrs` (or the study's `base_lrs`, for arms without their own) is a learning-rate sweep:
one run per rate, and its table row reports the best rate by mean k-NN top-1 (`--select=linear`:
by linear top-1) over the seeds every rate ran; the sweep's every rate is listed below the
tables. An arm's `paper` figures are printed beside its own in the report's table. An arm with
`same_as=NAME` (and no overrides) is a row that reports the runs of arm NAME: the same config in
several tables trains once. A bare list of arms is a study with the defaults above.

A Python study file may define `get_study(config)`: the runner passes it the base config's path
when `--config` names one (else None), so a study can derive its arms' values from that config
(a learning-rate sweep around its `optim.base_lr`, anchors as fractions of its bank) and stays
right when the config changes.

`--only=NAME,...` runs (and reports) the arms so named, or every arm of the groups so named;
`--knn_args` and `--linear_args` add evaluator flags (e.g. subsets of the splits for a quick
check of a whole study; docs/study.md).
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import datetime
import importlib.util
import inspect
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Iterable, Sequence

RESULTS = "results.jsonl"
FAILURES = "failures.jsonl"
STATE = "study.json"
DEFAULT_KS = (10, 20, 100, 200)
REPORT_K = 20
# Fields that set the budget or the data order: the same for every arm, set by the study.
BUDGET_FIELDS = ("seed", "batch_size", "total_steps", "num_epochs", "run_steps")


class StudyError(ValueError):
  """A study definition that cannot run; the message is meant for the user as it is."""


class StudyInterrupted(RuntimeError):
  """The study was asked to stop (SIGTERM, or the trainer was preempted); rerun to continue."""


# --------------------------------------------------------------------------- the study


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  group: str
  overrides: tuple[str, ...]
  base_lrs: tuple[float, ...] = ()   # empty: no learning-rate sweep
  paper_knn: float | None = None     # the published figures for this row, shown beside ours
  paper_linear: float | None = None
  same_as: str = ""                  # another arm's name: this row reports that arm's runs


@dataclasses.dataclass(frozen=True)
class Run:
  """One arm at one learning rate: the unit that is repeated over seeds."""
  arm: Arm
  base_lr: float | None = None

  @property
  def label(self) -> str:
    return self.arm.name if self.base_lr is None else f"{self.arm.name} (lr {self.base_lr:g})"

  def workdir(self, out: str, seed: int) -> str:
    parts = [out, slug(self.arm.name)]
    if self.base_lr is not None:
      parts.append(f"lr{self.base_lr:g}")
    return os.path.join(*parts, f"seed{seed}")


@dataclasses.dataclass(frozen=True)
class Study:
  arms: tuple[Arm, ...]
  config: str = "configs/default.py"
  overrides: tuple[str, ...] = ()
  seeds: tuple[int, ...] = (0,)
  sweep_seeds: int | None = None      # None: every seed
  knn_ks: tuple[int, ...] = DEFAULT_KS
  knn_args: tuple[str, ...] = ()
  linear_args: tuple[str, ...] = ()
  select: str = "knn"                 # "knn" | "linear": how a sweep's best rate is chosen
  name: str = "study"
  notes: str = ""                     # markdown for the report, under its first paragraph

  @property
  def num_sweep_seeds(self) -> int:
    return len(self.seeds) if self.sweep_seeds is None else min(self.sweep_seeds, len(self.seeds))

  def overrides_for(self, run: Run, seed: int) -> list[str]:
    lr = [] if run.base_lr is None else [f"--config.optim.base_lr={run.base_lr!r}"]
    return [*self.overrides, *run.arm.overrides, *lr, f"--config.seed={seed}"]


def slug(name: str) -> str:
  """A directory name for an arm: lower case, runs of other characters as one '-'."""
  return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "arm"


def _format_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(_format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def normalize_overrides(overrides: Any, where: str) -> tuple[str, ...]:
  """`--config.FIELD=VALUE` strings from a list of such strings (the `--` optional) or a dict."""
  if overrides is None:
    return ()
  if isinstance(overrides, dict):
    items = [f"--config.{k}={_format_value(v)}" for k, v in overrides.items()]
  elif isinstance(overrides, (list, tuple)):
    items = []
    for o in overrides:
      if not isinstance(o, str):
        raise StudyError(f"{where}: override {o!r} is not a string like --config.FIELD=VALUE.")
      items.append(o if o.startswith("--") else "--" + o)
  else:
    raise StudyError(f"{where}: overrides must be a list of --config.FIELD=VALUE strings or a "
                     f"dict, got {type(overrides).__name__}.")
  for o in items:
    if not re.fullmatch(r"--config\.[A-Za-z_][\w.]*=.*", o, flags=re.S):
      raise StudyError(f"{where}: override {o!r} is not of the form --config.FIELD=VALUE.")
  return tuple(items)


def override_field(override: str) -> str:
  return override[len("--config."):].split("=", 1)[0]


def _ints(values, what: str) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in values)
  except (TypeError, ValueError):
    raise StudyError(f"{what} must be a list of integers, got {values!r}.") from None
  if not out:
    raise StudyError(f"{what} is empty.")
  if len(set(out)) != len(out):
    raise StudyError(f"{what} repeats a value: {list(out)}.")
  return out


def _floats(values, what: str) -> tuple[float, ...]:
  try:
    out = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise StudyError(f"{what} must be a list of numbers, got {values!r}.") from None
  if any(not math.isfinite(v) or v <= 0 for v in out) or len(set(out)) != len(out):
    raise StudyError(f"{what} must hold distinct positive learning rates, got {list(out)}.")
  return out


def make_study(spec: Any, *, name: str = "study") -> Study:
  """A validated Study from a dict (or a bare list of arms); StudyError names the problem."""
  if isinstance(spec, (list, tuple)):
    spec = {"arms": list(spec)}
  if not isinstance(spec, dict):
    raise StudyError(f"the study must be a dict with 'arms' (or a list of arms), got "
                     f"{type(spec).__name__}.")
  known = {"arms", "config", "overrides", "seeds", "sweep_seeds", "knn_ks", "knn_args",
           "linear_args", "select", "base_lrs", "name", "notes"}
  unknown = sorted(set(spec) - known)
  if unknown:
    raise StudyError(f"unknown study field(s) {unknown}; known: {sorted(known)}.")
  common = normalize_overrides(spec.get("overrides"), "study overrides")
  default_lrs = _floats(spec["base_lrs"], "study base_lrs") if spec.get("base_lrs") else ()
  arms_spec = spec.get("arms")
  if not arms_spec:
    raise StudyError("the study has no arms.")
  arms, slugs = [], {}
  for i, a in enumerate(arms_spec):
    if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not a["name"].strip():
      raise StudyError(f"arm {i} must be a dict with a non-empty 'name'.")
    extra = sorted(set(a) - {"name", "group", "overrides", "base_lrs", "paper", "same_as"})
    if extra:
      raise StudyError(f"arm {a['name']!r} has unknown field(s) {extra}; known: name, group, "
                       "overrides, base_lrs, paper, same_as.")
    same_as = a.get("same_as") or ""
    if same_as and (not isinstance(same_as, str) or a.get("overrides") or a.get("base_lrs")):
      raise StudyError(f"arm {a['name']!r} reports the runs of arm {same_as!r} (same_as), so it "
                       "cannot have overrides or base_lrs of its own.")
    paper = a.get("paper") or {}
    if (not isinstance(paper, dict) or set(paper) - {"knn", "linear"}
        or not all(isinstance(v, (int, float)) for v in paper.values())):
      raise StudyError(f"arm {a['name']!r}: paper must be a dict with numbers 'knn' and/or "
                       f"'linear', got {paper!r}.")
    overrides = normalize_overrides(a.get("overrides"), f"arm {a['name']!r}")
    lrs = a.get("base_lrs", None)
    lrs = default_lrs if lrs is None else (_floats(lrs, f"arm {a['name']!r} base_lrs")
                                           if lrs else ())
    arm = Arm(name=a["name"], group=str(a.get("group") or "Results"), overrides=overrides,
              base_lrs=() if same_as else lrs, paper_knn=paper.get("knn"),
              paper_linear=paper.get("linear"), same_as=same_as)
    if slug(arm.name) in slugs:
      raise StudyError(f"arms {slugs[slug(arm.name)]!r} and {arm.name!r} would share the "
                       f"directory {slug(arm.name)!r}; rename one.")
    slugs[slug(arm.name)] = arm.name
    arms.append(arm)
  by_name = {a.name: a for a in arms}
  for arm in arms:
    target = by_name.get(arm.same_as)
    if arm.same_as and (target is None or target.same_as or target.base_lrs):
      raise StudyError(f"arm {arm.name!r}: same_as={arm.same_as!r} must name an arm of the study "
                       "that runs itself at one learning rate (no same_as, no base_lrs).")

  seeds = _ints(spec.get("seeds", (0,)), "seeds")
  sweep_seeds = spec.get("sweep_seeds")
  if sweep_seeds is not None and (not isinstance(sweep_seeds, int) or sweep_seeds < 1):
    raise StudyError(f"sweep_seeds={sweep_seeds!r} must be a positive integer.")
  ks = _ints(spec.get("knn_ks", DEFAULT_KS), "knn_ks")
  if REPORT_K not in ks:
    raise StudyError(f"knn_ks={list(ks)} must include k = {REPORT_K}, the k the tables report.")
  select = spec.get("select", "knn")
  if select not in ("knn", "linear"):
    raise StudyError(f"select={select!r} must be 'knn' or 'linear'.")
  study = Study(arms=tuple(arms), config=str(spec.get("config", "configs/default.py")),
                overrides=common, seeds=seeds, sweep_seeds=sweep_seeds, knn_ks=ks,
                knn_args=tuple(spec.get("knn_args", ())),
                linear_args=tuple(spec.get("linear_args", ())), select=select,
                name=str(spec.get("name", name)), notes=str(spec.get("notes", "")))
  _check_budget(study)
  return study


def _check_budget(study: Study) -> None:
  """Every arm at the same budget, every field set once: no override can silently win."""
  for o in study.overrides:
    if override_field(o) == "seed":
      raise StudyError("the study's overrides set config.seed; seeds come from --seeds (or the "
                       "study's 'seeds').")
  for arm in study.arms:
    for o in arm.overrides:
      field = override_field(o)
      if field in BUDGET_FIELDS:
        raise StudyError(f"arm {arm.name!r} overrides config.{field}: every arm runs at the same "
                         "budget, so set it in the study's common overrides.")
      if field == "optim.base_lr" and arm.base_lrs:
        raise StudyError(f"arm {arm.name!r} sets optim.base_lr and sweeps base_lrs; keep one.")
    fields = [override_field(o) for o in study.overrides_for(Run(arm, arm.base_lrs[0]
                                                                  if arm.base_lrs else None), 0)]
    twice = sorted({f for f in fields if fields.count(f) > 1})
    if twice:
      raise StudyError(f"arm {arm.name!r} sets config.{twice[0]} twice (common overrides and the "
                       "arm's); set it once.")


def load_study(path: str, config: str | None = None) -> Study:
  """Reads a study file: Python (STUDY, get_study() or get_study(config)) or JSON.

  `config` (the `--config` flag, or None) goes to a `get_study` that takes an argument.
  """
  if not os.path.isfile(path):
    raise StudyError(f"--arms={path}: no such file.")
  name = os.path.splitext(os.path.basename(path))[0]
  if path.endswith(".json"):
    try:
      with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    except json.JSONDecodeError as e:
      raise StudyError(f"--arms={path} is not valid JSON: {e}.") from None
  elif path.endswith(".py"):
    module_spec = importlib.util.spec_from_file_location(f"_study_{slug(name)}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if hasattr(module, "get_study"):
      takes_config = bool(inspect.signature(module.get_study).parameters)
      spec = module.get_study(config) if takes_config else module.get_study()
    elif hasattr(module, "STUDY"):
      spec = module.STUDY
    else:
      raise StudyError(f"--arms={path} defines neither STUDY nor get_study().")
  else:
    raise StudyError(f"--arms={path} must be a .py or .json file.")
  return make_study(spec, name=name)


# --------------------------------------------------------------------------- results and tables


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


def record_key(arm: str, base_lr: float | None, seed: int) -> tuple:
  return (arm, None if base_lr is None else float(base_lr), int(seed))


def metric(record: dict, which: str) -> float | None:
  if which == "knn":
    return record.get("knn", {}).get(str(REPORT_K))
  return record.get("linear_top1")


@dataclasses.dataclass
class Summary:
  n: int
  knn: tuple[float | None, float | None]      # mean, std (None with fewer than 2 seeds)
  linear: tuple[float | None, float | None]
  steps: int | None
  images_per_sec: float | None
  train_seconds: float | None


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (n - 1); std None for fewer than 2 values."""
  values = [float(v) for v in values if v is not None]
  if not values:
    return None, None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(records: Sequence[dict]) -> Summary:
  mean_of = lambda key: mean_std([r[key] for r in records if r.get(key) is not None])[0]
  steps = [r["steps"] for r in records if r.get("steps") is not None]
  return Summary(n=len(records), knn=mean_std([metric(r, "knn") for r in records]),
                 linear=mean_std([metric(r, "linear") for r in records]),
                 steps=max(steps) if steps else None, images_per_sec=mean_of("images_per_sec"),
                 train_seconds=mean_of("train_seconds"))


def records_by_run(study: Study, records: Iterable[dict]) -> dict[tuple, dict[int, dict]]:
  """{(arm, base_lr): {seed: record}} of this study's arms and seeds (later lines win)."""
  names = {a.name for a in study.arms}
  out: dict[tuple, dict[int, dict]] = collections.defaultdict(dict)
  for r in records:
    if r.get("arm") in names and r.get("seed") in study.seeds:
      key = record_key(r["arm"], r.get("base_lr"), r["seed"])
      out[key[:2]][key[2]] = r
  return out


def best_rate(study: Study, arm: Arm, by_run: dict) -> tuple[float | None, dict[float, float]]:
  """(best base_lr, {rate: score}) of a sweep: the mean selection metric over the sweep seeds.

  The best is None until every rate has finished every sweep seed. Ties go to the smaller rate.
  """
  sweep_seeds = study.seeds[:study.num_sweep_seeds]
  scores, complete = {}, True
  for lr in arm.base_lrs:
    runs = by_run.get((arm.name, lr), {})
    values = [metric(runs[s], study.select) for s in sweep_seeds if s in runs]
    if len(values) < len(sweep_seeds) or any(v is None for v in values):
      complete = False
    if values and all(v is not None for v in values):
      scores[lr] = statistics.fmean(values)
  if not complete or not scores:
    return None, scores
  return max(sorted(scores), key=lambda lr: scores[lr]), scores


def _pm(mean_and_std, digits=2) -> str:
  mean, std = mean_and_std
  if mean is None:
    return "–"
  return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "–"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def row_label(arm: Arm) -> str:
  """An arm's name in its table and chart: without its group's name when it starts with it
  ("Table 9: soft" in group "Table 9" is "soft"); names stay unique in the study."""
  prefix = arm.group + ": "
  return arm.name[len(prefix):] if arm.name.startswith(prefix) and arm.name != prefix else arm.name


def _rate(lr: float | None) -> str:
  return "–" if lr is None else f"{lr:g}"


def table_rows(study: Study, by_run: dict) -> list[dict]:
  """One row per arm, in study order: the arm's run, or its sweep's best rate."""
  rows = []
  for arm in study.arms:
    row = dict(arm=arm, group=arm.group, base_lr=None, note="")
    if arm.same_as:
      row["summary"] = summarize(list(by_run.get((arm.same_as, None), {}).values()))
      rows.append(row)
      continue
    if arm.base_lrs:
      lr, scores = best_rate(study, arm, by_run)
      if lr is None:
        row["note"] = f"sweep running ({len(scores)}/{len(arm.base_lrs)} rates scored)"
        row["summary"] = summarize([])
      else:
        row["base_lr"] = lr
        row["note"] = f"best of {len(arm.base_lrs)}"
        row["summary"] = summarize(list(by_run.get((arm.name, lr), {}).values()))
    else:
      row["summary"] = summarize(list(by_run.get((arm.name, None), {}).values()))
    rows.append(row)
  return rows


def markdown(study: Study, records: Sequence[dict], failures: Sequence[dict] = ()) -> str:
  by_run = records_by_run(study, records)
  rows = table_rows(study, by_run)
  sweeps = [a for a in study.arms if a.base_lrs]
  seeds = ", ".join(map(str, study.seeds))
  budget = " ".join(f"`{o}`" for o in study.overrides) or "(the base config's)"
  subset = any("max_eval_examples" in a or "max_train_examples" in a for a in study.knn_args)
  split = ("test split, subsets as the evaluator flags below say" if subset
           else "whole test split")
  lines = [
      f"# {study.name}",
      "",
      f"Every arm trains `python -m sove_jax.main --config={study.config}` with its overrides at "
      f"the same budget: {budget}. Seeds {seeds} (the seed sets the initialization and the data "
      "order). Values are the mean ± sample standard deviation (n - 1) over the seeds finished "
      f"(column n): k-NN is the top-1 (%) at k = {REPORT_K} on the {split}, linear the best "
      "top-1 (%) of the linear probe's learning rates.",
  ]
  flags = [f"k-NN `{' '.join(study.knn_args)}`" if study.knn_args else "",
           f"linear `{' '.join(study.linear_args)}`" if study.linear_args else ""]
  if any(flags):
    lines += ["", "Evaluator flags: " + "; ".join(f for f in flags if f) + "."]
  if study.notes:
    lines += ["", study.notes.strip()]
  if sweeps:
    sweep_seeds = ", ".join(map(str, study.seeds[:study.num_sweep_seeds]))
    lines += ["", f"Learning-rate sweeps report the best `optim.base_lr` by mean "
              f"{'k-NN' if study.select == 'knn' else 'linear'} top-1 over seed(s) {sweep_seeds}; "
              "every rate is listed under \"Learning-rate sweeps\"."]
  for group in dict.fromkeys(r["group"] for r in rows):
    group_rows = [r for r in rows if r["group"] == group]
    with_lr = any(r["arm"].base_lrs for r in group_rows)
    paper = [(label, key) for label, key in (("Paper k-NN", "paper_knn"),
                                             ("Paper linear", "paper_linear"))
             if any(getattr(r["arm"], key) is not None for r in group_rows)]
    head = ["Arm"] + (["base_lr"] if with_lr else []) + [
        "n", f"k-NN k={REPORT_K}", "Linear"] + [label for label, _ in paper] + [
        "Steps", "img/s", "Train time"]
    lines += ["", f"## {group}", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]
    for r in group_rows:
      s = r["summary"]
      cells = [row_label(r["arm"]) + (f" (= {r['arm'].same_as})" if r["arm"].same_as else "")]
      if with_lr:
        cells.append(f"{_rate(r['base_lr'])} ({r['note']})" if r["arm"].base_lrs else "–")
      cells += [f"{s.n}/{len(study.seeds)}", _pm(s.knn), _pm(s.linear)]
      cells += ["–" if getattr(r["arm"], key) is None else f"{getattr(r['arm'], key):.1f}"
                for _, key in paper]
      cells += ["–" if s.steps is None else str(s.steps),
                "–" if s.images_per_sec is None else f"{s.images_per_sec:,.0f}",
                _duration(s.train_seconds)]
      lines.append("| " + " | ".join(cells) + " |")
  if sweeps:
    lines += ["", "## Learning-rate sweeps"]
    for arm in sweeps:
      best, scores = best_rate(study, arm, by_run)
      lines += ["", f"### {arm.name}", "", f"| base_lr | n | k-NN k={REPORT_K} | Linear | |",
                "|---|---|---|---|---|"]
      for lr in arm.base_lrs:
        s = summarize(list(by_run.get((arm.name, lr), {}).values()))
        mark = "best" if lr == best else ""
        lines.append(f"| {lr:g} | {s.n} | {_pm(s.knn)} | {_pm(s.linear)} | {mark} |")
  lines += ["", "## Arms", ""]
  for arm in study.arms:
    if arm.same_as:
      lines.append(f"- {arm.name} ({arm.group}): the runs of {arm.same_as} (the same config)")
      continue
    overrides = " ".join(f"`{o}`" for o in arm.overrides) or "(none)"
    rates = f"; base_lr swept over {', '.join(f'{lr:g}' for lr in arm.base_lrs)}" \
        if arm.base_lrs else ""
    lines.append(f"- {arm.name} ({arm.group}): {overrides}{rates}")
  if failures:
    lines += ["", "## Failed runs (rerun the study to retry them)", ""]
    for f in failures:
      lines.append(f"- {f['label']}, seed {f['seed']}: {f['stage']} failed: {f['error']}")
  return "\n".join(lines) + "\n"


def chart(study: Study, records: Sequence[dict], path: str) -> bool:
  """Bars of k-NN and linear top-1 per arm (mean, error bar: std over seeds), one panel per
  group. Returns False when matplotlib is missing (the markdown holds the same numbers)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  rows = table_rows(study, records_by_run(study, records))
  groups = list(dict.fromkeys(r["group"] for r in rows))
  width = max(6.0, 1.3 * max(sum(r["group"] == g for r in rows) for g in groups) + 2)
  fig, axes = plt.subplots(len(groups), 1, figsize=(width, 3.6 * len(groups)), squeeze=False)
  for ax, group in zip(axes[:, 0], groups):
    group_rows = [r for r in rows if r["group"] == group]
    xs = list(range(len(group_rows)))
    for offset, (key, label, color) in enumerate(
        (("knn", f"k-NN top-1, k={REPORT_K}", "tab:blue"),
         ("linear", "linear top-1", "tab:orange"))):
      means = [getattr(r["summary"], key)[0] for r in group_rows]
      stds = [getattr(r["summary"], key)[1] or 0.0 for r in group_rows]
      pos = [x + (offset - 0.5) * 0.38 for x in xs]
      ax.bar(pos, [m if m is not None else 0.0 for m in means], 0.36, yerr=stds, capsize=3,
             color=color, label=label)
      for p, m, sd in zip(pos, means, stds):
        if m is not None:
          ax.text(p, m + sd + 0.3, f"{m:.1f}", ha="center", va="bottom", fontsize=7)
    names = [row_label(r["arm"]) + ("" if r["base_lr"] is None else f"\nlr {r['base_lr']:g}")
             + f"\nn={r['summary'].n}" for r in group_rows]
    ax.set_xticks(xs, names, fontsize=8)
    present = [(m, sd or 0.0) for r in group_rows
               for m, sd in (r["summary"].knn, r["summary"].linear) if m is not None]
    if present:
      low = min(m - sd for m, sd in present)
      high = max(m + sd for m, sd in present)
      ax.set_ylim(max(0.0, low - 10.0), min(105.0, high + 0.25 * (high - low) + 6.0))
    ax.set_ylabel("top-1 (%)")
    ax.set_title(textwrap.fill(f"{study.name}: {group} (mean ± std over seeds)",
                               width=int(width * 12)), fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write_report(study: Study, out: str) -> None:
  records = read_jsonl(os.path.join(out, RESULTS))
  done = {record_key(r["arm"], r.get("base_lr"), r["seed"]) for r in records}
  failures = [f for f in read_jsonl(os.path.join(out, FAILURES))
              if record_key(f["arm"], f.get("base_lr"), f["seed"]) not in done]
  latest = {}
  for f in failures:
    latest[record_key(f["arm"], f.get("base_lr"), f["seed"])] = f
  _write_atomic(os.path.join(out, "results.md"), markdown(study, records, list(latest.values())))
  chart(study, records, os.path.join(out, "results.png"))


def _write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _append_jsonl(path: str, record: dict) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


# --------------------------------------------------------------------------- running commands


def _die_with_parent() -> None:
  """In the child, before exec: SIGTERM when the runner dies (Linux), so a killed study never
  leaves a trainer writing to a workdir that the next attempt will use; the trainer saves a
  checkpoint on SIGTERM."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


# The commands' own progress lines (trainer, evaluators), relayed in the study's progress lines;
# library log lines are not.
_PROGRESS = re.compile(r"^(step \d+/\d+|new run|resumed|k-NN|linear probe)")


class Runner:
  """Runs one command at a time with its output in a log file and progress lines on stdout."""

  def __init__(self, progress_every: float = 60.0, say: Callable[[str], None] = print):
    self.progress_every = progress_every
    self.say = say
    self.stop_requested = False
    self._proc: subprocess.Popen | None = None

  def request_stop(self, signum=None, frame=None):
    del frame
    self.stop_requested = True
    if self._proc is not None and self._proc.poll() is None:
      self._proc.send_signal(signal.SIGTERM)   # the trainer saves and exits
    if signum is not None:
      self.say("[study] stop requested: finishing the current command's shutdown; rerun the "
               "same command to continue")

  def run(self, cmd: Sequence[str], log_path: str, label: str,
          tick: Callable[[float], None] | None = None) -> tuple[int, list[str]]:
    """Runs `cmd`; returns (exit code, the last lines of its output)."""
    tail: collections.deque = collections.deque(maxlen=40)
    with open(log_path, "a", encoding="utf-8") as log:
      log.write(f"\n$ {shlex.join(cmd)}\n")
      log.flush()
      kwargs = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
      proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1, **kwargs)
      self._proc = proc

      def pump():
        for line in proc.stdout:
          log.write(line)
          log.flush()
          tail.append(line.rstrip("\n"))

      reader = threading.Thread(target=pump, daemon=True)
      reader.start()
      start = last_tick = last_say = time.time()
      try:
        while True:
          try:
            proc.wait(timeout=1.0)
            break
          except subprocess.TimeoutExpired:
            pass
          now = time.time()
          if tick is not None and now - last_tick >= 10.0:
            tick(now - last_tick)
            last_tick = now
          if now - last_say >= self.progress_every:
            last = next((l for l in reversed(tail) if _PROGRESS.match(l)), "")
            self.say(f"{label}: {_duration(now - start)} elapsed"
                     + (f" | {last.strip()[-120:]}" if last else ""))
            last_say = now
      except BaseException:
        if proc.poll() is None:
          proc.send_signal(signal.SIGTERM)
          try:
            proc.wait(timeout=120)
          except subprocess.TimeoutExpired:
            proc.kill()
        raise
      finally:
        reader.join(timeout=10)
        if tick is not None:
          tick(time.time() - last_tick)
        self._proc = None
    return proc.returncode, list(tail)


# --------------------------------------------------------------------------- one arm x seed


def read_metrics(workdir: str) -> dict:
  """Steps reached and training throughput from the trainer's metrics.jsonl.

  images/s is the median of the logged values: the first line of each process includes
  compilation, the median ignores it.
  """
  lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  steps = max((int(l["step"]) for l in lines if "step" in l), default=None)
  ips = [float(l["perf/images_per_sec"]) for l in lines if "perf/images_per_sec" in l]
  return {"steps": steps, "images_per_sec": statistics.median(ips) if ips else None}


@dataclasses.dataclass
class Commands:
  train: tuple[str, ...]
  knn: tuple[str, ...]
  linear: tuple[str, ...]

  @classmethod
  def default(cls) -> "Commands":
    py = sys.executable
    return cls(train=(py, "-m", "sove_jax.main"), knn=(py, "-m", "sove_jax.evaluate.knn"),
               linear=(py, "-m", "sove_jax.evaluate.linear"))


class PairFailed(RuntimeError):
  def __init__(self, stage: str, error: str):
    super().__init__(f"{stage}: {error}")
    self.stage, self.error = stage, error


def _load_state(path: str) -> dict:
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  return {}


def run_pair(study: Study, run: Run, seed: int, out: str, commands: Commands, runner: Runner,
             label: str) -> dict:
  """Trains (or resumes), evaluates and returns the results.jsonl record of one arm x seed."""
  workdir = run.workdir(out, seed)
  os.makedirs(workdir, exist_ok=True)
  overrides = study.overrides_for(run, seed)
  state_path = os.path.join(workdir, STATE)
  state = _load_state(state_path)
  if state and state.get("overrides") != overrides:
    raise StudyError(f"{workdir} was started with other overrides ({state.get('overrides')}); "
                     "delete that directory or rename the arm.")
  state.setdefault("overrides", overrides)
  state.setdefault("train_seconds", 0.0)
  save = lambda: _write_atomic(state_path, json.dumps(state, indent=2))
  save()

  def tick(seconds, key):
    state[key] = state.get(key, 0.0) + seconds
    save()

  if not state.get("trained"):
    cmd = [*commands.train, f"--config={study.config}", f"--workdir={workdir}", *overrides]
    resuming = state.get("train_attempts", 0) > 0
    state["train_attempts"] = state.get("train_attempts", 0) + 1
    save()
    runner.say(f"{label}: training" + (" (resuming)" if resuming else ""))
    rc, tail = runner.run(cmd, os.path.join(workdir, "train.log"), f"{label} training",
                          tick=lambda s: tick(s, "train_seconds"))
    if runner.stop_requested or (rc == 0 and any("preempted: saved step" in l for l in tail)):
      raise StudyInterrupted(f"{label}: training stopped at a checkpoint")
    if rc != 0:
      raise PairFailed("training", _last_error(tail, rc, workdir, "train.log"))
    state["trained"] = True
    save()

  # The k-NN evaluator's random-initialization baseline is the same for every arm of a seed and
  # would double each pair's evaluation time: the study asks for the trained network only.
  evals = (("knn", commands.knn, ["--baselines=none", "--ks=" + ",".join(map(str, study.knn_ks)),
                                  *study.knn_args]),
           ("linear", commands.linear, list(study.linear_args)))
  for stage, prefix, args in evals:
    if state.get(stage) is not None:
      continue
    runner.say(f"{label}: {'k-NN' if stage == 'knn' else 'linear probe'}")
    cmd = [*prefix, f"--workdir={workdir}", *args]
    result_path = os.path.join(workdir, f"{stage}.json")
    if os.path.exists(result_path):
      os.remove(result_path)   # only this run's output counts
    rc, tail = runner.run(cmd, os.path.join(workdir, f"{stage}.log"), f"{label} {stage}",
                          tick=lambda s, st=stage: tick(s, f"{st}_seconds"))
    if runner.stop_requested:
      raise StudyInterrupted(f"{label}: {stage} stopped")
    if rc != 0 or not os.path.exists(result_path):
      raise PairFailed(stage, _last_error(tail, rc, workdir, f"{stage}.log"))
    with open(result_path, encoding="utf-8") as f:
      got = json.load(f)
    if stage == "knn":
      full = got.get("top1", {}).get("full", {})
      if str(REPORT_K) not in full:
        raise PairFailed("knn", f"knn.json has no k = {REPORT_K} result: {sorted(full)}")
      state["knn"] = {str(k): float(v) for k, v in full.items()}
    else:
      state["linear"] = {"top1": float(got["top1"]), "per_lr": got.get("per_lr", {}),
                         "convention": got.get("convention")}
    save()

  return {
      "arm": run.arm.name, "group": run.arm.group, "base_lr": run.base_lr, "seed": seed,
      "config": study.config, "overrides": overrides, **read_metrics(workdir),
      "train_seconds": round(state["train_seconds"], 1),
      "eval_seconds": round(state.get("knn_seconds", 0.0) + state.get("linear_seconds", 0.0), 1),
      "knn": state["knn"], "linear_top1": state["linear"]["top1"],
      "linear_per_lr": state["linear"]["per_lr"], "workdir": workdir,
      "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _last_error(tail: list[str], rc: int, workdir: str, log: str) -> str:
  last = next((l.strip() for l in reversed(tail) if l.strip()), "")
  return f"exit code {rc}: {last[-300:]} (log: {os.path.join(workdir, log)})"


# --------------------------------------------------------------------------- the plan


def planned_runs(study: Study, by_run: dict) -> list[tuple[Run, int]]:
  """Every (run, seed) the study needs now, seed-major (all arms at the first seed, then the
  next...), so partial results already compare every arm. Sweep arms run every rate on the
  sweep seeds; on the later seeds only the best rate, known once the sweep seeds are done."""
  plan = []
  for i, seed in enumerate(study.seeds):
    for arm in study.arms:
      if arm.same_as:
        continue   # its row reports another arm's runs
      if not arm.base_lrs:
        plan.append((Run(arm), seed))
      elif i < study.num_sweep_seeds:
        plan.extend((Run(arm, lr), seed) for lr in arm.base_lrs)
      else:
        best, _ = best_rate(study, arm, by_run)
        if best is not None:
          plan.append((Run(arm, best), seed))
  return plan


def run_study(study: Study, out: str, *, commands: Commands | None = None,
              runner: Runner | None = None) -> int:
  """Runs every missing arm x seed; returns the number of pairs that failed."""
  commands = commands or Commands.default()
  runner = runner or Runner()
  os.makedirs(out, exist_ok=True)
  results_path = os.path.join(out, RESULTS)
  for r in read_jsonl(results_path):
    arm = next((a for a in study.arms if a.name == r.get("arm")), None)
    if arm is not None and r.get("seed") in study.seeds:
      want = study.overrides_for(Run(arm, r.get("base_lr")), r["seed"])
      if r.get("overrides") != want:
        raise StudyError(f"{results_path} holds arm {arm.name!r} seed {r['seed']} run with other "
                         "overrides; remove that line (and its workdir) or rename the arm.")
  failed: set[tuple] = set()
  t_start, finished_here = time.time(), 0
  while True:
    by_run = records_by_run(study, read_jsonl(results_path))
    plan = planned_runs(study, by_run)
    todo = [(run, seed) for run, seed in plan
            if seed not in by_run.get((run.arm.name, run.base_lr), {})
            and record_key(run.arm.name, run.base_lr, seed) not in failed]
    if not todo:
      break
    run, seed = todo[0]
    done = len(plan) - len(todo)
    eta = ""
    if finished_here:
      per_pair = (time.time() - t_start) / finished_here
      eta = f", about {_duration(per_pair * len(todo))} left"
    label = f"[{study.name} {done + 1}/{len(plan)}] {run.arm.group} | {run.label} | seed {seed}"
    runner.say(f"{label}: start ({done} of {len(plan)} pairs done{eta})")
    t0 = time.time()
    try:
      record = run_pair(study, run, seed, out, commands, runner, label)
    except PairFailed as e:
      failed.add(record_key(run.arm.name, run.base_lr, seed))
      _append_jsonl(os.path.join(out, FAILURES), {
          "arm": run.arm.name, "base_lr": run.base_lr, "seed": seed, "label": run.label,
          "stage": e.stage, "error": e.error})
      runner.say(f"{label}: FAILED in {e.stage}: {e.error}")
      write_report(study, out)
      continue
    _append_jsonl(results_path, record)
    finished_here += 1
    runner.say(f"{label}: done in {_duration(time.time() - t0)} | k-NN@{REPORT_K} "
               f"{record['knn'][str(REPORT_K)]:.2f} | linear {record['linear_top1']:.2f}")
    write_report(study, out)
  write_report(study, out)
  missing = [a.name for a in study.arms if a.base_lrs
             and best_rate(study, a, records_by_run(study, read_jsonl(results_path)))[0] is None
             and study.num_sweep_seeds < len(study.seeds)]
  for name in missing:
    runner.say(f"[{study.name}] {name}: the sweep did not finish, so its later seeds did not run")
  runner.say(f"[{study.name}] {'finished' if not failed else f'{len(failed)} pair(s) failed'}: "
             f"{os.path.join(out, 'results.md')}")
  return len(failed)


# --------------------------------------------------------------------------- command line


def _define_flags():
  from absl import flags
  flags.DEFINE_string("arms", None, "Study file: .py (STUDY or get_study()) or .json.",
                      required=True)
  flags.DEFINE_string("out", None, "Study directory (workdirs, results.*).", required=True)
  flags.DEFINE_list("seeds", [], "Seeds (default: the study's, else 0).")
  flags.DEFINE_string("config", "", "Base config of every arm (default: the study's).")
  flags.DEFINE_multi_string("override", [], "A common override --config.FIELD=VALUE for every "
                            "arm, after the study's (repeatable).")
  flags.DEFINE_list("only", [], "Run and report only these arms (names), or the arms of these "
                    "groups (group names); default: every arm.")
  flags.DEFINE_multi_string("knn_args", [], "A flag for the k-NN evaluator, after the study's "
                            "(repeatable), e.g. --knn_args=--max_eval_examples=1000.")
  flags.DEFINE_multi_string("linear_args", [], "A flag for the linear probe, after the study's "
                            "(repeatable).")
  flags.DEFINE_integer("sweep_seeds", None, "Seeds on which sweeps try every rate.")
  flags.DEFINE_enum("select", None, ["knn", "linear"], "Metric choosing a sweep's best rate.")
  flags.DEFINE_string("train_cmd", "", "Training command (default: python -m sove_jax.main).")
  flags.DEFINE_string("knn_cmd", "", "k-NN command (default: python -m sove_jax.evaluate.knn).")
  flags.DEFINE_string("linear_cmd", "", "Linear-probe command (default: python -m "
                      "sove_jax.evaluate.linear).")
  flags.DEFINE_float("progress_every", 60.0, "Seconds between progress lines of a command.")
  flags.DEFINE_bool("dry_run", False, "Print the planned commands and exit.")
  flags.DEFINE_bool("report_only", False, "Rewrite results.md and results.png and exit.")


def _with_flags(study: Study, f) -> Study:
  changes = {}
  if f.seeds:
    changes["seeds"] = _ints(f.seeds, "--seeds")
  if f.config:
    changes["config"] = f.config
  if f.override:
    changes["overrides"] = study.overrides + normalize_overrides(f.override, "--override")
  if f.sweep_seeds is not None:
    if f.sweep_seeds < 1:
      raise StudyError(f"--sweep_seeds={f.sweep_seeds} must be >= 1.")
    changes["sweep_seeds"] = f.sweep_seeds
  if f.select:
    changes["select"] = f.select
  if f.knn_args:
    changes["knn_args"] = study.knn_args + tuple(f.knn_args)
  if f.linear_args:
    changes["linear_args"] = study.linear_args + tuple(f.linear_args)
  if f.only:
    known = {a.name for a in study.arms} | {a.group for a in study.arms}
    unknown = [n for n in f.only if n not in known]
    if unknown:
      raise StudyError(f"--only names no arm or group {unknown}; arms: "
                       f"{[a.name for a in study.arms]}; groups: "
                       f"{list(dict.fromkeys(a.group for a in study.arms))}.")
    chosen = {a.name for a in study.arms if a.name in f.only or a.group in f.only}
    chosen |= {a.same_as for a in study.arms if a.name in chosen and a.same_as}
    changes["arms"] = tuple(a for a in study.arms if a.name in chosen)
  study = dataclasses.replace(study, **changes)
  _check_budget(study)
  if not os.path.isfile(study.config):
    raise StudyError(f"config {study.config} is not a file (paths are relative to the directory "
                     "the study runs in).")
  return study


def main(argv):
  if len(argv) > 1:
    from absl import app
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from absl import flags
  f = flags.FLAGS
  try:
    study = _with_flags(load_study(f.arms, config=f.config or None), f)
  except StudyError as e:
    sys.exit(f"Study error: {e}")
  defaults = Commands.default()
  commands = Commands(train=tuple(shlex.split(f.train_cmd)) or defaults.train,
                      knn=tuple(shlex.split(f.knn_cmd)) or defaults.knn,
                      linear=tuple(shlex.split(f.linear_cmd)) or defaults.linear)
  say = lambda text: print(text, flush=True)
  if f.report_only:
    write_report(study, f.out)
    say(f"wrote {os.path.join(f.out, 'results.md')}")
    return
  if f.dry_run:
    by_run = records_by_run(study, read_jsonl(os.path.join(f.out, RESULTS)))
    for run, seed in planned_runs(study, by_run):
      done = seed in by_run.get((run.arm.name, run.base_lr), {})
      say(("done  " if done else "to do ") + shlex.join(
          [*commands.train, f"--config={study.config}", f"--workdir={run.workdir(f.out, seed)}",
           *study.overrides_for(run, seed)]))
    if any(a.base_lrs for a in study.arms) and study.num_sweep_seeds < len(study.seeds):
      say("(sweeps: the later seeds' runs appear once the sweep seeds are done)")
    return
  runner = Runner(progress_every=f.progress_every, say=say)
  signal.signal(signal.SIGTERM, runner.request_stop)
  try:
    failed = run_study(study, f.out, commands=commands, runner=runner)
  except StudyError as e:
    sys.exit(f"Study error: {e}")
  except StudyInterrupted as e:
    sys.exit(f"Study interrupted ({e}); rerun the same command to continue.")
  except KeyboardInterrupt:
    sys.exit("Study interrupted; rerun the same command to continue.")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
