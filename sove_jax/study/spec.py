"""A study's definition: its arms, their searches, the protocol stages of a run, the analysis.

`make_study` turns a study file's dict into a validated, frozen `Study` and says in one sentence
what is wrong with it before anything runs; `load_study` reads the file (Python or JSON).
Nothing here runs a command or imports TensorFlow or JAX.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import os
import re
from typing import Any, Callable

from sove_jax import configuration

RESULTS = "results.jsonl"
FAILURES = "failures.jsonl"
STATE = "study.json"
DEFAULT_KS = (10, 20, 100, 200)
REPORT_K = 20
# Fields that set the budget or the data order: the same for every arm, set by the study.
BUDGET_FIELDS = ("seed", "batch_size", "total_steps", "num_epochs", "run_steps")
STAGE_KINDS = ("train", "knn", "linear", "command")
ROLES = ("all", "search", "report")


class StudyError(ValueError):
  """A study definition that cannot run; the message is meant for the user as it is."""


class StudyInterrupted(RuntimeError):
  """The study was asked to stop (SIGTERM, or the trainer was preempted); rerun to continue."""


@dataclasses.dataclass(frozen=True)
class Search:
  """One coordinate of an arm's search: `fields` are set together to each of `values` on the
  search seeds, after the earlier coordinates' winners are fixed; the best value by the
  study's `select` stage wins (ties: the smaller value). `default` is the arm's config value:
  a run at it sets no override, so it is the earlier coordinates' run. `factor` > 1 extends
  the values while the best is the smallest (value / factor) or the largest (value * factor),
  up to `max_values`, so that the chosen value is interior."""
  name: str
  fields: tuple[str, ...]
  values: tuple[float, ...]
  default: float | None = None
  factor: float = 0.0
  max_values: int = 8

  def label(self, value: float) -> str:
    return f"{self.name}{value:g}"


@dataclasses.dataclass(frozen=True)
class Stage:
  """One step of a run's protocol. "train": `python -m sove_jax.main` (`args` appended);
  "knn" / "linear": the evaluator on the run's workdir with `args` (after the study's
  knn_args / linear_args); "command": `command` with {python} and {workdir} filled in, which
  writes the JSON file `result` into the workdir. `runs`: the runs it evaluates ("search": the
  search's candidates, "report": the runs the tables report, "all"). A linear stage with
  `lrs_from` probes at the best rate of that earlier linear stage only (a rate chosen on
  validation, reported on test); one with `extends` adds its rates to that stage's grid (the
  union is the result). `metric`: the dotted path of the figure in the stage's JSON. `arms`:
  the names of the only arms it evaluates (empty: every arm), for a measurement that one row
  answers, such as the baselines beside the first row of a curve."""
  name: str
  kind: str
  args: tuple[str, ...] = ()
  runs: str = "all"
  lrs_from: str = ""
  extends: str = ""
  command: tuple[str, ...] = ()
  result: str = ""
  metric: str = ""
  label: str = ""
  arms: tuple[str, ...] = ()

  @property
  def metric_path(self) -> str:
    return self.metric or {"knn": f"top1.full.{REPORT_K}", "linear": "top1"}.get(self.kind, "")

  @property
  def title(self) -> str:
    return self.label or {"knn": f"k-NN k={REPORT_K}", "linear": "Linear"}.get(self.name,
                                                                                 self.name)


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  group: str
  overrides: tuple[str, ...]
  search: tuple[Search, ...] = ()
  paper_knn: float | None = None     # the published figures for this row, shown beside ours
  paper_linear: float | None = None
  same_as: str = ""                  # another arm's name: this row reports that arm's runs
  levels: tuple[tuple[str, int], ...] = ()   # a factorial's design point: (factor, -1 or +1)
  dose: float | None = None          # a dose-response study's dose
  seeds: tuple[int, ...] = ()        # the report seeds this arm runs (empty: the study's), e.g.
                                     # one seed for the long runs of a scaling curve


@dataclasses.dataclass(frozen=True)
class Run:
  """One arm at one setting of its searched fields: the unit that is repeated over seeds.
  `settings` holds (search name, value) pairs; a value at its search's default is left out."""
  arm: Arm
  settings: tuple[tuple[str, float], ...] = ()

  @property
  def label(self) -> str:
    return self.arm.name + ("" if not self.settings else
                            " (" + ", ".join(f"{n} {v:g}" for n, v in self.settings) + ")")

  def workdir(self, out: str, seed: int) -> str:
    by_name = {s.name: s for s in self.arm.search}
    parts = [by_name[n].label(v) for n, v in self.settings]
    return os.path.join(out, slug(self.arm.name), *parts, f"seed{seed}")


