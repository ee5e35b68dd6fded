r"""ViT-B/16 on ImageNet-1k, the paper's recipe, 400 epochs.

    python -m sove_jax.main --config=configs/vitb.py --workdir=gs://BUCKET/sove/vitb

Expected (paper): k-NN top-1 78.4, linear 79.9.
"""
from sove_jax import configuration

default = configuration.sibling("default", of=__file__)
vits = configuration.sibling("vits", of=__file__)


def get_config():
  c = vits.imagenet(default.get_config())
  c.num_epochs = 400
  c.model.variant = "b"
  return c
