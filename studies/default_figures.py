r"""The default run as a new user starts it, for several seeds, with every evaluation beside the
random initialization and the raw pixels: docs/tuning.md, "The default's figures".

    python -m sove_jax.study --arms=studies/default_figures.py --out=studies/results/default_figures

For each seed: `python -m sove_jax.main --config=configs/default.py --config.seed=S` (its
training time measured around the whole command: start-up, compilation and the k-NN monitor
included), then `python -m sove_jax.evaluate.knn --lowshot` and `python -m
sove_jax.evaluate.linear --epochs=30`, both with the random-initialization and raw-pixel
baselines on the same splits (the whole train and test splits). The report's last section is
the table: rows are evaluations, columns the trained network, the random initialization and
raw pixels (mean, and min-max over seeds).
"""
import statistics

from sove_jax.study import records

BASELINES = ["--baselines=random_init", "--baselines=pixels"]
KS = ("10", "20", "100", "200")

STUDY = dict(
    config="configs/default.py", seeds=[0, 1],
    stages=["train", dict(name="knn", kind="knn", args=["--lowshot", *BASELINES]),
            dict(name="linear", kind="linear", args=["--epochs=30", *BASELINES])],
    arms=[dict(name="default", group="The default recipe")],
)


def _cell(values, digits=1):
  if not values:
    return "–"
  mean = statistics.fmean(values)
  if len(values) == 1:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(study, rows, out=None):
  """Markdown: rows are evaluations, columns trained / random init / raw pixels."""
  del study, out
  stages = [records.stages_of(r) for r in rows if r.get("arm") == "default"]
  knn = [s["knn"] for s in stages if "knn" in s]
  lin = [s["linear"] for s in stages if "linear" in s]
  walls = [r["train_seconds"] / 60 for r in rows if r.get("arm") == "default"]

  def column(results, who, subset, k):
    tree = [r["top1"] if who == "trained" else r.get("baselines", {}).get(who, {})
            for r in results]
    return [t[subset][k] for t in tree if subset in t and k in t[subset]]

  lines = ["## The default run against its baselines", "",
           f"Seeds: {len(walls)}; mean (min-max). Training time: {_cell(walls)} min.", "",
           "| evaluation (top-1 %, whole test split) | SOVE teacher | random init | raw pixels |",
           "|---|---|---|---|"]
  evaluations = [(f"k-NN, k = {k}", "full", k) for k in KS]
  evaluations += [("k-NN 1% labels, k = 20", "1%", "20"), ("k-NN 10% labels, k = 20", "10%", "20")]
  for label, subset, k in evaluations:
    cells = [_cell(column(knn, who, subset, k)) for who in ("trained", "random_init", "pixels")]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  if lin:
    probe = [_cell([r["top1"] for r in lin])] + [
        _cell([r["baselines"][b]["top1"] for r in lin if b in r.get("baselines", {})])
        for b in ("random_init", "pixels")]
    lines.append(f"| linear probe ({lin[0].get('convention')}; pixels for raw pixels) | "
                 + " | ".join(probe) + " |")
  return "\n".join(lines) + "\n"