@dataclasses.dataclass(frozen=True)
class Study:
  arms: tuple[Arm, ...]
  config: str = "configs/default.py"
  overrides: tuple[str, ...] = ()
  seeds: tuple[int, ...] = (0,)            # the seeds the tables report
  search_seeds: tuple[int, ...] = (0,)     # the seeds searches try every candidate on
  more_seeds: tuple[int, ...] = ()         # added to both arms of a claim undecided at `seeds`
  knn_ks: tuple[int, ...] = DEFAULT_KS
  knn_args: tuple[str, ...] = ()
  linear_args: tuple[str, ...] = ()
  stages: tuple[Stage, ...] = ()
  select: str = "knn"                      # the stage whose metric chooses a search's value
  name: str = "study"
  notes: str = ""                          # markdown for the report, under its first paragraph
  claims: tuple[dict, ...] = ()            # {"better", "worse", "metric", "paper"}
  factors: tuple[dict, ...] = ()           # {"name", "low", "high", "paper"}
  generators: tuple[str, ...] = ()         # a fractional factorial's, e.g. "E=ABC"
  dose: dict | None = None                 # {"name", "scale": "log2" | "linear", "paper"}
  extra_report: Callable | None = None     # f(study, records, out) -> markdown, after the tables
  same_budget: bool = True                 # False: arms may set the budget fields (a search
                                           # over recipes, not a comparison at equal budget)

  def stage(self, name: str) -> Stage:
    for s in self.stages:
      if s.name == name:
        return s
    raise KeyError(name)

  @property
  def report_stages(self) -> tuple[Stage, ...]:
    return tuple(s for s in self.stages if s.kind != "train" and s.runs != "search")

  def overrides_for(self, run: Run, seed: int) -> list[str]:
    by_name = {s.name: s for s in run.arm.search}
    searched = [configuration.override(field, value) for name, value in run.settings
                for field in by_name[name].fields]
    return [*self.overrides, *run.arm.overrides, *searched, f"--config.seed={seed}"]


def slug(name: str) -> str:
  """A directory name for an arm: lower case, runs of other characters as one '-'."""
  return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "arm"


def normalize_overrides(overrides: Any, where: str) -> tuple[str, ...]:
  """`--config.FIELD=VALUE` strings from a list of such strings (the `--` optional) or a dict."""
  if overrides is None:
    return ()
  if isinstance(overrides, dict):
    return tuple(configuration.override(k, v) for k, v in overrides.items())
  if not isinstance(overrides, (list, tuple)):
    raise StudyError(f"{where}: overrides must be a list of --config.FIELD=VALUE strings or a "
                     f"dict, got {type(overrides).__name__}.")
  items = []
  for o in overrides:
    if not isinstance(o, str):
      raise StudyError(f"{where}: override {o!r} is not a string like --config.FIELD=VALUE.")
    o = o if o.startswith("--") else "--" + o
    try:
      configuration.parse_override(o)
    except ValueError:
      raise StudyError(f"{where}: override {o!r} is not of the form --config.FIELD=VALUE.") \
          from None
    items.append(o)
  return tuple(items)


def override_field(override: str) -> str:
  return configuration.parse_override(override)[0]


def ints(values, what: str) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in values)
  except (TypeError, ValueError):
    raise StudyError(f"{what} must be a list of integers, got {values!r}.") from None
  if len(set(out)) != len(out):
    raise StudyError(f"{what} repeats a value: {list(out)}.")
  return out


def _positive(values, what: str) -> tuple[float, ...]:
  try:
    out = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise StudyError(f"{what} must be a list of numbers, got {values!r}.") from None
  if not out or any(not math.isfinite(v) or v <= 0 for v in out) or len(set(out)) != len(out):
    raise StudyError(f"{what} must hold distinct positive values, got {list(out)}.")
  return out


