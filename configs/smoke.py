r"""A few steps of a tiny model on Fashion-MNIST, for tests and for checking an install.

    python -m sove_jax.main --config=configs/smoke.py --workdir=/tmp/sove_smoke

Expected: 4 steps in well under a minute on a CPU, a checkpoint at steps 2 and 4.
"""
from sove_jax import configuration

default = configuration.sibling("default", of=__file__)


def get_config():
  c = default.get_config()
  c.batch_size = 16
  c.total_steps = 4
  c.data.update(num_local=2, global_size=28, local_size=14, shuffle_buffer=256)
  c.model.update(width=32, depth=2, num_heads=2, patch_size=7, head_hidden=64, head_out=32)
  c.sove.update(class_bank_size=256, patch_bank_size=128, num_anchors=32, num_neighbors=4,
                class_tasks=2, patch_anchors=16, judge_chunk=16)
  c.optim.warmup_epochs = 0.0
  c.knn_every = 0
  c.log_every = 1
  c.checkpoint_every = 2
  c.knn_train_examples = 256
  c.knn_eval_examples = 128
  return c
