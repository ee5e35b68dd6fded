r"""The pod rehearsal's run: the paper's recipe shape, shrunk to run as 4 CPU processes here.

    python -m sove_jax.rehearsal            # writes the data, runs every fault, prints the table

What is the paper's (configs/vits.py): ImageNet-shaped JPEGs decoded on the host into uint8
canvases, the views cut on the device (2 global + local crops, flips, colour jitter, gray, blur,
solarization), block masks drawn in the step, FSDP over the mesh's fsdp axis, both SOVE losses
with banks and judges, an EMA teacher, asynchronous checkpoints. What is shrunk: the image sizes
(32 px global and 16 px local crops from 64 px canvases), the network (width 64, depth 2,
patch 8), the banks and the run (a few dozen steps of 32 images).

The rehearsal sets `data.data_dir` to the JPEG set it writes and the workdir to a fake bucket.
"""
from sove_jax import configuration

default = configuration.sibling("default", of=__file__)
vits = configuration.sibling("vits", of=__file__)


def get_config():
  c = vits.imagenet(default.get_config())
  c.batch_size = 32                  # 4 per device on 4 processes x 2 devices
  c.total_steps = 24
  c.seed = 0
  d = c.data
  d.source, d.name, d.data_dir = "folder", "", ""
  d.train_split, d.eval_split = "train", "train"
  d.global_size, d.local_size, d.num_local = 32, 16, 4
  d.augment, d.canvas_size = "device", 64
  d.eval_resize, d.eval_crop = 36, 32
  d.threads = 1
  m = c.model
  m.variant, m.width, m.depth, m.num_heads, m.patch_size = "ti", 64, 2, 2, 8
  m.head_hidden, m.head_out, m.dtype = 128, 64, "float32"
  s = c.sove
  s.class_bank_size, s.patch_bank_size = 512, 256
  s.num_anchors, s.anchor_keep, s.num_neighbors, s.class_tasks = 32, 0.5, 4, 2
  s.patch_anchors, s.judge_chunk = 32, 32
  s.teacher_temp_warmup_epochs = 0.0
  c.optim.warmup_epochs = 0.0
  c.optim.ema_momentum, c.optim.ema_momentum_end = 0.99, 0.999
  # FSDP: 2-way parameter sharding, 4-way data parallelism over the 8 devices.
  c.mesh.fsdp, c.mesh.shard_params = 2, True
  c.mesh.max_replicated = 0.2        # the tiny network's norms and biases are a larger share
  c.log_every, c.checkpoint_every, c.keep_checkpoints = 1, 4, 20
  c.knn_every = 0
  # Faults are found in seconds here, not minutes (sove_jax/hosts.py).
  h = c.hosts
  h.stall_timeout_s, h.slow_timeout_s, h.answer_s = 30.0, 900.0, 5.0
  h.heartbeat_timeout_s, h.shutdown_timeout_s = 100.0, 30.0
  return c
