r"""Arms at the default's 10 minutes: what beyond length limits a short SOVE run here.

    python -m sove_jax.study --arms=studies/ten_minutes.py --out=studies/results/ten_minutes

The default as it was when this study began (configs/default_without_koleo.py: 2160 steps, about
8 minutes of the quiet 2 cores; the default has since taken the KoLeo 0.8 arm) reaches about
80% k-NN on Fashion-MNIST's test split, below the raw pixels' 85.2%. Each arm is the default
with one change and as many steps as the default's 2160 take of this machine's CPU
(`python benchmarks/recipe_speed.py --arms=studies/ten_minutes.py --rounds=3 --steps=10
--budget_of=default`), 2 seeds:

- patch 4 (a 7 x 7 grid: 49 tokens instead of 16) at width 64 (2 heads) and 96 (3 heads),
  1240 and 940 steps; patch 2 on 14 px crops (the same grid from a quarter of the pixels,
  evaluated at 14 px), width 64, 1300 steps: more tokens at comparable compute;
- KoLeo 0.05 and 0.1 (`sove.koleo_weight`, the authors' uniformity term on the student's [CLS]
  embeddings), against the narrow embedding (effective rank 8-10 of 128), 2160 steps; 0.2, 0.4,
  0.8 and 1.6 added one by one after the first seed, whose validation k-NN rose with the weight
  to the grid's top each time (0: 79.64, 0.05: 80.33, 0.1: 81.65, then 0.2: 82.08, 0.4: 82.72,
  0.8: 83.06), as a rate grid is extended until its best is interior; 1.6 (82.43) fell below
  0.8, which closed the grid;
- translate 3 px (`data.translate`: each view shifted by up to 3 px after its crop, a black
  border): small translations, which the crops (80-100% of the image, rescaled) barely give.
  The photometric steps that do nothing on gray images are out of the cost already: the host
  pipeline keeps Fashion-MNIST in one channel, where hue, saturation and grayscale are skipped.

The default's own runs also evaluate the raw pixels and the same network at its random
initialization with the same protocols, and k-NN on the linear probe's features ([CLS] + mean
patch; the last 4 blocks' [CLS]). The default at 2x-8x its steps is studies/scaling.py.

Every run is selected on the validation split and reported on the test split: k-NN (k = 20,
T = 0.07) with memory `train-minival` (50,000 images) and queries `minival` (10,000, class-
balanced, carved from the train split) to choose; memory `train`, queries `test` to report. The
linear probe (100 epochs on frozen features, 7 rates from 0.01 to 10) chooses its rate on the
same validation pair and reports the test split. The rules that use these figures were fixed before any result
(docs/tuning.md): an arm replaces the default when its mean validation k-NN beats the default's
by more than the larger of the two arms' seed spreads; the two arms with the best mean
validation k-NN run again at 4x (studies/arms_4x.py); the features k-NN reads are chosen on the
default's validation figures (a tie within 0.2 points keeps the last [CLS]).
"""
from sove_jax.study import records as rec
from sove_jax.study.spec import REPORT_K

DEFAULT = "default"
# The recipe every arm changes one thing of (the studies built on this one use it too): the default
# before it took the KoLeo arm, so that these runs train what they trained when they began.
BASE_CONFIG = "configs/default_without_koleo.py"
# The arm that replaced the default under the rule below (KoLeo 0.8: the best validation mean over
# both seeds); its runs get the feature stages the default's runs have, so that the new default's
# features are chosen by the same rule on its own validation figures.
SUCCESSOR = "KoLeo 0.8"
BASE_STEPS = 2160
SPLITS_VAL = ["--train_split=train-minival", "--eval_split=minival"]
# The probe's rate is chosen on minival from a grid that reaches above the evaluator's default
# (0.001-1): on the default's first run its best rate was the default grid's top, 1.
SELECT_ON_VAL = ["--select_split=minival", "--lrs=0.01,0.03,0.1,0.3,1,3,10"]
BASELINES = ["--baselines=pixels", "--baselines=random_init"]
PIXEL_PROBE = ["--select_split=minival", "--lrs=0.0003,0.001,0.003,0.01,0.03,0.1,0.3,1,3,10"]
FEATURES = ("cls_meanpatch", "last4_cls")
# The evaluations every run of this study and of studies/scaling.py gets (train first): the
# validation k-NN that selects, the test k-NN and the linear probe (rate chosen on validation).
STAGES = [
    "train",
    dict(name="knn_val", kind="knn", args=SPLITS_VAL, label="k-NN val"),
    dict(name="knn", kind="knn", label="k-NN test"),
    dict(name="linear", kind="linear", args=SELECT_ON_VAL, label="Linear test"),
]
EVALUATOR_ARGS = dict(knn_args=["--batch_size=512"], linear_args=["--batch_size=512"])

