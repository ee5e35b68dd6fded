"""studies/reprobe_linear.py: the extra rates' heads merged with the study's, the study's own
linear.json left as it was, finished runs and runs whose workdir is gone skipped, the table's
means and best rates."""
import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("reprobe_linear",
                                              os.path.join(ROOT, "studies", "reprobe_linear.py"))
reprobe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reprobe)


def _study(tmp_path):
  rows = []
  for seed, (top, extra) in enumerate([(81.0, {"0.3": 82.0, "1": 81.5}),
                                       (80.0, {"0.3": 79.0, "1": 78.0})]):
    workdir = tmp_path / f"arm/seed{seed}"
    workdir.mkdir(parents=True)
    (workdir / "linear.json").write_text(json.dumps({"per_lr": {"0.1": top}, "top1": top}))
    (workdir / "extra.json").write_text(json.dumps(extra))  # what the fake probe finds
    rows.append({"arm": "A", "group": "G", "base_lr": None, "seed": seed,
                 "workdir": str(workdir), "linear_top1": top, "linear_per_lr": {"0.1": top}})
  rows.append({**rows[0], "seed": 2, "workdir": str(tmp_path / "arm/seed2")})  # deleted
  (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_reprobe_merges_the_extra_rates_keeps_the_study_record_and_resumes(tmp_path, monkeypatch,
                                                                          capsys):
  _study(tmp_path)
  calls = []

  def fake_probe(cmd, stdout, stderr):  # the evaluator overwrites the workdir's linear.json
    workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
    calls.append(workdir)
    extra = json.loads(open(os.path.join(workdir, "extra.json")).read())
    with open(os.path.join(workdir, "linear.json"), "w") as f:
      json.dump({"per_lr": extra, "top1": max(extra.values())}, f)
    return 0

  monkeypatch.setattr(subprocess, "call", fake_probe)
  monkeypatch.setattr(sys, "argv", ["reprobe", f"--study={tmp_path}"])
  reprobe.main()
  assert f"1 whose workdir is gone: {tmp_path / 'arm/seed2'}" in capsys.readouterr().out
  rows = [json.loads(line) for line in open(tmp_path / "linear_wide.jsonl")]
  assert [(r["linear_top1"], r["best_lr"], r["grid_top1"]) for r in rows] == [
      (82.0, "0.3", 81.0), (80.0, "0.1", 80.0)]
  assert rows[0]["linear_per_lr"] == {"0.1": 81.0, "0.3": 82.0, "1": 81.5}
  for seed, top in ((0, 81.0), (1, 80.0)):  # the study's own record is back
    assert json.load(open(tmp_path / f"arm/seed{seed}/linear.json"))["top1"] == top
  reprobe.main()  # resumed: nothing left to probe
  assert len(calls) == 2 and len(open(tmp_path / "linear_wide.jsonl").readlines()) == 2
  capsys.readouterr()
  monkeypatch.setattr(sys, "argv", ["reprobe", f"--study={tmp_path}", "--table"])
  reprobe.main()
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line == "| A | - | 2 | 80.50 ± 0.71 | 81.00 ± 1.41 | 0.1, 0.3 |"
