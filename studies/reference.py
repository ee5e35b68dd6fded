r"""The reference run: the best recipe at 4x, trained for an hour here, and for about two when
the hour misses the goal; 2 seeds; the recipe and the hour chosen by rules fixed before any
result, the two-hour run added after the hour's first seed.

    python -m sove_jax.study --arms=studies/reference.py --out=studies/results/reference

The recipe: of the default at 4x (studies/scaling.py, seed 0) and the two arms at 4x
(studies/arms_4x.py, seed 0), the one with the highest validation k-NN (k = 20, memory
`train-minival`, queries `minival`). The length: 8 times its 10-minute steps (17,280 steps, the
scaling curve's longest point, which trains within an hour of the quiet 2 cores: 48 minutes
measured) if the scaling curve's k-NN line meets the raw pixels within 8x the default's steps,
else 12 times (25,920 steps, about 72 minutes at the hour run's pace). The hour was first put at
6x, from the 8-9 minutes that the default's 2160 steps take with its k-NN monitor on; the first
minutes of the 12x run that rule chose measured the trainer alone (monitor off, as in every run
here) at 330-350 images/s on the quiet machine, so that an hour holds more than 8x, and that run
was stopped at step 520, before any evaluation, for the hour's length the goal asks for.

The goal (test k-NN >= 86 and linear probe >= 87, the mean of seeds 0 and 1) allows up to two
hours when an hour cannot reach it. The hour's seed 0 beat the raw pixels in both (85.54 against
85.16 k-NN, 86.85 against 84.62 linear) but missed the goal in both, so the 12x run (the length
this rule first fixed for two hours; 16x, about 96 minutes, would be the most that two hours
hold) follows, seeds 0 and 1: the test split decides this step only as the goal itself does.
Every run is evaluated as studies/ten_minutes.py's default is (validation and test, the pixels
and the random initialization beside it, k-NN on the probe's features too), and its report reads
the goal with the k-NN features that the run's own validation figures choose by
studies/ten_minutes.py's rule. configs/fashion_mnist.py then becomes the run that meets the goal,
else the longest. Until the curve and arms_4x are finished this study says so and runs nothing.
"""
import math
import statistics

from sove_jax import configuration
from sove_jax.study import records as rec
from sove_jax.study.spec import StudyError

ten = configuration.sibling("ten_minutes", of=__file__)
scaling = configuration.sibling("scaling", of=__file__)
arms_4x = configuration.sibling("arms_4x", of=__file__)

ONE_HOUR, TWO_HOURS = 8, 12  # multiples of the 10-minute steps: an hour; the two-hour run
GOAL_KNN, GOAL_LINEAR = 86.0, 87.0   # test top-1 the reference run is to reach (the raw pixels:
                                     # 85.2 k-NN, 84.6 linear)


def recipe():
  """(name, overrides, 10-minute steps) of the best 4x run on validation, or None."""
  names = arms_4x.chosen()
  if names is None:
    return None
  candidates = {"default": (arms_4x.val_knn(arms_4x.newest("scaling").get(("default 4x", 0))),
                            {}, ten.BASE_STEPS)}
  at_4x = arms_4x.newest("arms_4x")
  for name in names:
    candidates[name] = (arms_4x.val_knn(at_4x.get((f"{name} {arms_4x.MULTIPLE}x", 0))),
                        ten.ARMS[name][0], ten.ARMS[name][1])
  if any(score is None for score, _, _ in candidates.values()):
    return None
  best = max(candidates, key=lambda name: candidates[name][0])
  return best, candidates[best][1], candidates[best][2]


