r"""iBOT, ViT-S/16 on ImageNet-1k, 800 epochs: the baseline on our backbone, views, masks,
optimizer and EMA teacher (config.method = "ibot").

    python -m sove_jax.main --config=configs/ibot_vits.py --workdir=gs://BUCKET/ibot/vits \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected (iBOT's released ViT-S/16, bytedance/ibot README): k-NN top-1 75.2, linear 77.9
(ImageNet-1k val). Check memory first with `--compile_only`.

iBOT's recipe (its README's ViT-S/16 command): one head shared by the [CLS] and the patch
tokens, 8192 prototypes after a 2048-2048-256 MLP, the prototype norm trained
(`--norm_last_layer false`), the layer frozen for the first epoch; teacher temperatures 0.07 for
[CLS] and patches, each warmed up from 0.04 over 30 epochs, student 0.1, both centers at
momentum 0.9; loss weights 1 and 1; EMA momentum 0.996 -> 1; AdamW at 5e-4 x batch / 256 (batch
1024) after 10 warm-up epochs, weight decay 0.04 -> 0.4, clipping at 3; 2 global crops of
224 px and 10 local crops of 96 px, scales (0.25, 1) and (0.05, 0.25); block masks, each
global crop's ratio 0 or uniform in 0.3 +- 0.2 with equal chance (`--pred_ratio 0 0.3
--pred_ratio_var 0 0.2`): `data.mask_prob = 0.5`, ratio 0.3, var 0.2. iBOT's Swin-T/14 recipe
starts masking at epoch 50 (`--pred_start_epoch 50`): `data.mask_start_epoch = 50`.
"""
from sove_jax import configuration

vits = configuration.sibling("vits", of=__file__)


def get_config():
  c = vits.get_config()  # ImageNet, ViT-S/16, batch 1024, 800 epochs, the shared schedules
  c.method = "ibot"
  c.data.global_scale, c.data.local_scale = (0.25, 1.0), (0.05, 0.25)
  c.data.mask_type, c.data.mask_ratio, c.data.mask_ratio_var = "block", 0.3, 0.2
  c.data.mask_prob = 0.5  # half the global crops unmasked, as --pred_ratio 0 0.3
  b = c.baseline
  b.num_prototypes, b.norm_last_layer = 8192, False
  b.student_temp, b.teacher_temp, b.teacher_patch_temp = 0.1, 0.07, 0.07
  b.teacher_temp_warmup, b.teacher_patch_temp_warmup = 0.04, 0.04
  b.teacher_temp_warmup_epochs = 30
  b.center_momentum, b.freeze_last_layer_epochs = 0.9, 1
  b.class_weight, b.patch_weight = 1.0, 1.0
  c.optim.update(base_lr=5e-4, min_lr=1e-6, warmup_epochs=10, weight_decay=0.04,
                 weight_decay_end=0.4, clip=3.0, clip_mode="per_tensor", ema_momentum=0.996,
                 ema_momentum_end=1.0)
  return c
