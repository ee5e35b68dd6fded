"""The study runner: plan, resume after a kill, failures, tables, sweeps, and one real run.

Most tests drive `python -m sove_jax.study` with a fake trainer and fake evaluators (a small
script written here) that produce the files the runner reads: metrics.jsonl, knn.json,
linear.json. A fake accuracy is set per arm by a config override (`--config.fake.acc=70`) and
shifted by the seed (and, in a sweep, by the distance of the rate from 1e-3), so the expected
tables are known in advance. One test runs the real trainer and evaluators on the smoke config.
"""
import collections
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from sove_jax import study as study_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE = r'''
import json, os, signal, sys, time

mode, args = sys.argv[1], sys.argv[2:]
flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
workdir = flags["workdir"]
os.makedirs(workdir, exist_ok=True)
tag = os.path.relpath(workdir, os.environ["FAKE_OUT"])
log = lambda **kw: open(os.environ["FAKE_LOG"], "a").write(json.dumps(dict(mode=mode, run=tag, **kw)) + "\n")

if mode == "train":
  overrides = {k[len("config."):]: v for k, v in flags.items() if k.startswith("config.")}
  json.dump(overrides, open(os.path.join(workdir, "overrides.json"), "w"))
  ckpt = os.path.join(workdir, "ckpt")
  start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
  log(start=start, pid=os.getpid())
  print("resumed from step %d" % start if start else "new run: 4 steps", flush=True)
  if os.environ.get("FAKE_FAIL") == tag:
    print("Non-finite loss or gradient at step 1", flush=True)
    sys.exit(1)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as m:
    for step in range(start + 1, 5):
      m.write(json.dumps({"step": step, "train/loss": 1.0, "perf/images_per_sec": 5.0 if step == start + 1 else 100.0 + step}) + "\n")
      m.flush()
      open(ckpt, "w").write(str(step))
      print("step %d/4 | loss 1.0" % step, flush=True)
      if os.environ.get("FAKE_SLOW") == tag:
        time.sleep(0.7)
      if step == 2 and os.environ.get("FAKE_KILL") == tag and start == 0:
        os.kill(os.getppid(), signal.SIGKILL)   # the study dies mid-run...
        time.sleep(30)                            # ...and this trainer must not outlive it
        sys.exit(3)
else:
  overrides = json.load(open(os.path.join(workdir, "overrides.json")))
  acc = float(overrides.get("fake.acc", 70.0)) + int(overrides["seed"])
  if "optim.base_lr" in overrides:
    acc -= 1000.0 * abs(float(overrides["optim.base_lr"]) - 1e-3)
  log(args=args)
  if os.environ.get("FAKE_FAIL") == tag + ":" + mode:
    sys.exit("evaluation crashed")
  if mode == "knn":
    ks = flags["ks"].split(",")
    record = {"top1": {"full": {k: acc + (20 - int(k)) / 100 for k in ks}}}
  else:
    record = {"top1": acc + 5.0, "per_lr": {"0.01": acc + 5.0}, "convention": "last4_cls"}
  json.dump(record, open(os.path.join(workdir, mode + ".json"), "w"))
'''


@pytest.fixture
def fake(tmp_path):
  script = tmp_path / "fake.py"
  script.write_text(FAKE)
  out = tmp_path / "out"
  env = dict(os.environ, FAKE_OUT=str(out), FAKE_LOG=str(tmp_path / "calls.jsonl"))
  cmds = [f"--{m}_cmd={sys.executable} {script} {m}" for m in ("train", "knn", "linear")]

  def run(study, *flags, extra_env=None):
    """`study`: a study spec (written to a JSON file) or the path of a study file."""
    if isinstance(study, str):
      path = study
    else:
      path = tmp_path / "study.json"
      path.write_text(json.dumps(study))
    proc = subprocess.run(
        [sys.executable, "-m", "sove_jax.study", f"--arms={path}", f"--out={out}",
         "--progress_every=1", *cmds, *flags],
        cwd=ROOT, env=dict(env, **(extra_env or {})), capture_output=True, text=True,
        timeout=120)
    return proc

  def calls(mode="train"):
    path = tmp_path / "calls.jsonl"
    lines = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    return [c for c in lines if c["mode"] == mode]

  def results():
    return study_lib.read_jsonl(str(out / "results.jsonl"))

  return dict(run=run, calls=calls, results=results, out=out)


