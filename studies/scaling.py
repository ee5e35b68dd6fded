r"""The scaling curve: the default at 1x, 2x, 4x and 8x its steps, and where it meets the pixels.

    python -m sove_jax.study --arms=studies/scaling.py --out=studies/results/scaling

The default as studies/ten_minutes.py's runs began from it (configs/default_without_koleo.py)
with only its length changed (`total_steps`: the cosine learning rate and the EMA schedule
follow it; the warm-up stays 0.3 epochs), evaluated as the arms of studies/ten_minutes.py are (k-NN on the validation split to select, k-NN and the linear
probe on the test split to report). The 1x points are that study's "default" runs (seeds 0 and
1, with the raw pixels and the random initialization beside them); this study adds 2x (seeds 0
and 1), 4x and 8x (seed 0). The report fits top-1 = a + b log2(steps / 2160) through every run:
b is what one doubling of the steps buys, and where the line meets the raw pixels is an
extrapolation, reported as one. The figure is docs/scaling_curve.png.
"""
import math
import os

from sove_jax import configuration
from sove_jax.study import records as rec
from sove_jax.study import stats
from sove_jax.study.spec import REPORT_K

ten = configuration.sibling("ten_minutes", of=__file__)

BASE_STEPS = ten.BASE_STEPS
MULTIPLES = (2, 4, 8)
FIGURE = os.path.join("docs", "scaling_curve.png")


def get_study():
  group = "Scaling curve: the default at 2x-8x its steps (1x: studies/ten_minutes.py)"
  arms = [dict(name=f"default {m}x", group=group, overrides={"total_steps": BASE_STEPS * m},
               seeds=[0, 1] if m == 2 else [0]) for m in MULTIPLES]
  return dict(config=ten.BASE_CONFIG, same_budget=False, seeds=[0, 1],
              overrides={"knn_every": 0}, **ten.EVALUATOR_ARGS, stages=ten.STAGES,
              select="knn_val", arms=arms, notes=__doc__.split("\n\n", 2)[2])


def _point(record) -> dict:
  stages = rec.stages_of(record)
  get = lambda stage, path: rec.dig(stages.get(stage), path)
  return {"steps": record.get("steps") or BASE_STEPS,
          "knn_val": get("knn_val", f"top1.full.{REPORT_K}"),
          "knn": get("knn", f"top1.full.{REPORT_K}"), "linear": get("linear", "top1"),
          "linear_val": ten.linear_val(record),
          "pixels_knn": get("pixels_knn", f"baselines.pixels.full.{REPORT_K}"),
          "random_knn": get("pixels_knn", f"baselines.random_init.full.{REPORT_K}"),
          "pixels_linear": get("pixels_probe", "baselines.pixels.top1"),
          "random_linear": get("pixels_probe", "baselines.random_init.top1")}


def curve_points(records, first_points) -> list[dict]:
  """One point per run and seed (newest record wins): the 1x runs' records `first_points`
  (studies/ten_minutes.py's default), then this study's."""
  latest = {}
  for r in list(first_points) + list(records):
    if r.get("arm") in ("default", *(f"default {m}x" for m in MULTIPLES)):
      latest[(r["arm"], r.get("seed"))] = r
  return sorted((_point(r) for r in latest.values()), key=lambda p: p["steps"])


def fit(points, metric: str, flat: str) -> dict | None:
  """The line of `metric` over log2(steps / 2160) and where it meets the mean of `flat` (as a
  multiple of the default's steps; None when the line does not rise); None without 3 runs at
  2 lengths or more."""
  xy = [(math.log2(p["steps"] / BASE_STEPS), p[metric]) for p in points
        if p[metric] is not None]
  if len(xy) < 3 or len({x for x, _ in xy}) < 2:
    return None
  out = stats.line_fit([x for x, _ in xy], [y for _, y in xy])
  level = [p[flat] for p in points if p[flat] is not None]
  out.update(n=len(xy), level=sum(level) / len(level) if level else None, meets=None)
  if level and out["slope"] > 0:
    out["meets"] = 2 ** ((out["level"] - out["intercept"]) / out["slope"])
  return out


