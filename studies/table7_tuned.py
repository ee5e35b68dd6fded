r"""The paper's Table 7 in miniature, every method tuned with the same budget, selected on a
validation split and reported on the test split.

    python -m sove_jax.study --arms=studies/table7_tuned.py --out=studies/results/table7_tuned

The six arms of studies/table7.py (SOVE, its [CLS]-only and MIM-only arms, iBOT, iBOT MIM only,
DINO) on configs/study.py without local crops (the paper's Table 7 has no multi-crop), each
tuned the same way on seed 0:

1. the learning rate over 1/4, 1/2, 1 and 2 x the config's `optim.base_lr`, extended by
   factors of 2 while the best rate is the grid's smallest or largest, so the chosen rate is
   interior (up to 7 rates);
2. at that rate, the method's most sensitive knob, its teacher temperature, at the recipe's value
   and one on either side (SOVE 0.03 / 0.04 / 0.05; DINO and iBOT, whose [CLS] and patch targets
   share it, 0.05 / 0.07 / 0.09, warmed up from 0.04 as their recipes).

Each candidate is scored by k-NN top-1 (k = 20) with the 50,000 images of "train-minival" as
memory and the 10,000 class-balanced images of "minival" as queries: the validation split,
carved from Fashion-MNIST's train split (sove_jax/data/sources.py). The test split is never
read during the search. The chosen setting then trains seeds 1, 2 and 3 (not seed 0, which
chose it), evaluated on the test split: k-NN with the whole train split as memory, and the
linear probe at the rate its own validation run chose (fit on train-minival, scored on minival;
then fit on train, scored on test). Claims still undecided after 3 seeds (Holm-corrected
pooled-variance t-tests, docs/study.md) get seeds 4 and 5 for both of their arms.

iBOT masks as its official recipe does (`--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`): each
global crop is masked with probability 0.5 (`data.mask_prob`), at a ratio uniform in 0.3 +- 0.2.
SOVE keeps the config's masks (every global crop, ratio 0.3). docs/study.md has the cost and
the results.
"""
import pathlib

from sove_jax import configuration

_DEFAULT = pathlib.Path(__file__).resolve().parent.parent / "configs" / "study.py"

SPLITS_VAL = ["--train_split=train-minival", "--eval_split=minival"]

# Each baseline's own temperatures and center (DINO's and iBOT's ViT-S/16 recipes); the teacher
# temperature itself is searched.
DINO = {"method": "dino", "baseline.teacher_temp_warmup": 0.04, "baseline.student_temp": 0.1,
        "baseline.center_momentum": 0.9}
IBOT = {"method": "ibot", "baseline.teacher_temp_warmup": 0.04,
        "baseline.teacher_patch_temp_warmup": 0.04, "baseline.student_temp": 0.1,
        "baseline.center_momentum": 0.9, "data.mask_prob": 0.5, "data.mask_ratio_var": 0.2}

# Table 7's claims, and the one this scale reverses: (better, worse, the paper's k-NN and linear
# differences), as studies/table7.py tests them.
CLAIMS = configuration.sibling("table7", of=__file__).CLAIMS

NOTES = """\
Paper: the paper's Table 7 (ImageNet-1k, ViT-S/16, 300 epochs without multi-crop): its
figures show the direction of each effect, not values to match on Fashion-MNIST. Selected on
the validation split (k-NN train-minival -> minival, seed 0), reported on the test split
(seeds 1-3, and 4-5 for the arms of claims undecided at 3)."""


def get_study(config=None):
  """The study on `config` (a config file's path; None: configs/study.py)."""
  base = configuration.load(config or str(_DEFAULT))
  lr = base.optim.base_lr
  rates = dict(name="lr", fields=["optim.base_lr"], values=[lr / 4, lr / 2, lr, lr * 2],
               factor=2, max_values=7)
  t_sove = base.sove.teacher_temp
  sove_tt = dict(name="tt", fields=["sove.teacher_temp"], default=t_sove,
                 values=[round(t_sove * 0.75, 4), t_sove, round(t_sove * 1.25, 4)])
  t_base = base.baseline.teacher_temp
  temps = [round(t_base * 5 / 7, 4), t_base, round(t_base * 9 / 7, 4)]
  dino_tt = dict(name="tt", fields=["baseline.teacher_temp"], default=t_base, values=temps)
  ibot_tt = dict(name="tt", fields=["baseline.teacher_temp", "baseline.teacher_patch_temp"],
                 default=t_base, values=temps)
  group = "Table 7: parametric vs non-parametric tokenizer (tuned)"
  arms = [
      ("SOVE", {"method": "sove", "sove.class_weight": 1.0, "sove.patch_weight": 1.0}, sove_tt,
       (70.0, 74.3)),
      ("SOVE [CLS] only", {"method": "sove", "sove.class_weight": 1.0, "sove.patch_weight": 0.0},
       sove_tt, (68.6, 72.7)),
      ("SOVE MIM only", {"method": "sove", "sove.class_weight": 0.0, "sove.patch_weight": 1.0},
       sove_tt, (16.8, 30.2)),
      ("iBOT", {**IBOT, "baseline.class_weight": 1.0, "baseline.patch_weight": 1.0}, ibot_tt,
       (69.1, 74.2)),
      ("iBOT MIM only", {**IBOT, "baseline.class_weight": 0.0, "baseline.patch_weight": 1.0},
       ibot_tt, (9.5, 29.8)),
      ("DINO", {**DINO, "baseline.class_weight": 1.0}, dino_tt, (67.9, 72.5)),
  ]
  claims = [dict(better=a, worse=b, metric=m, paper=p)
            for a, b, knn, linear in CLAIMS for m, p in (("knn", knn), ("linear", linear))]
  return dict(
      config=config or "configs/study.py",
      overrides={"data.num_local": 0, "knn_every": 0},
      search_seeds=[0], seeds=[1, 2, 3], more_seeds=[4, 5],
      stages=[
          "train",
          dict(name="knn_val", kind="knn", runs="search", args=SPLITS_VAL,
               label="k-NN val"),
          dict(name="knn", kind="knn", runs="report"),
          dict(name="linear_val", kind="linear", runs="report", args=SPLITS_VAL,
               label="Linear val"),
          dict(name="linear", kind="linear", runs="report", lrs_from="linear_val"),
      ],
      select="knn_val", claims=claims, notes=NOTES,
      arms=[dict(name=name, group=group, overrides=overrides, search=[rates, tt],
                 paper=dict(knn=knn, linear=linear))
            for name, overrides, tt, (knn, linear) in arms],
  )
