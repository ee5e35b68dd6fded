r"""Does SOVE learn? k-NN top-1 on Fashion-MNIST along a default run, against baselines.

    python -m sove_jax.study --arms=studies/learning_curve.py --out=studies/results/learning_curve

Trains `configs/default.py` with the k-NN monitor every 100 steps (the monitor's subsets:
`knn_train_examples` 10,000 train images as memory, `knn_eval_examples` 2,000 test images),
then scores the raw pixels and the randomly initialized network on the same subsets
(`python -m sove_jax.evaluate.knn --max_train_examples=10000 --max_eval_examples=2000`), and
the stage "curve" (this file run as a script on the workdir) keeps the monitor's curve in the
run's record. The report's last section is the table and `OUT/knn_curve.png` the figure.
`python -m sove_jax.study ... --override=--config.knn_every=50` changes the cadence.

    python studies/learning_curve.py --workdir=WORKDIR    # the curve of any run: curve.json
"""
import json
import os
import sys

SUBSETS = ["--max_train_examples=10000", "--max_eval_examples=2000"]

STUDY = dict(
    config="configs/default.py", overrides={"knn_every": 100}, seeds=[0],
    stages=["train",
            dict(name="knn", kind="knn",
                 args=[*SUBSETS, "--baselines=random_init", "--baselines=pixels"]),
            dict(name="curve", kind="command", metric="last.knn/top1_k20",
                 command=["{python}", "studies/learning_curve.py", "--workdir={workdir}"]),
            dict(name="features", kind="command", runs="report",
                 command=["{python}", "studies/diagnose_features.py", "--workdir={workdir}"])],
    arms=[dict(name="default", group="The default recipe")],
)


def curve(workdir: str) -> dict:
  """The monitor's points of a run: {"points": [{step, knn/top1_k*}], "last": the final one}."""
  points = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if any(k.startswith("knn/top1_k") for k in row):
        points.append({k: v for k, v in row.items() if k == "step" or k.startswith("knn/")})
  return {"points": points, "last": points[-1] if points else {}}


def report(study, rows, out=None):
  """The curve as a table (every k) beside the baselines, and its figure in OUT."""
  del study
  from sove_jax.study import records
  runs = [records.stages_of(r) for r in rows if "curve" in records.stages_of(r)]
  if not runs:
    return ""
  stages = runs[-1]
  points = stages["curve"]["points"]
  knn = stages.get("knn", {})
  ks = sorted({int(k.rsplit("_k", 1)[1]) for p in points for k in p if k.startswith("knn/")})
  lines = ["## The learning curve", "", "| features | step | " + " | ".join(f"k={k}" for k in ks)
           + " |", "|---|---|" + "---|" * len(ks)]
  for label, who in (("raw pixels", "pixels"), ("random init", "random_init")):
    full = knn.get("baselines", {}).get(who, {}).get("full", {})
    lines.append(f"| {label} | - | " + " | ".join(f"{full.get(str(k), float('nan')):.2f}"
                                                 for k in ks) + " |")
  for p in points:
    lines.append(f"| SOVE teacher | {p['step']} | " + " | ".join(
        f"{p.get(f'knn/top1_k{k}', float('nan')):.2f}" for k in ks) + " |")
  if out is not None and _figure(points, knn, os.path.join(out, "knn_curve.png")):
    lines += ["", "![k-NN top-1 along the run](knn_curve.png)"]
  return "\n".join(lines) + "\n"


def _figure(points, knn, path) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  base = {w: knn.get("baselines", {}).get(w, {}).get("full", {}).get("20")
          for w in ("pixels", "random_init")}
  fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
  steps = [p["step"] for p in points]
  ax.plot(([0] if base["random_init"] is not None else []) + steps,
          ([base["random_init"]] if base["random_init"] is not None else [])
          + [p["knn/top1_k20"] for p in points], marker="o", label="SOVE teacher [CLS]")
  if base["pixels"] is not None:
    ax.axhline(base["pixels"], color="gray", linestyle="--", label="raw pixels")
  if base["random_init"] is not None:
    ax.axhline(base["random_init"], color="tab:red", linestyle=":", label="random init")
  ax.set_xlabel("training step")
  ax.set_ylabel("k-NN top-1 (k=20), %")
  ax.set_title("Fashion-MNIST, configs/default.py")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


if __name__ == "__main__":
  args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
  if "workdir" not in args:
    sys.exit("usage: python studies/learning_curve.py --workdir=WORKDIR")
  result = curve(args["workdir"])
  with open(os.path.join(args["workdir"], "curve.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"{len(result['points'])} monitor points; last: {result['last']}")