def multiple():
  """ONE_HOUR if the scaling curve's k-NN line meets the pixels within ONE_HOUR times the
  default's steps, else TWO_HOURS; None while the curve is unfinished."""
  runs = arms_4x.newest("scaling")
  if any(key not in runs for key in [("default 2x", 0), ("default 2x", 1), ("default 4x", 0),
                                     ("default 8x", 0)]):
    return None
  points = scaling.curve_points(runs.values(), arms_4x.newest("ten_minutes").values())
  fit = scaling.fit(points, "knn", "pixels_knn")
  if fit is None or fit["level"] is None:
    return None
  meets = fit["meets"] if fit["meets"] is not None else math.inf
  return ONE_HOUR if meets <= ONE_HOUR else TWO_HOURS


def get_study():
  chosen, times = recipe(), multiple()
  if chosen is None or times is None:
    raise StudyError("the scaling curve (studies/scaling.py) and studies/arms_4x.py are not "
                     "finished; the reference run's recipe and length are chosen from them.")
  name, overrides, steps = chosen
  lengths = [ONE_HOUR, TWO_HOURS] if times == ONE_HOUR else [TWO_HOURS]
  runs = [dict(name=f"{name} {n}x", group="The reference run",
               overrides={**overrides, "total_steps": n * steps}) for n in lengths]
  study = ten.get_study()
  names = [run["name"] for run in runs]
  return {**study, "arms": runs, "notes": __doc__.split("\n\n", 2)[2],
          "stages": [s if isinstance(s, str) or not s.get("arms") else {**s, "arms": names}
                     for s in study["stages"]]}


def report(study, records, out):
  """Each length's run against the goal: test k-NN (k = 20) on the features its own validation
  figures choose (studies/ten_minutes.py's rule, applied to its two seeds) and the linear probe,
  each seed beside the raw pixels'; the goal is met when the mean of seeds 0 and 1 reaches
  GOAL_KNN, GOAL_LINEAR respectively. The test split chooses nothing here but the fallback the
  goal itself states (the two-hour run, when the hour's first seed misses the goal)."""
  del out
  by_run = rec.records_by_run(study, records)
  fmt = lambda v: "–" if v is None else f"{v:.2f}"
  get = lambda r, stage: None if stage is None or r is None else rec.metric(study, r, stage)
  lines = ["## The reference run against the goal", ""]
  for arm in (a.name for a in study.arms):
    runs = by_run.get(rec.run_key(arm, ()), {})
    if not runs:
      lines += [f"{arm}: no run yet.", ""]
      continue
    choice = ten.features_choice(study, by_run, arm)
    knn_stage = None if choice is None else "knn" if choice[0] == "cls" else f"knn_{choice[0]}"
    features = "features undecided" if choice is None else choice[0]
    lines += [f"| {arm}: seed | k-NN val | k-NN test ({features}) | k-NN test ([CLS]) | "
              "linear test | pixels k-NN | pixels linear |", "|---|---|---|---|---|---|---|"]
    for seed, r in sorted(runs.items()):
      lines.append(f"| {seed} | {fmt(get(r, 'knn_val'))} | {fmt(get(r, knn_stage))} | "
                   f"{fmt(get(r, 'knn'))} | {fmt(get(r, 'linear'))} | "
                   f"{fmt(get(r, 'pixels_knn'))} | {fmt(get(r, 'pixels_probe'))} |")
    lines += ["", ten.features_rule(study, by_run, arm)]
    figures = {name: [get(runs.get(s), stage) for s in (0, 1)]
               for name, stage in (("knn", knn_stage), ("linear", "linear"))}
    if any(v is None for values in figures.values() for v in values):
      lines.append(f"The goal for {arm}: undecided until both seeds have the chosen features' "
                   "k-NN and the linear probe on test.")
    else:
      knn, linear = (statistics.fmean(figures[n]) for n in ("knn", "linear"))
      verdict = lambda value, goal: f"{value:.2f} against {goal:.0f}: " + (
          "met" if value >= goal else "not met")
      lines.append(f"The goal for {arm} (test, mean of seeds 0 and 1): k-NN "
                   f"{verdict(knn, GOAL_KNN)}; linear probe {verdict(linear, GOAL_LINEAR)}.")
    lines.append("")
  return "\n".join(lines).rstrip() + "\n"