def two_arms(**extra):
  spec = dict(config="configs/smoke.py", overrides=["--config.total_steps=4"], seeds=[0, 1],
              arms=[dict(name="A", group="Table 7", overrides={"fake.acc": 70}),
                    dict(name="B", group="Table 8", overrides=["--config.fake.acc=60"])])
  return {**spec, **extra}


def _alive(pid):
  """True while `pid` runs (a zombie counts as gone)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      return "\nState:\tZ" not in f.read()
  except FileNotFoundError:
    return False


# ----------------------------------------------------------------------------- resumability


def test_killed_study_resumes_and_skips_finished_pairs(fake):
  first = fake["run"](two_arms(), extra_env={"FAKE_KILL": "b/seed0"})
  assert first.returncode == -9, first.stdout + first.stderr
  # Seed-major order: A seed 0 finished, then B seed 0 was killed at step 2.
  assert [(r["arm"], r["seed"]) for r in fake["results"]()] == [("A", 0)]
  killed = [c for c in fake["calls"]() if c["run"] == "b/seed0"][0]
  deadline = time.time() + 20
  while _alive(killed["pid"]) and time.time() < deadline:
    time.sleep(0.2)
  assert not _alive(killed["pid"]), "the trainer outlived the killed study"

  second = fake["run"](two_arms())
  assert second.returncode == 0, second.stdout + second.stderr
  trains = [(c["run"], c["start"]) for c in fake["calls"]()]
  # A seed 0 trained once; B seed 0 resumed from its checkpoint; seed 1 trained once per arm.
  assert trains == [("a/seed0", 0), ("b/seed0", 0), ("b/seed0", 2), ("a/seed1", 0),
                    ("b/seed1", 0)]
  assert sorted((r["arm"], r["seed"]) for r in fake["results"]()) == [
      ("A", 0), ("A", 1), ("B", 0), ("B", 1)]
  assert "B | seed 0: training (resuming)" in second.stdout

  third = fake["run"](two_arms())
  assert third.returncode == 0 and len(fake["calls"]()) == 5  # nothing trained again
  assert len(fake["calls"]("knn")) == 4 and len(fake["calls"]("linear")) == 4
  assert len(fake["results"]()) == 4


def test_record_holds_what_the_runner_read(fake):
  proc = fake["run"](two_arms(linear_args=["--epochs=3"]), extra_env={"FAKE_SLOW": "b/seed1"})
  assert proc.returncode == 0
  assert "B | seed 1 training: 0m01s elapsed | step " in proc.stdout  # the trainer's progress
  rec = {(r["arm"], r["seed"]): r for r in fake["results"]()}[("B", 1)]
  assert rec["overrides"] == ["--config.total_steps=4", "--config.fake.acc=60", "--config.seed=1"]
  assert rec["steps"] == 4 and rec["base_lr"] is None and rec["group"] == "Table 8"
  assert rec["images_per_sec"] == statistics.median([5.0, 102.0, 103.0, 104.0])
  assert rec["knn"] == {"10": 61.1, "20": 61.0, "100": 60.2, "200": 59.2}
  assert rec["linear_top1"] == 66.0 and rec["train_seconds"] >= 0
  knn_call = [c for c in fake["calls"]("knn") if c["run"] == "b/seed1"][0]
  assert "--ks=10,20,100,200" in knn_call["args"]
  assert "--baselines=none" in knn_call["args"]   # the random init is not evaluated per arm
  assert "--epochs=3" in [c for c in fake["calls"]("linear") if c["run"] == "b/seed1"][0]["args"]


def test_failed_pair_is_reported_then_retried(fake):
  first = fake["run"](two_arms(), extra_env={"FAKE_FAIL": "a/seed1"})
  assert first.returncode == 1
  assert len(fake["results"]()) == 3  # the others still ran
  md = (fake["out"] / "results.md").read_text()
  assert "## Failed runs" in md and "A, seed 1: training failed: exit code 1" in md
  assert "Non-finite loss" in md
  second = fake["run"](two_arms())
  assert second.returncode == 0 and len(fake["results"]()) == 4
  assert "Failed runs" not in (fake["out"] / "results.md").read_text()


def test_interrupted_evaluation_resumes_at_its_stage(fake):
  """Training and k-NN done, the linear probe crashed: the rerun runs the linear probe only."""
  spec = two_arms(seeds=[0])
  spec["arms"] = spec["arms"][:1]
  assert fake["run"](spec, extra_env={"FAKE_FAIL": "a/seed0:linear"}).returncode == 1
  assert fake["results"]() == []
  assert fake["run"](spec).returncode == 0
  assert [len(fake["calls"](m)) for m in ("train", "knn", "linear")] == [1, 1, 2]
  assert fake["results"]()[0]["knn"]["20"] == 70.0


def test_changed_arm_with_recorded_results_is_refused(fake):
  assert fake["run"](two_arms(seeds=[0])).returncode == 0
  changed = two_arms(seeds=[0])
  changed["arms"][0]["overrides"] = {"fake.acc": 71}
  proc = fake["run"](changed)
  assert proc.returncode != 0
  assert "Study error:" in proc.stderr and "run with other overrides" in proc.stderr


# ----------------------------------------------------------------------------- tables and sweeps


def test_tables_hold_mean_and_sample_std_per_group(fake):
  assert fake["run"](two_arms(seeds=[0, 1, 2])).returncode == 0
  md = (fake["out"] / "results.md").read_text()
  # k-NN at k = 20 per seed: A 70, 71, 72; B 60, 61, 62. Linear: +5.
  for arm, base in (("A", 70.0), ("B", 60.0)):
    knn = np.array([base, base + 1, base + 2])
    cell = f"{knn.mean():.2f} ± {knn.std(ddof=1):.2f}"
    lin = f"{knn.mean() + 5:.2f} ± {knn.std(ddof=1):.2f}"
    assert f"| {arm} | 3/3 | {cell} | {lin} | 4 |" in md, md
  assert md.index("## Table 7") < md.index("| A |") < md.index("## Table 8") < md.index("| B |")
  png = (fake["out"] / "results.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_sweep_runs_every_rate_then_the_best(fake):
  spec = dict(config="configs/smoke.py", seeds=[0, 1, 2], sweep_seeds=1,
              arms=[dict(name="SOVE", group="Table 7", base_lrs=[5e-4, 1e-3, 3e-3]),
                    dict(name="DINO", group="Table 7", overrides={"fake.acc": 65})])
  proc = fake["run"](spec)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  trains = [c["run"] for c in fake["calls"]()]
  # Seed 0: every rate; seeds 1 and 2: the best rate (1e-3) only.
  assert trains == ["sove/lr0.0005/seed0", "sove/lr0.001/seed0", "sove/lr0.003/seed0",
                    "dino/seed0", "sove/lr0.001/seed1", "dino/seed1", "sove/lr0.001/seed2",
                    "dino/seed2"]
  md = (fake["out"] / "results.md").read_text()
  assert "| SOVE | 0.001 (best of 3) | 3/3 | 71.00 ± 1.00 |" in md, md
  assert "| DINO | – | 3/3 | 66.00 ± 1.00 |" in md
  sweep = md[md.index("### SOVE"):]
  assert "| 0.0005 | 1 | 69.50 |" in sweep and "| 0.003 | 1 | 68.00 |" in sweep
  assert "| 0.001 | 3 | 71.00 ± 1.00 | 76.00 ± 1.00 | best |" in sweep
  lrs = {r["base_lr"] for r in fake["results"]() if r["arm"] == "SOVE"}
  assert lrs == {5e-4, 1e-3, 3e-3}


def test_best_rate_selection_rules():
  arm = study_lib.Arm("M", "T", (), (1e-3, 2e-3, 4e-3))
  study = study_lib.Study(arms=(arm,), seeds=(0, 1), sweep_seeds=2)
  rec = lambda lr, seed, knn, lin: {"arm": "M", "base_lr": lr, "seed": seed,
                                    "knn": {"20": knn}, "linear_top1": lin}
  records = [rec(1e-3, 0, 70, 80), rec(1e-3, 1, 72, 79), rec(2e-3, 0, 71, 85),
             rec(2e-3, 1, 71, 85), rec(4e-3, 0, 90, 10)]
  by_run = study_lib.records_by_run(study, records)
  assert study_lib.best_rate(study, arm, by_run)[0] is None  # 4e-3 lacks seed 1
  records.append(rec(4e-3, 1, 40, 10))
  by_run = study_lib.records_by_run(study, records)
  best, scores = study_lib.best_rate(study, arm, by_run)
  assert scores == {1e-3: 71.0, 2e-3: 71.0, 4e-3: 65.0} and best == 1e-3  # tie: smaller rate
  by_linear = study_lib.dataclasses.replace(study, select="linear")
  assert study_lib.best_rate(by_linear, arm, by_run)[0] == 2e-3
  assert study_lib.mean_std([70.0]) == (70.0, None)
  mean, std = study_lib.mean_std([1.0, 2.0, 4.0])
  assert mean == pytest.approx(7 / 3) and std == pytest.approx(np.std([1, 2, 4], ddof=1))


# ----------------------------------------------------------------------------- definitions


@pytest.mark.parametrize("spec,message", [
    (dict(arms=[dict(name="A", overrides={"total_steps": 9})]), "same budget"),
    (dict(arms=[dict(name="A", overrides={"seed": 3})]), "same budget"),
    (dict(overrides=["--config.sove.num_anchors=8"],
          arms=[dict(name="A", overrides={"sove.num_anchors": 16})]), "twice"),
    (dict(arms=[dict(name="A", overrides=["sove.x"])]), "--config.FIELD=VALUE"),
    (dict(arms=[dict(name="A", base_lrs=[1e-3], overrides={"optim.base_lr": 1e-3})]),
     "keep one"),
    (dict(arms=[dict(name="A b"), dict(name="a-B")]), "share the directory"),
    (dict(arms=[dict(name="A", lr=1)]), "unknown field"),
    (dict(arms=[dict(name="A")], knn_ks=[10, 100]), "k = 20"),
    (dict(arms=[dict(name="A", base_lrs=[1e-3, 1e-3])]), "distinct positive"),
    (dict(arms=[]), "no arms"),
    (dict(arms=[dict(name="A", same_as="B")]), "must name an arm"),
    (dict(arms=[dict(name="A", base_lrs=[1e-3]), dict(name="B", same_as="A")]),
     "must name an arm"),
    (dict(arms=[dict(name="A"), dict(name="B", same_as="A", overrides={"x.y": 1})]),
     "cannot have overrides"),
    (dict(arms=[dict(name="A", paper=dict(knn="70"))]), "paper must be"),
])
def test_bad_studies_are_refused_before_anything_runs(spec, message):
  with pytest.raises(study_lib.StudyError, match=message):
    study_lib.make_study(spec)


def test_python_study_file_and_dry_run(tmp_path):
  path = tmp_path / "table.py"
  path.write_text("def get_study():\n"
                  "  return dict(config='configs/smoke.py', seeds=[3],\n"
                  "              arms=[dict(name='K=8', overrides={'sove.num_anchors': 8}),\n"
                  "                    dict(name='Flip', overrides={'data.flip': False,\n"
                  "                         'data.global_scale': (0.3, 1.0)})])\n")
  proc = subprocess.run([sys.executable, "-m", "sove_jax.study", f"--arms={path}",
                         f"--out={tmp_path / 'out'}", "--dry_run"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 2 and all(l.startswith("to do ") for l in lines)
  assert "--workdir=" + str(tmp_path / "out" / "k-8" / "seed3") in lines[0]
  assert lines[0].endswith("--config.sove.num_anchors=8 --config.seed=3")
  assert "--config.data.flip=false '--config.data.global_scale=(0.3,1.0)'" in lines[1]
  assert not (tmp_path / "out" / "k-8").exists()


def test_runner_imports_neither_tensorflow_nor_jax():
  code = ("import sys, sove_jax.study; "
          "print(sorted(m for m in ('tensorflow', 'jax', 'sove_jax.train') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
  assert out.stdout.strip() == "[]", out.stderr


# ----------------------------------------------------------------------------- end to end


def test_smoke_study_end_to_end(tmp_path):
  """The real trainer and evaluators, one arm x one seed of the smoke config (4 steps); the
  evaluators on subsets of Fashion-MNIST to keep the test short."""
  path = tmp_path / "smoke.json"
  path.write_text(json.dumps(dict(
      config="configs/smoke.py", arms=[dict(name="SOVE smoke", group="Smoke")],
      knn_args=["--max_train_examples=512", "--max_eval_examples=256"],
      linear_args=["--max_train_examples=512", "--max_eval_examples=256", "--epochs=2"])))
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "sove_jax.study", f"--arms={path}",
                         f"--out={out}", "--progress_every=30"], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  [rec] = study_lib.read_jsonl(str(out / "results.jsonl"))
  assert rec["steps"] == 4 and rec["images_per_sec"] > 0
  assert set(rec["knn"]) == {"10", "20", "100", "200"}
  assert 10.0 < rec["knn"]["20"] <= 100.0 and 0.0 < rec["linear_top1"] <= 100.0
  knn = json.loads((out / "sove-smoke" / "seed0" / "knn.json").read_text())
  assert knn["top1"]["full"]["20"] == rec["knn"]["20"]
  md = (out / "results.md").read_text()
  assert "| SOVE smoke | 1/1 |" in md and (out / "results.png").exists()
  assert "Evaluator flags: k-NN `--max_train_examples=512" in md


# ----------------------------------------------------------------------------- the paper's studies

TABLE7 = os.path.join(ROOT, "studies", "table7.py")
ABLATIONS = os.path.join(ROOT, "studies", "ablations.py")


def _parse_config(config_path, overrides):
  """The config `python -m sove_jax.main --config=PATH OVERRIDES...` trains, parsed the same way."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["main", f"--config={config_path}", *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", config_path, flag_values=values,
                                           sys_argv=argv)
  values(argv)
  return holder.value


