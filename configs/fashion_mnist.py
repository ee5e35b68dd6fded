r"""A longer Fashion-MNIST run than the default (for a GPU or a patient CPU): 100 epochs.

    python -m sove_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist

Reports the k-NN monitor every 2000 steps.
"""
from sove_jax import configuration

default = configuration.sibling("default", of=__file__)


def get_config():
  c = default.get_config()
  c.num_epochs = 100
  c.batch_size = 256
  c.model.update(variant="ti", width=0, num_heads=0, depth=6,  # ViT-Ti, 6 blocks
                 head_hidden=2048, head_out=256, dtype="bfloat16")
  c.data.num_local = 8
  c.sove.update(class_bank_size=16384, patch_bank_size=4096, num_anchors=4096, anchor_keep=1.0,
                class_tasks=4, patch_anchors=512)
  c.optim.update(base_lr=1e-3, warmup_epochs=10, ema_momentum=0.996, ema_momentum_end=1.0)
  c.knn_every = 2000
  return c
