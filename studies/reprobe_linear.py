r"""Re-probes a finished study's runs at learning rates above its probe's grid.

Every run of both studies found its best linear-probe rate at the top of the grid it was probed
with (0.001 ... 0.1). This trains only the heads of the extra rates (default 0.3 and 1) on each
run's last checkpoint, as the study's probe did (`python -m sove_jax.evaluate.linear`, its
defaults otherwise): the probe's heads are independent (one loss term each, the same shuffling),
so the old rates' results stand and the union is what a probe with the whole grid gives. Each
run's merged rates and best top-1 are appended to OUT/linear_wide.jsonl; finished runs are
skipped, so the script resumes, and so are runs whose workdir is gone (named). The study's own
linear.json in each workdir is kept as it was.

    python studies/reprobe_linear.py --study=studies/results/ablations
    python studies/reprobe_linear.py --study=studies/results/table7 --lrs=0.3,1
    python studies/reprobe_linear.py --study=studies/results/ablations --table   # the table

`--table` prints, per arm (and study learning rate, where the study swept it), the mean and
standard deviation over seeds of the best top-1 on the study's grid and on the widened one, and
the rates that won.
"""
import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile


def _key(record) -> tuple:
  return record["arm"], record.get("base_lr"), record["seed"]


def table(rows) -> str:
  """Markdown: one line per (arm, study learning rate), in the order first seen."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[(row["arm"], row.get("base_lr"))].append(row)

  def cell(values):
    sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2f}{sd}"
  lines = ["| arm | study lr | seeds | linear, grid to 0.1 | linear, grid to 1 | best rates |",
           "|---|---|---|---|---|---|"]
  for (arm, lr), rs in groups.items():
    rates = ", ".join(sorted({r["best_lr"] for r in rs}, key=float))
    lines.append(f"| {arm} | {lr if lr is not None else '-'} | {len(rs)} | "
                 f"{cell([r['grid_top1'] for r in rs])} | {cell([r['linear_top1'] for r in rs])} "
                 f"| {rates} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--study", required=True, help="a study's results folder (holds results.jsonl)")
  p.add_argument("--lrs", default="0.3,1", help="the extra rates, comma-separated")
  p.add_argument("--table", action="store_true", help="print the table of the finished runs")
  a = p.parse_args()
  out = os.path.join(a.study, "linear_wide.jsonl")
  finished = []
  if os.path.exists(out):
    with open(out) as f:
      finished = [json.loads(line) for line in f if line.strip()]
  if a.table:
    print(table(finished))
    return
  done = {_key(r) for r in finished}
  with open(os.path.join(a.study, "results.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  todo = [r for r in records if _key(r) not in done]
  gone = [r for r in todo if not os.path.exists(os.path.join(r["workdir"], "linear.json"))]
  todo = [r for r in todo if r not in gone]
  print(f"{len(records)} runs, {len(todo)} to probe at {a.lrs}; {len(gone)} whose workdir is "
        f"gone: {', '.join(r['workdir'] for r in gone) or '-'}", flush=True)
  for i, r in enumerate(todo, 1):
    workdir = r["workdir"]
    kept = os.path.join(workdir, "linear.json")
    with tempfile.TemporaryDirectory() as tmp:
      backup = os.path.join(tmp, "linear.json")
      shutil.copy(kept, backup)
      with open(os.path.join(workdir, "linear_wide.log"), "a") as log:
        rc = subprocess.call([sys.executable, "-m", "sove_jax.evaluate.linear",
                              f"--workdir={workdir}", f"--lrs={a.lrs}"],
                             stdout=log, stderr=subprocess.STDOUT)
      extra = json.load(open(kept)) if rc == 0 else None
      shutil.copy(backup, kept)  # the study's record stays the study's
    if extra is None:
      raise SystemExit(f"{workdir}: the probe failed (exit {rc}); see its linear_wide.log")
    per_lr = {**r["linear_per_lr"], **{k: v for k, v in extra["per_lr"].items()}}
    best = max(per_lr, key=per_lr.get)
    row = {"arm": r["arm"], "group": r.get("group"), "base_lr": r.get("base_lr"),
           "seed": r["seed"], "workdir": workdir, "linear_per_lr": per_lr,
           "linear_top1": per_lr[best], "best_lr": best, "grid_top1": r["linear_top1"]}
    with open(out, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(f"[{i}/{len(todo)}] {r['arm']} lr={r.get('base_lr')} seed {r['seed']}: "
          f"{r['linear_top1']:.2f} -> {per_lr[best]:.2f} (best rate {best})", flush=True)


if __name__ == "__main__":
  main()
