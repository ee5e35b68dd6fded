r"""ViT-L/16 on ImageNet-1k, the paper's recipe, 250 epochs: FSDP and rematerialization.

    python -m sove_jax.main --config=configs/vitl.py --compile_only   # per-device memory first
    python -m sove_jax.main --config=configs/vitl.py --workdir=gs://BUCKET/sove/vitl

Expected (paper): k-NN top-1 79.2, linear 81.2. Parameters and optimizer state are split over
the `fsdp` mesh axis (8 devices by default); blocks are rematerialized and scanned.
"""
from sove_jax import configuration

default = configuration.sibling("default", of=__file__)
vits = configuration.sibling("vits", of=__file__)


def get_config():
  c = vits.imagenet(default.get_config())
  c.num_epochs = 250
  c.model.update(variant="l", remat=True, scan_layers=True)
  c.mesh.fsdp = 8
  c.mesh.shard_params = True
  return c