def _search(spec, where: str) -> Search:
  known = {"name", "fields", "values", "default", "factor", "max_values"}
  if not isinstance(spec, dict) or set(spec) - known or not spec.get("fields"):
    raise StudyError(f"{where}: a search is a dict with 'name', 'fields' and 'values' (and "
                     f"optional 'default', 'factor', 'max_values'), got {spec!r}.")
  name = str(spec.get("name") or "")
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise StudyError(f"{where}: search name {name!r} must be lower-case letters, digits, _.")
  fields = (spec["fields"],) if isinstance(spec["fields"], str) else tuple(spec["fields"])
  values = _positive(spec.get("values"), f"{where} search {name!r} values")
  factor = float(spec.get("factor", 0.0))
  if factor and factor <= 1:
    raise StudyError(f"{where}: search {name!r} factor={factor} must be > 1 (or 0: no "
                     "extension).")
  default = spec.get("default")
  return Search(name, fields, tuple(sorted(values)), None if default is None else float(default),
                factor, int(spec.get("max_values", 8)))


def _stage(spec, where: str) -> Stage:
  if isinstance(spec, str):
    spec = {"name": spec}
  if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
    raise StudyError(f"{where}: a stage is a dict with a 'name', got {spec!r}.")
  fields = {f.name for f in dataclasses.fields(Stage)}
  unknown = sorted(set(spec) - fields)
  if unknown:
    raise StudyError(f"{where}: stage {spec['name']!r} has unknown field(s) {unknown}; known: "
                     f"{sorted(fields)}.")
  spec = dict(spec)
  spec.setdefault("kind", spec["name"] if spec["name"] in STAGE_KINDS else "")
  for key in ("args", "command", "arms"):
    spec[key] = tuple(spec.get(key, ()))
  stage = Stage(**spec)
  if stage.kind not in STAGE_KINDS:
    raise StudyError(f"{where}: stage {stage.name!r} needs a kind, one of {STAGE_KINDS}.")
  if stage.runs not in ROLES:
    raise StudyError(f"{where}: stage {stage.name!r} runs={stage.runs!r} is not one of {ROLES}.")
  if stage.kind == "command" and not stage.command:
    raise StudyError(f"{where}: command stage {stage.name!r} needs a 'command' (a list).")
  return stage


def default_stages(knn_ks=DEFAULT_KS) -> tuple[Stage, ...]:
  """Train, then k-NN (train -> test) and the linear probe (its best rate on the test split):
  what a study without `stages` runs."""
  del knn_ks
  return (Stage("train", "train"), Stage("knn", "knn"), Stage("linear", "linear"))


def _check_stages(stages: tuple[Stage, ...], select: str):
  if not stages or stages[0].kind != "train" or any(s.kind == "train" for s in stages[1:]):
    raise StudyError("a study's stages start with the one 'train' stage.")
  names = [s.name for s in stages]
  if len(set(names)) != len(names):
    raise StudyError(f"stage names repeat: {names}.")
  for i, s in enumerate(stages):
    for ref in (s.lrs_from, s.extends):
      before = {t.name: t for t in stages[:i]}
      if ref and (ref not in before or before[ref].kind != "linear" or s.kind != "linear"):
        raise StudyError(f"stage {s.name!r} refers to {ref!r}: it must be an earlier linear "
                         "stage, and this one a linear stage.")
  if select not in names or stages[names.index(select)].kind == "train":
    raise StudyError(f"select={select!r} must name an evaluation stage: "
                     f"{[n for n in names if n != 'train']}.")


