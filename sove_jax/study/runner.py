"""Running a study: one command at a time, each stage of each run resumable, every finished run
one line of `results.jsonl`.

The runner never imports TensorFlow or the trainer: it runs commands (`python -m
sove_jax.main`, the evaluators, a stage's own command) and reads the files they write
(`metrics.jsonl`, each stage's JSON). A killed training run resumes from its last checkpoint
(the trainer does that for a workdir it finds); a finished stage is not repeated (`study.json`
in the workdir remembers each stage's result); a finished run that lacks a stage the study
lists (a stage added later, or the report's stages on a search run the search then chose) has
only that stage run, and never trains again.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import datetime
import json
import os
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

from sove_jax.study import plan as plan_lib
from sove_jax.study import records as rec
from sove_jax.study import report
from sove_jax.study.spec import FAILURES, REPORT_K, RESULTS, STATE, Run, Stage, Study, StudyError
from sove_jax.study.spec import StudyInterrupted

CHART_EVERY = 300.0  # seconds between rewrites of results.png while a study runs


def _die_with_parent() -> None:
  """In the child, before exec: SIGTERM when the runner dies (Linux), so a killed study never
  leaves a trainer writing to a workdir that the next attempt will use; the trainer saves a
  checkpoint on SIGTERM."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


# The commands' own progress lines (trainer, evaluators), relayed in the study's progress lines;
# library log lines are not. The trainer's may start with the time of day.
_PROGRESS = re.compile(r"^(\d\d:\d\d:\d\d )?(step +\d+/\d+|new run|resumed|k-NN|linear probe)")