def test_paper_studies_hold_the_papers_tables():
  from sove_jax import configuration
  default = configuration.load(os.path.join(ROOT, "configs", "default.py"))
  t7 = study_lib.load_study(TABLE7)
  assert [a.name for a in t7.arms] == ["SOVE", "SOVE [CLS] only", "SOVE MIM only", "iBOT",
                                       "iBOT MIM only", "DINO"]
  assert t7.seeds == (0, 1, 2) and t7.num_sweep_seeds == 1
  lr = default.optim.base_lr
  assert all(a.base_lrs == (lr / 2, lr, 2 * lr) for a in t7.arms)
  assert [(a.paper_knn, a.paper_linear) for a in t7.arms] == [
      (70.0, 74.3), (68.6, 72.7), (16.8, 30.2), (69.1, 74.2), (9.5, 29.8), (67.9, 72.5)]
  assert "--config.data.num_local=0" in t7.overrides  # Table 7: no multi-crop

  ab = study_lib.load_study(ABLATIONS)
  assert ab.seeds == (0, 1) and not any(a.base_lrs for a in ab.arms)
  groups = collections.Counter(a.group for a in ab.arms)
  assert list(groups.items()) == [
      ("Base recipe", 1), ("Table 8 [CLS] judges", 4), ("Table 9 judge contributions", 2),
      ("Table B.1 [CLS] tasks", 3), ("Table B.2 global representation", 2),
      ("Table B.3 [CLS] anchors", 4), ("Figure B.1 masks", 2)]
  bank = default.sove.class_bank_size
  anchors = [a.name.split(": ")[1] for a in ab.arms if a.group == "Table B.3 [CLS] anchors"]
  assert anchors == [f"K={bank // d}" for d in (32, 16, 8, 4)]
  # Derived from the base config the study is given: the smoke config's bank and rate, and the
  # rows that are its own recipe (they report the base arm's runs instead of training again).
  smoke = configuration.load(os.path.join(ROOT, "configs", "smoke.py"))
  small = study_lib.load_study(ABLATIONS, config="configs/smoke.py")
  assert small.config == "configs/smoke.py"
  k = smoke.sove.class_bank_size
  assert [a.overrides[-1] if a.overrides else a.same_as for a in small.arms
          if a.group.startswith("Table B.3")] == [
      f"--config.sove.num_anchors={k // 32}", f"--config.sove.num_anchors={k // 16}",
      "SOVE: base recipe", f"--config.sove.num_anchors={k // 4}"]   # smoke: K = bank / 8
  assert smoke.sove.num_anchors == k // 8 and smoke.sove.num_neighbors == 4
  assert [a.name for a in small.arms if a.same_as] == [
      "Table 8 [CLS] judges: J=5", "Table 9 judge contributions: soft",
      "Table B.1 [CLS] tasks: T=2", "Table B.2 global representation: [CLS]",
      f"Table B.3 [CLS] anchors: K={k // 8}", "Figure B.1 masks: block 0.3"]
  assert study_lib.load_study(TABLE7, config="configs/smoke.py").arms[0].base_lrs == (
      smoke.optim.base_lr / 2, smoke.optim.base_lr, 2 * smoke.optim.base_lr)


