r"""ViT-S/16 with the official code's objective settings (docs/method.md §3, §13).

64 anchors per class task, a random half kept: 32 concepts of 9 judges, 4 tasks.

    python -m sove_jax.main --config=configs/sove_official.py --workdir=DIR
"""
from sove_jax import configuration

vits = configuration.sibling("vits", of=__file__)


def get_config():
  c = vits.get_config()
  c.sove.num_anchors = 64
  c.sove.anchor_keep = 0.5
  return c
