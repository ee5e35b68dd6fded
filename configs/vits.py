r"""ViT-S/16 on ImageNet-1k, the paper's recipe (docs/method.md §9, §10), 800 epochs.

    python -m sove_jax.main --config=configs/vits.py --workdir=gs://BUCKET/sove/vits \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected (paper): k-NN top-1 75.2, linear 77.8 (ImageNet-1k val). Check memory first with
`--compile_only`. ImageNet must be prepared once as the TFDS `imagenet2012` dataset.
"""
from sove_jax import configuration

default = configuration.sibling("default", of=__file__)


def imagenet(c):
  """The paper's ImageNet multi-crop, masking, banks, objective and schedules."""
  c.batch_size = 1024
  d = c.data
  d.source, d.name = "tfds", "imagenet2012"
  d.train_split, d.eval_split = "train", "validation"
  d.global_size, d.local_size, d.num_local = 224, 96, 10
  d.global_scale, d.local_scale = (0.14, 1.0), (0.05, 0.4)
  d.color_jitter_prob, d.color_jitter, d.grayscale_prob = 0.8, (0.4, 0.4, 0.2, 0.1), 0.2
  d.blur_prob, d.solarize_prob = (1.0, 0.1, 0.5), (0.0, 0.2, 0.0)
  d.eval_resize, d.eval_crop = 256, 224
  d.mask_type, d.mask_ratio = "block", 0.3
  # Views cut on the accelerator: the host decodes and sends 512 x 512 uint8 canvases (ImageNet's
  # images, mostly <= 500 px a side, whole; larger ones downscaled to fit).
  d.augment, d.canvas_size = "device", 512
  m = c.model
  m.width = m.depth = m.num_heads = 0  # the size is model.variant's
  m.patch_size, m.drop_path, m.head_hidden, m.head_out = 16, 0.1, 2048, 256
  m.dtype = "bfloat16"
  s = c.sove
  s.class_bank_size, s.patch_bank_size = 65536, 8192
  s.num_anchors, s.anchor_keep, s.num_neighbors, s.class_tasks = 8192, 1.0, 8, 4
  s.patch_anchors, s.patch_neighbors, s.patch_tasks = 512, 0, 1
  s.teacher_temp_warmup, s.teacher_temp, s.teacher_temp_warmup_epochs = 0.04, 0.04, 30
  s.koleo_weight = 0.0  # the paper has no KoLeo term (the Fashion-MNIST default's is a choice
                        # of docs/tuning.md for its 10-minute budget)
  o = c.optim
  o.base_lr, o.min_lr, o.warmup_epochs = 5e-4, 1e-6, 10
  o.ema_momentum, o.ema_momentum_end = 0.996, 1.0
  c.log_every, c.checkpoint_every = 100, 2000
  c.knn_every = 0
  return c


def get_config():
  c = imagenet(default.get_config())
  c.num_epochs = 800
  c.model.variant = "s"
  return c
