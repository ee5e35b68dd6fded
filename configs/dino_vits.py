r"""DINO, ViT-S/16 on ImageNet-1k, 800 epochs with multi-crop: the baseline on our backbone,
views, optimizer and EMA teacher (config.method = "dino").

    python -m sove_jax.main --config=configs/dino_vits.py --workdir=gs://BUCKET/dino/vits \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected (DINO's released ViT-S/16, facebookresearch/dino README): k-NN top-1 74.5, linear
77.0 (ImageNet-1k val). Check memory first with `--compile_only`.

DINO's recipe: 65536 prototypes after a 2048-2048-256 MLP, the prototype norm trained
(`--norm_last_layer false`, safe for ViT-S only), the layer frozen for the first epoch; teacher
temperature 0.04 -> 0.07 over 30 epochs, student 0.1, center momentum 0.9; EMA momentum 0.996
-> 1; AdamW at 5e-4 x batch / 256 (batch 1024) after 10 warm-up epochs, weight decay 0.04 ->
0.4, per-tensor clipping at 3; 2 global crops of 224 px and 10 local crops of 96 px, crop
scales (0.25, 1) and (0.05, 0.25). The student sees its global views whole (no masks).
"""
from sove_jax import configuration

vits = configuration.sibling("vits", of=__file__)


def get_config():
  c = vits.get_config()  # ImageNet, ViT-S/16, batch 1024, 800 epochs, the shared schedules
  c.method = "dino"
  c.data.global_scale, c.data.local_scale = (0.25, 1.0), (0.05, 0.25)
  b = c.baseline
  b.num_prototypes, b.norm_last_layer = 65536, False
  b.student_temp, b.teacher_temp = 0.1, 0.07
  b.teacher_temp_warmup, b.teacher_temp_warmup_epochs = 0.04, 30
  b.center_momentum, b.freeze_last_layer_epochs = 0.9, 1
  b.class_weight = 1.0
  c.optim.update(base_lr=5e-4, min_lr=1e-6, warmup_epochs=10, weight_decay=0.04,
                 weight_decay_end=0.4, clip=3.0, clip_mode="per_tensor", ema_momentum=0.996,
                 ema_momentum_end=1.0)
  return c
