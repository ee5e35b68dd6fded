r"""The best two 10-minute arms again at 4x their steps, chosen on validation by a rule fixed
before any result.

    python -m sove_jax.study --arms=studies/arms_4x.py --out=studies/results/arms_4x

The two arms of studies/ten_minutes.py (the default excluded) with the highest mean validation
k-NN (k = 20, memory `train-minival`, queries `minival`) over their two seeds train again at 4x
their 10-minute steps, seed 0, evaluated as there, beside studies/scaling.py's default at 4x:
whether what an arm buys at 10 minutes grows, holds or fades with four times the budget. Until
every arm of ten_minutes has both seeds on validation this study says so and runs nothing.
"""
import os
import statistics

from sove_jax import configuration
from sove_jax.study import records as rec
from sove_jax.study.spec import REPORT_K, StudyError

ten = configuration.sibling("ten_minutes", of=__file__)

MULTIPLE = 4
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def newest(study_name: str) -> dict:
  """{(arm, seed): newest record} of studies/results/<study_name>/results.jsonl."""
  path = os.path.join(RESULTS, study_name, "results.jsonl")
  out = {}
  for r in rec.read_jsonl(path) if os.path.exists(path) else []:
    out[(r.get("arm"), r.get("seed"))] = r
  return out


def val_knn(record) -> float | None:
  return None if record is None else rec.dig(rec.stages_of(record).get("knn_val"),
                                             f"top1.full.{REPORT_K}")


def chosen() -> list[str] | None:
  """The two arms with the best mean validation k-NN, or None while ten_minutes is unfinished."""
  done = newest("ten_minutes")
  scores = {name: [val_knn(done.get((name, s))) for s in (0, 1)] for name in ten.ARMS}
  if any(v is None for values in scores.values() for v in values):
    return None
  return sorted(scores, key=lambda name: -statistics.fmean(scores[name]))[:2]


def get_study():
  names = chosen()
  if names is None:
    raise StudyError("studies/ten_minutes.py has not finished both seeds of every arm on "
                     "validation; the two arms to run at 4x are chosen from them.")
  group = f"The best two 10-minute arms at {MULTIPLE}x their steps (chosen on validation)"
  arms = [dict(name=f"{name} {MULTIPLE}x", group=group,
               overrides={**ten.ARMS[name][0], "total_steps": MULTIPLE * ten.ARMS[name][1]})
          for name in names]
  return dict(config=ten.BASE_CONFIG, same_budget=False, seeds=[0],
              overrides={"knn_every": 0}, **ten.EVALUATOR_ARGS, stages=ten.STAGES,
              select="knn_val", arms=arms, notes=__doc__.split("\n\n", 2)[2])