@pytest.mark.parametrize("study_file", [TABLE7, ABLATIONS])
@pytest.mark.parametrize("config",
                         ["configs/default.py", "configs/study.py", "configs/smoke.py"])
def test_every_arm_of_the_paper_studies_is_a_valid_config(study_file, config):
  """Each arm x rate parses as the trainer's command line and passes the config checks, and the
  fields it sets are the ones the trainer reads."""
  from sove_jax import configuration
  study = study_lib.load_study(study_file, config=config)
  seen = collections.Counter()
  for arm in study.arms:
    if arm.same_as:
      continue
    for lr in arm.base_lrs or (None,):
      overrides = study.overrides_for(study_lib.Run(arm, lr), seed=1)
      parsed = _parse_config(os.path.join(ROOT, config), overrides)
      configuration.validate(parsed, num_devices=1)
      assert parsed.seed == 1 and parsed.knn_every == 0
      if lr is not None:
        assert parsed.optim.base_lr == lr
      trained = parsed.to_dict()
      del trained["seed"]
      seen[json.dumps(trained, sort_keys=True, default=str)] += 1
  # No two runs train the same config (an override that did not land would repeat one; a row
  # that is the base recipe reports the base arm's runs).
  assert max(seen.values()) == 1


def test_paper_studies_plan_and_report():
  """Table 7: every rate of every arm on seed 0, then each arm's best rate on seeds 1 and 2; the
  report puts the paper's figures beside ours. The ablations: each trained arm on 2 seeds."""
  t7 = study_lib.load_study(TABLE7)
  plan = study_lib.planned_runs(t7, {})
  assert len(plan) == 6 * 3 and {seed for _, seed in plan} == {0}
  best = {arm.name: arm.base_lrs[i % 3] for i, arm in enumerate(t7.arms)}
  record = lambda run, seed: {
      "arm": run.arm.name, "base_lr": run.base_lr, "seed": seed, "steps": 749,
      "knn": {"20": 60.0 + seed + (run.base_lr == best[run.arm.name])},
      "linear_top1": 65.0 + seed}
  records = [record(run, seed) for run, seed in plan]
  plan = study_lib.planned_runs(t7, study_lib.records_by_run(t7, records))
  later = [(run.arm.name, run.base_lr, seed) for run, seed in plan if seed > 0]
  assert later == [(a.name, best[a.name], seed) for seed in (1, 2) for a in t7.arms]
  records += [record(run, seed) for run, seed in plan if seed > 0]
  md = study_lib.markdown(t7, records)
  assert "## Table 7: parametric vs non-parametric tokenizer" in md
  assert "| Arm | base_lr | n | k-NN k=20 | Linear | Paper k-NN | Paper linear |" in md
  for arm in t7.arms:
    row = next(l for l in md.splitlines() if l.startswith(f"| {arm.name} |"))
    assert row.startswith(f"| {arm.name} | {best[arm.name]:g} (best of 3) | 3/3 | 62.00 ± 1.00 "
                          f"| 66.00 ± 1.00 | {arm.paper_knn:.1f} | {arm.paper_linear:.1f} |"), row
  assert "Table 7 (ImageNet-1k, ViT-S/16, 300 epochs without multi-crop)" in md

  ab = study_lib.load_study(ABLATIONS)
  plan = study_lib.planned_runs(ab, {})
  trained = [a for a in ab.arms if not a.same_as]
  # 17 rows and the base arm; the rows that are the base config's own recipe (which ones
  # depends on configs/default.py) are trained once, as the base arm.
  shared = [a for a in ab.arms if a.same_as]
  assert len(ab.arms) == 18 and shared and len(trained) == 18 - len(shared)
  assert len(plan) == 2 * len(trained)
  assert [run.arm.name for run, seed in plan if seed == 0] == [a.name for a in trained]


