r"""The reference run: the best recipe at 4x, trained for about an hour here (two if the scaling
curve says an hour cannot reach the pixels), 2 seeds; chosen by rules fixed before any result.

    python -m sove_jax.study --arms=studies/reference.py --out=studies/results/reference

The recipe: of the default at 4x (studies/scaling.py, seed 0) and the two arms at 4x
(studies/arms_4x.py, seed 0), the one with the highest validation k-NN (k = 20, memory
`train-minival`, queries `minival`). The length: 6 times its 10-minute steps (about 50 minutes
of the quiet 2 cores) if the scaling curve's k-NN line meets the raw pixels within 6x the
default's steps, else 12 times (the best in two hours, which the goal allows when an hour cannot
reach the pixels). Seeds 0 and 1, evaluated as studies/ten_minutes.py's default is (validation
and test, the pixels and the random initialization beside it, k-NN on the probe's features too).
configs/fashion_mnist.py then becomes this recipe. Until the curve and arms_4x are finished this
study says so and runs nothing.
"""
import math

from sove_jax import configuration
from sove_jax.study.spec import StudyError

ten = configuration.sibling("ten_minutes", of=__file__)
scaling = configuration.sibling("scaling", of=__file__)
arms_4x = configuration.sibling("arms_4x", of=__file__)

ONE_HOUR, TWO_HOURS = 6, 12


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
  """ONE_HOUR if the scaling curve's k-NN line meets the pixels by 6x, else TWO_HOURS; None while
  the curve is unfinished."""
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
  run = dict(name=f"{name} {times}x", group="The reference run",
             overrides={**overrides, "total_steps": times * steps})
  study = ten.get_study()
  return {**study, "arms": [run], "notes": __doc__.split("\n\n", 2)[2],
          "stages": [s if isinstance(s, str) or not s.get("arms") else {**s, "arms": [run["name"]]}
                     for s in study["stages"]]}
