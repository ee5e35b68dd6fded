r"""The dose-response of SOVE's [CLS] judges J (the paper's Table 8): J = 1, 3, 5, 9, 17 on
the base recipe, 3 seeds each (15 runs), k-NN top-1 fitted against log2 J.

    python -m sove_jax.study --arms=studies/judges.py --out=studies/results/judges

Table 8 (ImageNet-1k, ViT-S/16, 1 MIM judge): J = 1 / 3 / 5 / 9 give 69.2 / 69.4 / 69.3 / 70.2
k-NN, +1.0 from 1 to 9, most of it from 5 to 9; J = 17 extends the range. Every run is SOVE on
configs/study.py (with its local crops) with `sove.num_neighbors` = J - 1 and 1 MIM judge;
evaluated on the test split (k-NN, train as memory) and by the linear probe at the rate its
validation run chose. The report fits top-1 = a + b log2 J (b: the gain per doubling of J) with
its 95% interval: the paper's Table 8 is about +0.3 per doubling (1.0 over log2 9 = 3.2).
"""
import pathlib

from sove_jax import configuration

_DEFAULT = pathlib.Path(__file__).resolve().parent.parent / "configs" / "study.py"
SPLITS_VAL = ["--train_split=train-minival", "--eval_split=minival"]
PAPER = {1: 69.2, 3: 69.4, 5: 69.3, 9: 70.2}


def get_study(config=None):
  """The study on `config` (a config file's path; None: configs/study.py)."""
  configuration.load(config or str(_DEFAULT))  # a config that does not load stops here
  arms = [dict(name=f"J={j}", group="Table 8 [CLS] judges",
               overrides={"method": "sove", "sove.num_neighbors": j - 1,
                          "sove.patch_neighbors": 0},
               dose=j, paper={} if j not in PAPER else dict(knn=PAPER[j]))
          for j in (1, 3, 5, 9, 17)]
  return dict(
      config=config or "configs/study.py", overrides={"knn_every": 0}, seeds=[0, 1, 2],
      stages=["train", dict(name="knn", kind="knn"),
              dict(name="linear_val", kind="linear", args=SPLITS_VAL, label="Linear val"),
              dict(name="linear", kind="linear", lrs_from="linear_val")],
      dose=dict(name="J", scale="log2", paper="+0.32 per doubling (Table 8, J = 1 to 9)"),
      arms=arms)