def _first_points(out) -> list[dict]:
  """studies/ten_minutes.py's records, beside this study's results directory."""
  path = os.path.join(os.path.dirname(os.path.abspath(out or ".")), "ten_minutes",
                      "results.jsonl")
  return rec.read_jsonl(path) if os.path.exists(path) else []


def report(study, records, out):
  """The runs' figures, the fits and the crossing, and the figure."""
  del study
  points = curve_points(records, _first_points(out))
  if not points:
    return "## The scaling curve\n\n(no run yet)\n"
  fmt = lambda v: "–" if v is None else f"{v:.2f}"
  lines = ["## The scaling curve", "", "| steps | k-NN val | k-NN test | linear val | linear "
           "test |", "|---|---|---|---|---|"]
  lines += [f"| {p['steps']} | {fmt(p['knn_val'])} | {fmt(p['knn'])} | {fmt(p['linear_val'])} "
            f"| {fmt(p['linear'])} |" for p in points]
  flats = {k: [p[k] for p in points if p[k] is not None]
           for k in ("pixels_knn", "random_knn", "pixels_linear", "random_linear")}
  shown = [f"{k.replace('_', ' ')} {sum(v) / len(v):.2f}" for k, v in flats.items() if v]
  if shown:
    lines += ["", "Flat lines (mean over the 1x runs): " + "; ".join(shown) + "."]
  lines.append("")
  for metric, flat, label in (("knn", "pixels_knn", "k-NN (k = 20)"),
                              ("linear", "pixels_linear", "linear probe")):
    f = fit(points, metric, flat)
    if f is None:
      lines.append(f"- {label}: not enough runs for a fit yet.")
      continue
    where = (f"does not meet the pixels ({fmt(f['level'])})" if f["meets"] is None else
             f"meets the pixels' {f['level']:.2f} at {f['meets']:.1f}x the default's steps "
             f"({BASE_STEPS * f['meets']:,.0f} steps; an extrapolation)")
    lines.append(f"- {label}: {f['intercept']:.2f} {f['slope']:+.2f} per doubling of the steps "
                 f"(95% interval {f['ci'][0]:+.2f} to {f['ci'][1]:+.2f}; {f['n']} runs); "
                 f"{where}.")
  if out and _figure(points):
    lines += ["", f"Figure: `{FIGURE}`."]
  return "\n".join(lines) + "\n"


def _figure(points) -> bool:
  """Writes FIGURE (a k-NN and a linear panel); False without matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  top = max(p["steps"] for p in points) / BASE_STEPS
  for ax, (metric, flat, random, title) in zip(axes, (
      ("knn", "pixels_knn", "random_knn", "k-NN top-1, k = 20"),
      ("linear", "pixels_linear", "random_linear", "linear probe top-1"))):
    pts = [(p["steps"], p[metric]) for p in points if p[metric] is not None]
    ax.scatter([s for s, _ in pts], [y for _, y in pts], color="tab:blue", zorder=3,
               label="SOVE teacher (one point per run)")
    for key, color, name in ((flat, "tab:red", "raw pixels"),
                             (random, "tab:gray", "random init")):
      values = [p[key] for p in points if p[key] is not None]
      if values:
        ax.axhline(sum(values) / len(values), color=color, ls=":",
                   label=f"{name} {sum(values) / len(values):.1f}")
    f = fit(points, metric, flat)
    right = max(top, (f or {}).get("meets") or 0)
    if f is not None:
      xs = [i / 20 * (math.log2(right) + 0.5) for i in range(21)]
      ax.plot([BASE_STEPS * 2 ** x for x in xs], [f["intercept"] + f["slope"] * x for x in xs],
              "--", color="tab:blue", label=f"fit: {f['slope']:+.2f} per doubling")
    ax.set_xscale("log", base=2)
    ticks = [BASE_STEPS * 2 ** i for i in range(int(math.ceil(math.log2(max(right, 1)))) + 1)]
    ax.set_xticks(ticks, [f"{t}\n{t // BASE_STEPS}x" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("training steps (batches of 64; 2160: the default)")
    ax.set_ylabel("top-1 (%), Fashion-MNIST test split")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
  fig.suptitle("SOVE on Fashion-MNIST: the default (no KoLeo) at 1x-8x its steps (2-core CPU)")
  fig.tight_layout()
  fig.savefig(FIGURE, dpi=110)
  plt.close(fig)
  return True
