r"""The paper's ablations of SOVE as one two-level fractional factorial: six factors, 16 design
points, 3 replicates (48 runs), each main effect with its 95% interval and test.

    python -m sove_jax.study --arms=studies/factorial.py --out=studies/results/factorial

The factors, each at two levels (low -> high), the paper's effect (ImageNet-1k, ViT-S/16,
k-NN top-1) beside:

- A, J: [CLS] judges per concept, 1 -> 9 (`sove.num_neighbors` 0 -> 8; 1 MIM judge), Table 8:
  +1.0;
- B, labels: each judge's contribution one-hot -> soft, Table 9: +0.4;
- C, T: [CLS] tasks 1 -> 4 (1 MIM task), Table B.1: +0.4;
- D, pool: the global representation, mean patch token -> [CLS], Table B.2: +1.4;
- E, K: [CLS] anchors 1/32 -> 1/8 of the class bank (128 -> 512 of 4096, the paper's 2048 ->
  8192 of 65536), Table B.3: +1.3;
- F, mask: random patches at ratio 0.7 -> the authors' blocks at 0.3, Figure B.1 (no figure in
  its text).

The design is the 2^(6-2) fraction with generators E = ABC and F = BCD (defining relation
I = ABCE = BCDF = ADEF): resolution IV, so no main effect is aliased with another main effect
or with a two-factor interaction, only with three-factor ones. Replicated 3 times (seeds 0, 1,
2): with the per-run sd of the earlier ablations (0.48 k-NN points), a main effect's standard
error is 2 x 0.48 / sqrt(48) = 0.14, and a 0.5-point effect is detected with 94% power
(two-sided t-test at 0.05, 32 degrees of freedom of pure error); 2 replicates (32 runs) give
79%, short of 80% (`stats.replicates_for`). Every run is SOVE on configs/study.py (with its
local crops) at the config's learning rate; values the config does not set are its own (J, T,
K relative to its bank). Evaluated on the test split (k-NN, train as memory) and by the linear
probe at the rate its validation run chose.
"""
import pathlib

from sove_jax import configuration
from sove_jax.study import stats

_DEFAULT = pathlib.Path(__file__).resolve().parent.parent / "configs" / "study.py"
GENERATORS = ("E=ABC", "F=BCD")
SPLITS_VAL = ["--train_split=train-minival", "--eval_split=minival"]
STAGES = [
    "train",
    dict(name="knn", kind="knn"),
    dict(name="linear_val", kind="linear", args=SPLITS_VAL, label="Linear val"),
    dict(name="linear", kind="linear", lrs_from="linear_val"),
]


def factors(base):
  """(name, letter, low label, high label, the fields at low, at high, the paper's effect)."""
  bank = base.sove.class_bank_size
  return [
      ("J", "A", "J=1", "J=9", {"sove.num_neighbors": 0}, {"sove.num_neighbors": 8}, 1.0),
      ("labels", "B", "one-hot", "soft", {"sove.labels": "onehot"}, {"sove.labels": "soft"},
       0.4),
      ("T", "C", "T=1", "T=4", {"sove.class_tasks": 1}, {"sove.class_tasks": 4}, 0.4),
      ("pool", "D", "mean patch", "[CLS]", {"model.global_pool": "mean_patch"},
       {"model.global_pool": "cls"}, 1.4),
      ("K", "E", f"K={bank // 32}", f"K={bank // 8}", {"sove.num_anchors": bank // 32},
       {"sove.num_anchors": bank // 8}, 1.3),
      ("mask", "F", "random 0.7", "block 0.3",
       {"data.mask_type": "random", "data.mask_ratio": 0.7},
       {"data.mask_type": "block", "data.mask_ratio": 0.3}, None),
  ]


def get_study(config=None):
  """The study on `config` (a config file's path; None: configs/study.py)."""
  base = configuration.load(config or str(_DEFAULT))
  fs = factors(base)
  letters = "".join(f[1] for f in fs)
  arms = []
  for point in stats.design(letters, GENERATORS):
    overrides, levels, name = {"method": "sove", "sove.patch_neighbors": 0,
                               "sove.patch_tasks": 1}, {}, []
    for fname, letter, low, high, at_low, at_high, _ in fs:
      up = point[letter] > 0
      overrides.update(at_high if up else at_low)
      levels[fname] = point[letter]
      name.append(high if up else low)
    arms.append(dict(name=", ".join(name), group="Design points", overrides=overrides,
                     levels=levels))
  return dict(
      config=config or "configs/study.py", overrides={"knn_every": 0}, seeds=[0, 1, 2],
      stages=STAGES,
      factors=[dict(name=f[0], low=f[2], high=f[3], paper=f[6]) for f in fs],
      generators=list(GENERATORS),
      notes=f"A 2^(6-2) design (generators {', '.join(GENERATORS)}; factors "
            + ", ".join(f"{f[1]} = {f[0]}" for f in fs) + ") in 3 replicates (seeds 0, 1, 2).",
      arms=arms)
