"""`python -m sove_jax.study`: the command line of the study runner (absl flags)."""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys

from sove_jax.study import plan as plan_lib
from sove_jax.study import records as rec
from sove_jax.study import report
from sove_jax.study import runner as runner_lib
from sove_jax.study import spec as spec_lib
from sove_jax.study.spec import RESULTS, Study, StudyError, StudyInterrupted


def define_flags():
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
  flags.DEFINE_integer("sweep_seeds", None, "Seeds on which searches try every value (the "
                       "first ones of --seeds).")
  flags.DEFINE_string("select", None, "The stage whose figure chooses a search's value.")
  flags.DEFINE_string("train_cmd", "", "Training command (default: python -m sove_jax.main).")
  flags.DEFINE_string("knn_cmd", "", "k-NN command (default: python -m sove_jax.evaluate.knn).")
  flags.DEFINE_string("linear_cmd", "", "Linear-probe command (default: python -m "
                      "sove_jax.evaluate.linear).")
  flags.DEFINE_float("progress_every", 60.0, "Seconds between progress lines of a command.")
  flags.DEFINE_bool("dry_run", False, "Print the planned commands and exit.")
  flags.DEFINE_bool("report_only", False, "Rewrite results.md and results.png and exit.")


def with_flags(study: Study, f) -> Study:
  changes = {}
  if f.seeds:
    changes["seeds"] = spec_lib.ints(f.seeds, "--seeds")
    if f.sweep_seeds is None and set(study.search_seeds) <= set(study.seeds):
      changes["search_seeds"] = changes["seeds"][:len(study.search_seeds)]
  if f.config:
    changes["config"] = f.config
  if f.override:
    changes["overrides"] = study.overrides + spec_lib.normalize_overrides(f.override, "--override")
  if f.sweep_seeds is not None:
    if f.sweep_seeds < 1:
      raise StudyError(f"--sweep_seeds={f.sweep_seeds} must be >= 1.")
    changes["search_seeds"] = changes.get("seeds", study.seeds)[:f.sweep_seeds]
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
    changes["claims"] = tuple(c for c in study.claims
                              if c["better"] in chosen and c["worse"] in chosen)
  study = dataclasses.replace(study, **changes)
  spec_lib.check_budget(study)
  if study.select not in [s.name for s in study.stages[1:]]:
    raise StudyError(f"--select={study.select} names no evaluation stage of the study.")
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
    study = with_flags(spec_lib.load_study(f.arms, config=f.config or None), f)
  except StudyError as e:
    sys.exit(f"Study error: {e}")
  defaults = runner_lib.Commands.default()
  commands = runner_lib.Commands(train=tuple(shlex.split(f.train_cmd)) or defaults.train,
                                 knn=tuple(shlex.split(f.knn_cmd)) or defaults.knn,
                                 linear=tuple(shlex.split(f.linear_cmd)) or defaults.linear)
  say = lambda text: print(text, flush=True)
  if f.report_only:
    report.write_report(study, f.out)
    say(f"wrote {os.path.join(f.out, 'results.md')}")
    return
  if f.dry_run:
    by_run = rec.records_by_run(study, rec.read_jsonl(os.path.join(f.out, RESULTS)))
    for p in plan_lib.planned_runs(study, by_run):
      done = not runner_lib.missing(study, p, by_run)[0]
      say(("done  " if done else "to do ") + shlex.join(
          [*commands.train, f"--config={study.config}",
           f"--workdir={p.run.workdir(f.out, p.seed)}", *study.overrides_for(p.run, p.seed)]))
    if any(a.search for a in study.arms):
      say("(searches: later values and the report seeds' runs appear as the search runs finish)")
    return
  runner = runner_lib.Runner(progress_every=f.progress_every, say=say)
  signal.signal(signal.SIGTERM, runner.request_stop)
  try:
    failed = runner_lib.run_study(study, f.out, commands=commands, runner=runner)
  except StudyError as e:
    sys.exit(f"Study error: {e}")
  except StudyInterrupted as e:
    sys.exit(f"Study interrupted ({e}); rerun the same command to continue.")
  except KeyboardInterrupt:
    sys.exit("Study interrupted; rerun the same command to continue.")
  if failed:
    sys.exit(1)


def run():
  from absl import app
  define_flags()
  app.run(main)