def _arm(a, i: int, default_lrs) -> Arm:
  if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not a["name"].strip():
    raise StudyError(f"arm {i} must be a dict with a non-empty 'name'.")
  known = {"name", "group", "overrides", "base_lrs", "search", "paper", "same_as", "levels",
           "dose", "seeds"}
  extra = sorted(set(a) - known)
  if extra:
    raise StudyError(f"arm {a['name']!r} has unknown field(s) {extra}; known: "
                     f"{', '.join(sorted(known))}.")
  where = f"arm {a['name']!r}"
  same_as = a.get("same_as") or ""
  if same_as and (not isinstance(same_as, str) or a.get("overrides") or a.get("base_lrs")
                  or a.get("search")):
    raise StudyError(f"{where} reports the runs of arm {same_as!r} (same_as), so it cannot have "
                     "overrides, base_lrs or a search of its own.")
  paper = a.get("paper") or {}
  if (not isinstance(paper, dict) or set(paper) - {"knn", "linear"}
      or not all(isinstance(v, (int, float)) for v in paper.values())):
    raise StudyError(f"{where}: paper must be a dict with numbers 'knn' and/or 'linear', got "
                     f"{paper!r}.")
  lrs = a.get("base_lrs")
  lrs = default_lrs if lrs is None else (_positive(lrs, f"{where} base_lrs") if lrs else ())
  if a.get("search") and a.get("base_lrs"):
    raise StudyError(f"{where}: give base_lrs or search, not both.")
  search = tuple(_search(s, where) for s in a.get("search") or ())
  if not search and lrs and not same_as:
    search = (Search("lr", ("optim.base_lr",), tuple(sorted(lrs))),)
  if len({s.name for s in search}) != len(search):
    raise StudyError(f"{where}: its searches' names repeat.")
  levels = a.get("levels") or {}
  if not isinstance(levels, dict) or any(v not in (-1, 1) for v in levels.values()):
    raise StudyError(f"{where}: levels must map factor names to -1 or +1, got {levels!r}.")
  return Arm(name=a["name"], group=str(a.get("group") or "Results"),
             overrides=normalize_overrides(a.get("overrides"), where), search=search,
             paper_knn=paper.get("knn"), paper_linear=paper.get("linear"), same_as=same_as,
             levels=tuple(sorted(levels.items())),
             dose=None if a.get("dose") is None else float(a["dose"]),
             seeds=ints(a.get("seeds") or (), f"{where} seeds"))