def test_paper_study_subset_through_the_runner(fake):
  """`--only` picks rows (and the base arm a row reports), `--knn_args` reaches the evaluator,
  and a row that is the base recipe shows the base arm's runs."""
  out = fake["out"]
  proc = fake["run"](ABLATIONS, "--only=Table B.2 global representation,Figure B.1 masks: "
                     "random 0.7", "--knn_args=--max_eval_examples=7", "--seeds=0")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  runs = [c["run"] for c in fake["calls"]()]
  # The [CLS] row is the default's recipe: it reports the base arm's run, trained first.
  assert runs == ["sove-base-recipe/seed0", "table-b.2-global-representation-mean-patch/seed0",
                  "figure-b.1-masks-random-0.7/seed0"]
  assert all("--max_eval_examples=7" in c["args"] for c in fake["calls"]("knn"))
  md = (out / "results.md").read_text()
  assert "| [CLS] (= SOVE: base recipe) | 1/1 | 70.00 | 75.00 | 69.2 | 4 |" in md, md
  assert "| mean patch | 1/1 |" in md and "67.8" in md
  assert "the runs of SOVE: base recipe" in md and "Table 8" not in md
  bad = fake["run"](ABLATIONS, "--only=Table 10")
  assert bad.returncode != 0 and "--only names no arm or group ['Table 10']" in bad.stderr