def _cpu_seconds(pid: int) -> float | None:
  """User + system CPU seconds of process `pid` so far (all its threads), from /proc/PID/stat;
  None where that cannot be read (not Linux, or the process is gone)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      fields = f.read().rsplit(")", 1)[1].split()   # after the command name, which may hold " "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
  except (OSError, ValueError, IndexError):
    return None


def _children_cpu_seconds() -> float:
  """User + system CPU seconds of this process's children that have been waited for."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


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
          tick: Callable[[float, float], None] | None = None) -> tuple[int, list[str]]:
    """Runs `cmd`; returns (exit code, the last lines of its output). `tick(wall, cpu)` gets
    the seconds since its last call, every 10 s and at the end: wall-clock, and the command's
    CPU time (all its threads; on a shared machine the steadier measure of its work)."""
    tail: collections.deque = collections.deque(maxlen=40)
    with open(log_path, "a", encoding="utf-8") as log:
      log.write(f"\n$ {shlex.join(cmd)}\n")
      log.flush()
      kwargs = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
      reaped_before = _children_cpu_seconds()
      proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1, **kwargs)
      self._proc = proc
      cpu_counted = 0.0

      def cpu_since_last(final: bool) -> float:
        nonlocal cpu_counted
        # Once reaped, the exact figure (what this process's children used since the Popen:
        # only this command ran in between); while it runs, /proc.
        now = (_children_cpu_seconds() - reaped_before if final and proc.returncode is not None
               else _cpu_seconds(proc.pid))
        if now is None:
          return 0.0
        delta, cpu_counted = max(0.0, now - cpu_counted), max(cpu_counted, now)
        return delta

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
            tick(now - last_tick, cpu_since_last(False))
            last_tick = now
          if now - last_say >= self.progress_every:
            last = next((l for l in reversed(tail) if _PROGRESS.match(l)), "")
            last = last[_PROGRESS.match(last).start(2):] if last else ""   # without the time
            self.say(f"{label}: {report.duration(now - start)} elapsed"
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
          tick(time.time() - last_tick, cpu_since_last(True))
        self._proc = None
    return proc.returncode, list(tail)



# --------------------------------------------------------------------------- one run


def read_metrics(workdir: str) -> dict:
  """Steps reached and training throughput from the trainer's metrics.jsonl.

  images/s is the median of the logged values: the first line of each process includes
  compilation, the median ignores it.
  """
  lines = rec.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
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


def load_state(path: str) -> dict:
  """A workdir's study.json; the stage results of the runner before stages (top-level "knn"
  and "linear") read as those stages."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    state = json.load(f)
  done = state.setdefault("stages", {})
  if isinstance(state.get("knn"), dict) and "knn" not in done:
    done["knn"] = {"top1": {"full": state.pop("knn")}}
  if isinstance(state.get("linear"), dict) and "linear" not in done:
    done["linear"] = state.pop("linear")
  return state


def stage_command(study: Study, stage: Stage, workdir: str, commands: Commands,
                  state: dict) -> list[str]:
  """The command line of an evaluation stage on `workdir`."""
  if stage.kind == "command":
    fill = lambda a: a.replace("{python}", sys.executable).replace("{workdir}", workdir)
    return [fill(a) for a in stage.command]
  if stage.kind == "knn":
    base = [] if any(a.startswith("--baselines") for a in stage.args) else ["--baselines=none"]
    return [*commands.knn, f"--workdir={workdir}", *base,
            "--ks=" + ",".join(map(str, study.knn_ks)), *stage.args, *study.knn_args]
  lrs = []
  if stage.lrs_from:
    per_lr = state["stages"][stage.lrs_from]["per_lr"]
    lrs = ["--lrs=" + max(per_lr, key=lambda lr: (per_lr[lr], -float(lr)))]
  # The study selects itself (a stage on the validation splits, then `lrs_from`): each linear
  # stage reports every rate's score on its own eval split, as the probe did before it could
  # select on minival by itself.
  return [*commands.linear, f"--workdir={workdir}", "--select_split=none", *study.linear_args,
          *stage.args, *lrs]


def _stage_result(stage: Stage, got: dict, state: dict) -> dict:
  """What a stage keeps: its JSON; an extending linear stage's per_lr merged with the grid it
  extends (the union's best is its top1)."""
  if stage.kind == "knn":
    full = got.get("top1", {}).get("full", {})
    if str(REPORT_K) not in full:
      raise PairFailed(stage.name, f"knn.json has no k = {REPORT_K} result: {sorted(full)}")
  if stage.kind == "linear" and stage.extends:
    per_lr = {**state["stages"][stage.extends].get("per_lr", {}), **got.get("per_lr", {})}
    best = max(per_lr, key=per_lr.get)
    got = {**got, "per_lr": per_lr, "top1": per_lr[best], "best_lr": best}
  return got


def run_pair(study: Study, planned: plan_lib.Planned, out: str, commands: Commands, runner: Runner,
             label: str, *, recorded: dict | None = None) -> dict | None:
  """Trains (or resumes) and evaluates one run x seed; returns its results.jsonl record.

  `recorded`: the run's finished record; then the training is never repeated, and a workdir
  that is gone (None returned) leaves the record as it is.
  """
  run, seed = planned.run, planned.seed
  workdir = run.workdir(out, seed)
  state_path = os.path.join(workdir, STATE)
  if recorded is not None and not os.path.exists(state_path):
    return None
  os.makedirs(workdir, exist_ok=True)
  overrides = study.overrides_for(run, seed)
  state = load_state(state_path)
  if state.get("overrides") not in (None, overrides):
    raise StudyError(f"{workdir} was started with other overrides ({state.get('overrides')}); "
                     "delete that directory or rename the arm.")
  if "overrides" not in state:
    state["cpu_counted"] = True   # CPU time measured from the first attempt (not in old runs)
  state.setdefault("overrides", overrides)
  state.setdefault("train_seconds", 0.0)
  state.setdefault("stages", {})
  save = lambda: report.write_atomic(state_path, json.dumps(state, indent=2))
  save()

  def tick(seconds, cpu_seconds, key):
    state[key] = state.get(key, 0.0) + seconds
    cpu_key = key.replace("_seconds", "_cpu_seconds")
    state[cpu_key] = state.get(cpu_key, 0.0) + cpu_seconds
    save()

  if not state.get("trained"):
    if recorded is not None:
      return None
    train = study.stages[0]
    cmd = [*commands.train, f"--config={study.config}", f"--workdir={workdir}", *overrides,
           *train.args]
    resuming = state.get("train_attempts", 0) > 0
    state["train_attempts"] = state.get("train_attempts", 0) + 1
    save()
    runner.say(f"{label}: training" + (" (resuming)" if resuming else ""))
    rc, tail = runner.run(cmd, os.path.join(workdir, "train.log"), f"{label} training",
                          tick=lambda s, c: tick(s, c, "train_seconds"))
    if runner.stop_requested or (rc == 0 and any("preempted: saved step" in l for l in tail)):
      raise StudyInterrupted(f"{label}: training stopped at a checkpoint")
    if rc != 0:
      raise PairFailed("training", _last_error(tail, rc, workdir, "train.log"))
    state["trained"] = True
    save()

  for name in planned.stages(study)[1:]:
    if name in state["stages"]:
      continue
    stage = study.stage(name)
    runner.say(f"{label}: {stage.name}")
    cmd = stage_command(study, stage, workdir, commands, state)
    written = os.path.join(workdir, stage.result or (
        f"{stage.kind}.json" if stage.kind != "command" else f"{stage.name}.json"))
    if os.path.exists(written):
      os.remove(written)   # only this run's output counts
    rc, tail = runner.run(cmd, os.path.join(workdir, f"{stage.name}.log"), f"{label} {name}",
                          tick=lambda s, c, n=name: tick(s, c, f"{n}_seconds"))
    if runner.stop_requested:
      raise StudyInterrupted(f"{label}: {name} stopped")
    if rc != 0 or not os.path.exists(written):
      raise PairFailed(name, _last_error(tail, rc, workdir, f"{stage.name}.log"))
    with open(written, encoding="utf-8") as f:
      state["stages"][name] = _stage_result(stage, json.load(f), state)
    if os.path.basename(written) != f"{name}.json":
      report.write_atomic(os.path.join(workdir, f"{name}.json"),
                          json.dumps(state["stages"][name], indent=2))
      if stage.kind in state["stages"]:  # knn.json, linear.json: the stages of those names'
        report.write_atomic(written, json.dumps(state["stages"][stage.kind], indent=2))
    save()
  return make_record(study, run, seed, state, workdir, recorded)


def make_record(study: Study, run: Run, seed: int, state: dict, workdir: str,
                recorded: dict | None) -> dict:
  """The results.jsonl line of a run: what it ran, how long it took, every stage's result
  (and, for the tables of old, "knn" and "linear_top1" of the stages so named)."""
  stages = {**(rec.stages_of(recorded) if recorded else {}), **state["stages"]}
  settings = dict(run.settings)
  record = {
      "arm": run.arm.name, "group": run.arm.group, "base_lr": settings.get("lr"),
      "settings": settings, "seed": seed, "config": study.config,
      "overrides": study.overrides_for(run, seed), **read_metrics(workdir),
      "train_seconds": round(state["train_seconds"], 1),
      "eval_seconds": round(sum(v for k, v in state.items() if k.endswith("_seconds")
                                and not k.endswith("_cpu_seconds") and k != "train_seconds"), 1),
      "stages": stages, "workdir": workdir, "commit": code_commit(),
      "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if state.get("cpu_counted"):   # CPU seconds (to within 10 s per interruption)
    cpu = {k: v for k, v in state.items() if k.endswith("_cpu_seconds")}
    record["train_cpu_seconds"] = round(cpu.pop("train_cpu_seconds", 0.0), 1)
    record["eval_cpu_seconds"] = round(sum(cpu.values()), 1)
  if "knn" in stages:
    record["knn"] = stages["knn"]["top1"]["full"]
  if "linear" in stages:
    record["linear_top1"] = stages["linear"]["top1"]
  if recorded is not None and record["steps"] is None:
    record.update(steps=recorded.get("steps"), images_per_sec=recorded.get("images_per_sec"))
  return record


def code_commit() -> str:
  """The commit the code ran on, "" outside git: a study spans changes to the code too."""
  try:
    return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                   stderr=subprocess.DEVNULL).strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def _last_error(tail: list[str], rc: int, workdir: str, log: str) -> str:
  last = next((l.strip() for l in reversed(tail) if l.strip()), "")
  return f"exit code {rc}: {last[-300:]} (log: {os.path.join(workdir, log)})"


# --------------------------------------------------------------------------- the study


def missing(study: Study, planned: plan_lib.Planned, by_run: dict) -> tuple[bool, dict | None]:
  """(does it need running, its finished record or None)."""
  done = by_run.get(rec.run_key(planned.run.arm.name, planned.run.settings), {}).get(planned.seed)
  if done is None:
    return True, None
  have = set(rec.stages_of(done))
  return any(s not in have for s in planned.stages(study)[1:]), done


def check_recorded(study: Study, out: str) -> None:
  """Refuses a study whose results.jsonl holds one of its runs trained with other overrides."""
  path = os.path.join(out, RESULTS)
  arms = {a.name: a for a in study.arms}
  for r in rec.read_jsonl(path):
    arm = arms.get(r.get("arm"))
    if arm is not None and isinstance(r.get("seed"), int):
      want = study.overrides_for(Run(arm, rec.settings_of(r)), r["seed"])
      if r.get("overrides") != want:
        raise StudyError(f"{path} holds arm {arm.name!r} seed {r['seed']} run with other "
                         "overrides; remove that line (and its workdir) or rename the arm.")


BASE_CONFIG = "base_config.json"


def check_base_config(study: Study, out: str) -> list[str]:
  """Refuses a study whose base config file now resolves to other values than when its first
  run started here (its fields are kept in out/base_config.json, written on the first start).

  A study outlives sessions, and its arms name only what they change: were the base config
  (configs/default.py, say) edited in between, the remaining runs would train another recipe
  than the recorded ones with nothing said, since their overrides (which check_recorded
  compares) would be unchanged. Fields added since then are accepted (a new field's default
  keeps the old behaviour) and returned, so that the runner names them.
  """
  from sove_jax import configuration   # ml_collections: only where a study is run
  # As JSON gives them back (tuples as lists), to compare with the stored fields.
  now = json.loads(json.dumps(configuration.flat_fields(configuration.load(study.config)),
                              default=str))
  path = os.path.join(out, BASE_CONFIG)
  if not os.path.exists(path):
    report.write_atomic(path, json.dumps({"config": study.config, "fields": now}, indent=1,
                                         sort_keys=True) + "\n")
    return []
  with open(path, encoding="utf-8") as f:
    then = json.load(f)
  changed = sorted(k for k in then["fields"] if k in now and now[k] != then["fields"][k])
  if changed:
    shown = ", ".join(f"{k} {then['fields'][k]!r} -> {now[k]!r}" for k in changed[:5])
    raise StudyError(
        f"{study.config} has changed since this study's first run in {out} ({shown}"
        f"{', ...' if len(changed) > 5 else ''}): its remaining runs would train another recipe; "
        f"pin those fields in a config of their own, or start another results directory (or "
        f"delete {path} to accept the change).")
  return sorted(set(now) - set(then["fields"]))


def run_study(study: Study, out: str, *, commands: Commands | None = None,
              runner: Runner | None = None) -> int:
  """Runs every missing run x seed (and missing stage); returns the number that failed."""
  commands = commands or Commands.default()
  runner = runner or Runner()
  os.makedirs(out, exist_ok=True)
  results_path = os.path.join(out, RESULTS)
  check_recorded(study, out)
  added = check_base_config(study, out)
  if added:
    runner.say(f"[{study.name}] {study.config} has fields its first start did not (accepted, "
               f"as their defaults keep the old behaviour): {', '.join(added)}")
  failed, gone = set(), set()
  t_start, finished_here = time.time(), 0
  last_chart = [time.time()]

  def write_report():   # the chart (a second or two of matplotlib) at most every 5 minutes
    chart_too = time.time() - last_chart[0] >= CHART_EVERY
    report.write_report(study, out, chart_too=chart_too)
    if chart_too:
      last_chart[0] = time.time()

  while True:
    by_run = rec.records_by_run(study, rec.read_jsonl(results_path))
    plan = plan_lib.planned_runs(study, by_run)
    todo = []
    for p in plan:
      key = (rec.run_key(p.run.arm.name, p.run.settings), p.seed)
      needed, done = missing(study, p, by_run)
      if needed and key not in failed and key not in gone:
        todo.append((p, key, done))
    if not todo:
      break
    planned, key, done = todo[0]
    eta = ""
    if finished_here:
      eta = f", about {report.duration((time.time() - t_start) / finished_here * len(todo))} left"
    label = (f"[{study.name} {len(plan) - len(todo) + 1}/{len(plan)}] {planned.run.arm.group} | "
             f"{planned.run.label} | seed {planned.seed}")
    runner.say(f"{label}: start ({len(plan) - len(todo)} of {len(plan)} runs done{eta})")
    t0 = time.time()
    try:
      record = run_pair(study, planned, out, commands, runner, label, recorded=done)
    except PairFailed as e:
      failed.add(key)
      rec.append_jsonl(os.path.join(out, FAILURES), {
          "arm": planned.run.arm.name, "base_lr": dict(planned.run.settings).get("lr"),
          "settings": dict(planned.run.settings), "seed": planned.seed,
          "label": planned.run.label, "stage": e.stage, "error": e.error})
      runner.say(f"{label}: FAILED in {e.stage}: {e.error}")
      write_report()
      continue
    if record is None:
      gone.add(key)
      lacking = [s for s in planned.stages(study)[1:] if s not in rec.stages_of(done)]
      runner.say(f"{label}: its workdir is gone; the stages it lacks ({', '.join(lacking)}) "
                 "are not run")
      continue
    rec.append_jsonl(results_path, record)
    finished_here += 1
    shown = " | ".join(f"{s.name} {rec.metric(study, record, s.name):.2f}"
                       for s in study.stages[1:] if rec.metric(study, record, s.name) is not None)
    runner.say(f"{label}: done in {report.duration(time.time() - t0)} | {shown}")
    write_report()
  report.write_report(study, out)
  runner.say(f"[{study.name}] {'finished' if not failed else f'{len(failed)} run(s) failed'}: "
             f"{os.path.join(out, 'results.md')}")
  return len(failed)