def make_study(spec: Any, *, name: str = "study") -> Study:
  """A validated Study from a dict (or a bare list of arms); StudyError names the problem."""
  if isinstance(spec, (list, tuple)):
    spec = {"arms": list(spec)}
  if not isinstance(spec, dict):
    raise StudyError(f"the study must be a dict with 'arms' (or a list of arms), got "
                     f"{type(spec).__name__}.")
  known = {"arms", "config", "overrides", "seeds", "sweep_seeds", "search_seeds", "more_seeds",
           "knn_ks", "knn_args", "linear_args", "select", "base_lrs", "name", "notes", "stages",
           "claims", "factors", "generators", "dose", "extra_report", "same_budget"}
  unknown = sorted(set(spec) - known)
  if unknown:
    raise StudyError(f"unknown study field(s) {unknown}; known: {sorted(known)}.")
  default_lrs = _positive(spec["base_lrs"], "study base_lrs") if spec.get("base_lrs") else ()
  if not spec.get("arms"):
    raise StudyError("the study has no arms.")
  arms = tuple(_arm(a, i, default_lrs) for i, a in enumerate(spec["arms"]))
  slugs = {}
  for arm in arms:
    if slug(arm.name) in slugs:
      raise StudyError(f"arms {slugs[slug(arm.name)]!r} and {arm.name!r} would share the "
                       f"directory {slug(arm.name)!r}; rename one.")
    slugs[slug(arm.name)] = arm.name
  by_name = {a.name: a for a in arms}
  for arm in arms:
    target = by_name.get(arm.same_as)
    if arm.same_as and (target is None or target.same_as or target.search):
      raise StudyError(f"arm {arm.name!r}: same_as={arm.same_as!r} must name an arm of the study "
                       "that runs itself at one setting (no same_as, no search).")

  seeds = ints(spec.get("seeds", (0,)), "seeds")
  if not seeds:
    raise StudyError("seeds is empty.")
  sweep = spec.get("sweep_seeds")
  if sweep is not None and (not isinstance(sweep, int) or sweep < 1):
    raise StudyError(f"sweep_seeds={sweep!r} must be a positive integer.")
  if sweep is not None and spec.get("search_seeds") is not None:
    raise StudyError("give sweep_seeds (the first seeds) or search_seeds (a list), not both.")
  search_seeds = (ints(spec["search_seeds"], "search_seeds") if spec.get("search_seeds")
                  is not None else seeds[:sweep] if sweep else seeds)
  ks = ints(spec.get("knn_ks", DEFAULT_KS), "knn_ks")
  if REPORT_K not in ks:
    raise StudyError(f"knn_ks={list(ks)} must include k = {REPORT_K}, the k the tables report.")
  stages = (tuple(_stage(s, f"stage {i}") for i, s in enumerate(spec["stages"]))
            if spec.get("stages") else default_stages())
  for stage in stages:
    unknown = [n for n in stage.arms if n not in by_name]
    if unknown:
      raise StudyError(f"stage {stage.name!r} names no arm {unknown}; arms: {list(by_name)}.")
  for arm in arms:
    if not set(arm.seeds) <= set(seeds):
      raise StudyError(f"arm {arm.name!r}: seeds {list(arm.seeds)} must be among the study's "
                       f"seeds {list(seeds)}.")
  select = spec.get("select", "knn")
  _check_stages(stages, select)
  claims = tuple(spec.get("claims") or ())
  for c in claims:
    if (not isinstance(c, dict) or set(c) - {"better", "worse", "metric", "paper"}
        or c.get("better") not in by_name or c.get("worse") not in by_name):
      raise StudyError(f"claim {c!r} must be a dict naming arms 'better' and 'worse' (and "
                       "optional 'metric', a stage, and 'paper', the paper's difference).")
    if c.get("metric", select) not in [s.name for s in stages]:
      raise StudyError(f"claim {c!r}: metric must name a stage.")
  factors = tuple(spec.get("factors") or ())
  names = [f.get("name") for f in factors if isinstance(f, dict)]
  if len(names) != len(factors) or len(set(names)) != len(names):
    raise StudyError("factors must be dicts with distinct 'name's.")
  for arm in arms:
    if factors and not arm.same_as and {n for n, _ in arm.levels} != set(names):
      raise StudyError(f"arm {arm.name!r}: levels must give every factor {names} a level.")
  extra = spec.get("extra_report")
  if extra is not None and not callable(extra):
    raise StudyError("extra_report must be a function (study, records, out) -> markdown.")
  study = Study(arms=arms, config=str(spec.get("config", "configs/default.py")),
                overrides=normalize_overrides(spec.get("overrides"), "study overrides"),
                seeds=seeds, search_seeds=search_seeds,
                more_seeds=ints(spec.get("more_seeds", ()), "more_seeds"), knn_ks=ks,
                knn_args=tuple(spec.get("knn_args", ())),
                linear_args=tuple(spec.get("linear_args", ())), stages=stages, select=select,
                name=str(spec.get("name", name)), notes=str(spec.get("notes", "")),
                claims=claims, factors=factors, generators=tuple(spec.get("generators", ())),
                dose=spec.get("dose"), extra_report=extra,
                same_budget=bool(spec.get("same_budget", True)))
  check_budget(study)
  return study


def check_budget(study: Study) -> None:
  """Every arm at the same budget, every field set once: no override can silently win."""
  for o in study.overrides:
    if override_field(o) == "seed":
      raise StudyError("the study's overrides set config.seed; seeds come from --seeds (or the "
                       "study's 'seeds').")
  for arm in study.arms:
    searched = [f for s in arm.search for f in s.fields]
    for field in [override_field(o) for o in arm.overrides] + searched:
      if field == "seed" or (field in BUDGET_FIELDS and study.same_budget):
        raise StudyError(f"arm {arm.name!r} overrides config.{field}: every arm runs at the same "
                         "budget, so set it in the study's common overrides.")
    fields = [override_field(o) for o in (*study.overrides, *arm.overrides)] + searched
    twice = sorted({f for f in fields if fields.count(f) > 1})
    if twice:
      where = ("its search and its overrides" if twice[0] in searched
               else "common overrides and the arm's")
      raise StudyError(f"arm {arm.name!r} sets config.{twice[0]} twice ({where}); set it once.")


def load_study(path: str, config: str | None = None) -> Study:
  """Reads a study file: Python (STUDY, get_study() or get_study(config)) or JSON.

  `config` (the `--config` flag, or None) goes to a `get_study` that takes an argument. A Python
  file's module-level `report(study, records, out)`, if any, adds its markdown to the report.
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
    if hasattr(module, "report") and isinstance(spec, dict):
      spec = {**spec, "extra_report": module.report}
  else:
    raise StudyError(f"--arms={path} must be a .py or .json file.")
  return make_study(spec, name=name)