# Steps at the default's CPU time for its 2160 steps (CPU ms a step: 640 for the default's
# compute, the median of the default and the two KoLeo configs, 611-692; patch 4 w64 1119, w96
# 1464, patch 2 1064; docs/tuning.md has the table); KoLeo costs nothing measurable.
P4 = {"model.patch_size": 4, "data.local_size": 8}
P2 = {"model.patch_size": 2, "data.global_size": 14, "data.local_size": 8,
      "data.eval_resize": 14, "data.eval_crop": 14}
ARMS = {
    "KoLeo 0.05": ({"sove.koleo_weight": 0.05}, 2160),
    "KoLeo 0.1": ({"sove.koleo_weight": 0.1}, 2160),
    "KoLeo 0.2": ({"sove.koleo_weight": 0.2}, 2160),
    "KoLeo 0.4": ({"sove.koleo_weight": 0.4}, 2160),
    "KoLeo 0.8": ({"sove.koleo_weight": 0.8}, 2160),
    "KoLeo 1.6": ({"sove.koleo_weight": 1.6}, 2160),
    "patch 4, width 64": ({**P4, "model.width": 64, "model.num_heads": 2}, 1240),
    "patch 4, width 96": ({**P4, "model.width": 96, "model.num_heads": 3}, 940),
    "patch 2 on 14 px, width 64": ({**P2, "model.width": 64, "model.num_heads": 2}, 1300),
    "translate 3 px": ({"data.translate": 3}, 2160),
}


def get_study():
  group = "At the default's 10 minutes (each arm's steps at the default's CPU time)"
  stages = STAGES + [
      dict(name="pixels_knn", kind="knn", args=BASELINES, arms=[DEFAULT],
           metric=f"baselines.pixels.full.{REPORT_K}", label="pixels k-NN"),
      # The raw pixels' probe is best at lower rates than a network's (0.01 was the 0.01-10
      # grid's best for them): its own grid reaches down to 0.0003.
      dict(name="pixels_probe", kind="linear", args=PIXEL_PROBE + BASELINES, arms=[DEFAULT],
           metric="baselines.pixels.top1", label="pixels linear"),
  ]
  for f in FEATURES:
    stages += [dict(name=f"knn_val_{f}", kind="knn", args=SPLITS_VAL + [f"--features={f}"],
                    arms=[DEFAULT, SUCCESSOR], label=f"k-NN val {f}"),
               dict(name=f"knn_{f}", kind="knn", args=[f"--features={f}"],
                    arms=[DEFAULT, SUCCESSOR], label=f"k-NN test {f}")]
  arms = [dict(name=DEFAULT, group=group, overrides={"total_steps": BASE_STEPS})]
  arms += [dict(name=name, group=group, overrides={**overrides, "total_steps": steps})
           for name, (overrides, steps) in ARMS.items()]
  return dict(config=BASE_CONFIG, same_budget=False, seeds=[0, 1],
              overrides={"knn_every": 0}, **EVALUATOR_ARGS, stages=stages, select="knn_val",
              arms=arms, notes=__doc__.split("\n\n", 2)[2].split("\n\nEvery run")[0])


def linear_val(record):
  """The linear probe's validation figure: its best rate's top-1 on minival."""
  per_lr = (rec.stages_of(record).get("linear") or {}).get("per_lr") or {}
  return max(per_lr.values()) if per_lr else None


