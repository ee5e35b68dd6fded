r"""Swin-T/14 on ImageNet-1k, the paper's recipe, 300 epochs.

    python -m sove_jax.main --config=configs/swint.py --workdir=gs://BUCKET/sove/swint \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    python -m sove_jax.evaluate.knn --workdir=gs://BUCKET/sove/swint --lowshot
    python -m sove_jax.evaluate.linear --workdir=gs://BUCKET/sove/swint

Expected (paper, Table 1 and Table A.1): linear 79.3, k-NN top-1 77.0 (ImageNet-1k val); k-NN
with 1% / 10% of the labels 65.3 / 72.3 (iBOT's Swin-T/14: 79.3, 76.2, 64.2 / 71.5).

The backbone is Swin-T (width 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), patch 4) with
14 x 14 windows, 28.3 M parameters: at 224 px its stage grids are 56, 28, 14, 7 with windows 14,
14, 14 (one window, no shift) and 7; 96 px local crops (grids 24, 12, 6, 3) run with those
windows, padded. The [CLS] role is the average of the 7 x 7 final tokens, the patch loss compares
those 49 tokens and the masks are drawn at that 7 x 7 grid (docs/method.md; iBOT trains its Swin
the same way). Everything else is the paper's ImageNet recipe of the ViTs (configs/vits.py): 2 x
224 + 10 x 96 crops, block masks of ratio 0.3, banks 65536 / 8192, K = 8192 anchors with k = 8
neighbors in 4 tasks, K_p = 512, AdamW at 5e-4 per 256 images. The paper gives no Swin-specific
hyperparameter; the drop-path rate 0.1 is iBOT's for its Swin-T/14. Check memory first with
`--compile_only`.
"""
from sove_jax import configuration

default = configuration.sibling("default", of=__file__)
vits = configuration.sibling("vits", of=__file__)


def get_config():
  c = vits.imagenet(default.get_config())
  c.num_epochs = 300
  m = c.model
  m.arch, m.variant, m.window_size, m.patch_size = "swin", "t", 14, 4
  m.drop_path = 0.1
  return c
