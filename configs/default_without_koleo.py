r"""The default as it was before the KoLeo term joined it: no KoLeo, k-NN on the last [CLS].

    python -m sove_jax.main --config=configs/default_without_koleo.py --workdir=runs/plain

The base of the studies that measured what limits the 10-minute run and how the recipe scales
(studies/ten_minutes.py, scaling.py, arms_4x.py, reference.py) and of the paper's comparisons
(configs/study.py): their runs began from this recipe and must keep training it after the
default moved on. Expected (whole test split, seeds 0 and 1): k-NN top-1 (k = 20) 79.76 and
80.05, linear probe 82.71 and 83.11 (docs/tuning.md, "default" of studies/ten_minutes.py).
"""
from sove_jax import configuration

default = configuration.sibling("default", of=__file__)


def get_config():
  c = default.get_config()
  c.sove.koleo_weight = 0.0
  return c