def report(study, records, out):
  """Each run's validation and test figures side by side (the linear probe's validation figure
  is not a table column: its stage reports the test split), its wall time on the shared
  machine and its CPU time (recorded from 2026-12-07's second session on)."""
  del out
  by_run = rec.records_by_run(study, records)
  lines = ["## Every run", "", "| arm | seed | steps | k-NN val | k-NN test | linear val | "
           "linear test | train time | train CPU time |", "|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda v: "–" if v is None else f"{v:.2f}"
  for arm in study.arms:
    for seed, r in sorted(by_run.get(rec.run_key(arm.name, ()), {}).items()):
      lines.append(f"| {arm.name} | {seed} | {r.get('steps')} | "
                   f"{fmt(rec.metric(study, r, 'knn_val'))} | {fmt(rec.metric(study, r, 'knn'))} | "
                   f"{fmt(linear_val(r))} | {fmt(rec.metric(study, r, 'linear'))} | "
                   f"{r.get('train_seconds', 0) / 60:.1f} min | "
                   + ("–" if r.get("train_cpu_seconds") is None
                      else f"{r['train_cpu_seconds'] / 60:.1f} min") + " |")
  return "\n".join(lines + [""] + rules(study, by_run)) + "\n"


FEATURE_TIE = 0.2  # points of mean validation k-NN within which the last [CLS] is kept


def seed_figures(study, by_run, arm: str, stage: str = "knn_val") -> list[float | None]:
  """`stage`'s figure of `arm` at seeds 0 and 1 (None where that run or stage has not finished)."""
  runs = by_run.get(rec.run_key(arm, ()), {})
  return [rec.metric(study, runs[s], stage) if s in runs else None for s in (0, 1)]


def rules(study, by_run) -> list[str]:
  """The rules fixed before any result (module docstring), applied to the validation figures:
  which arm, if any, replaces the default; which two run at 4x; which features k-NN reads. Each
  says "undecided" while a figure it needs is missing. The test split decides nothing here."""
  fmt = lambda v: "–" if v is None else f"{v:.2f}"
  complete = lambda values: all(v is not None for v in values)
  mean = lambda values: sum(values) / len(values)
  base = seed_figures(study, by_run, DEFAULT)
  lines = ["## The rules, applied (validation k-NN, k = 20; seeds 0 and 1)", "",
           "| arm | seed 0 | seed 1 | mean | spread | mean - default's | larger spread | "
           "replaces the default |", "|---|---|---|---|---|---|---|---|",
           f"| {DEFAULT} | {fmt(base[0])} | {fmt(base[1])} | "
           f"{fmt(mean(base)) if complete(base) else '–'} | "
           f"{fmt(max(base) - min(base)) if complete(base) else '–'} | | | |"]
  means = {}
  for name in ARMS:
    v = seed_figures(study, by_run, name)
    if not (complete(v) and complete(base)):
      lines.append(f"| {name} | {fmt(v[0])} | {fmt(v[1])} | | | | | undecided |")
      continue
    means[name] = mean(v)
    margin, bar = mean(v) - mean(base), max(max(v) - min(v), max(base) - min(base))
    lines.append(f"| {name} | {fmt(v[0])} | {fmt(v[1])} | {fmt(mean(v))} | "
                 f"{fmt(max(v) - min(v))} | {margin:+.2f} | {fmt(bar)} | "
                 f"{'yes' if margin > bar else 'no'} |")
  lines.append("")
  if len(means) == len(ARMS):
    best = sorted(means, key=lambda n: -means[n])[:2]
    lines.append(f"At 4x (studies/arms_4x.py): {best[0]} and {best[1]}, the two highest means.")
  else:
    lines.append("At 4x: undecided until every arm has both seeds on validation.")
  for arm in (DEFAULT, SUCCESSOR):
    lines.append(features_rule(study, by_run, arm))
  return lines


def features_choice(study, by_run, arm: str):
  """(the features `arm`'s k-NN reads, {features: mean validation k-NN}) by the rule: the highest
  mean over seeds 0 and 1, unless it beats the last [CLS] by no more than FEATURE_TIE; None until
  both runs have all three on validation."""
  figures = {"cls": seed_figures(study, by_run, arm),
             **{f: seed_figures(study, by_run, arm, f"knn_val_{f}") for f in FEATURES}}
  if not all(v is not None for values in figures.values() for v in values):
    return None
  means = {f: sum(v) / len(v) for f, v in figures.items()}
  top = max(means, key=means.get)
  return (top if means[top] - means["cls"] > FEATURE_TIE else "cls"), means


def features_rule(study, by_run, arm: str) -> str:
  """features_choice, as the report's sentence."""
  choice = features_choice(study, by_run, arm)
  if choice is None:
    return (f"The features k-NN reads for {arm}: undecided until its two runs have all three "
            "on validation.")
  pick, means = choice
  why = ("above the last [CLS] by more than" if pick != "cls" else
         "the last [CLS]: nothing above it by more than")
  return (f"The features k-NN reads for {arm}: " +
          ", ".join(f"{f} {m:.2f}" for f, m in means.items()) +
          f" (means); **{pick}** ({why} {FEATURE_TIE} points).")
