r"""The README's "Does it learn?" table: the default run, as a new user starts it, for several
seeds, with every evaluation beside the random initialization and the raw pixels.

    python benchmarks/default_figures.py --seeds=0,1 --out=runs/default_figures

For each seed: `python -m sove_jax.main --config=configs/default.py --config.seed=S` (its wall
time measured around the whole command: start-up, compilation and the k-NN monitor included),
then `python -m sove_jax.evaluate.knn --lowshot` and `python -m sove_jax.evaluate.linear
--epochs=30`, both
with the random-initialization and raw-pixel baselines on the same splits (whole train and
test splits). Finished stages are skipped, so the script resumes; the table (mean, and the
spread as min-max over seeds) is printed and written to OUT/figures.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINES = ["--baselines=random_init", "--baselines=pixels"]
KS = ("10", "20", "100", "200")


def _run(cmd, log):
  with open(log, "a") as f:
    rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if rc:
    raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}; see {log}")


def run_seed(seed, out, config, extra):
  workdir = os.path.join(out, f"seed{seed}")
  os.makedirs(workdir, exist_ok=True)
  py = sys.executable
  wall_path = os.path.join(workdir, "wall.json")
  if not os.path.exists(wall_path):
    t0 = time.time()
    _run([py, "-m", "sove_jax.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.seed={seed}", *extra], os.path.join(workdir, "train.log"))
    with open(wall_path, "w") as f:
      json.dump({"train_wall_seconds": time.time() - t0}, f)
  for name, args in (("knn", ["--lowshot"]), ("linear", ["--epochs=30"])):
    if not os.path.exists(os.path.join(workdir, f"{name}.json")):
      _run([py, "-m", f"sove_jax.evaluate.{name}", f"--workdir={workdir}", *args, *BASELINES],
           os.path.join(workdir, f"{name}.log"))
  return workdir


def _cell(values, digits=1):
  mean = statistics.fmean(values)
  if len(values) == 1:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(workdirs):
  """Markdown: rows are evaluations, columns trained / random init / raw pixels."""
  knn = [json.load(open(os.path.join(w, "knn.json"))) for w in workdirs]
  lin = [json.load(open(os.path.join(w, "linear.json"))) for w in workdirs]
  walls = [json.load(open(os.path.join(w, "wall.json")))["train_wall_seconds"] / 60
           for w in workdirs]

  def column(records, who, subset, k):
    return [(r["top1"] if who == "trained" else r["baselines"][who])[subset][k] for r in records]

  lines = [f"Seeds: {len(workdirs)}; mean (min-max). Training wall time: {_cell(walls)} min.", "",
           "| evaluation (top-1 %, whole test split) | SOVE teacher | random init | raw pixels |",
           "|---|---|---|---|"]
  rows = [(f"k-NN, k = {k}", "full", k) for k in KS]
  rows += [("k-NN 1% labels, k = 20", "1%", "20"), ("k-NN 10% labels, k = 20", "10%", "20")]
  for label, subset, k in rows:
    cells = [_cell(column(knn, who, subset, k)) for who in ("trained", "random_init", "pixels")]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  probe = [_cell([r["top1"] for r in lin])] + [
      _cell([r["baselines"][b]["top1"] for r in lin]) for b in ("random_init", "pixels")]
  lines.append(f"| linear probe ({lin[0]['convention']}; pixels for raw pixels) | "
               + " | ".join(probe) + " |")
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--out", default="runs/default_figures")
  p.add_argument("--config", default="configs/default.py")
  p.add_argument("--override", action="append", default=[],
                 help="extra --config.FIELD=VALUE for the training command (repeatable)")
  p.add_argument("--table_only", action="store_true")
  a = p.parse_args()
  seeds = [int(s) for s in a.seeds.split(",")]
  workdirs = [os.path.join(a.out, f"seed{s}") for s in seeds]
  if not a.table_only:
    for s in seeds:
      run_seed(s, a.out, a.config, a.override)
  text = table(workdirs)
  with open(os.path.join(a.out, "figures.md"), "w") as f:
    f.write(text)
  print(text, end="")


if __name__ == "__main__":
  main()
