r"""Default config: every field, documented once. Variants in this folder override a few.

This default trains a small ViT (width 128, depth 4, patch 7) with SOVE on Fashion-MNIST (the
embedded dataset) in about 10 minutes on 2 CPU cores: 749 steps of 128 images (1.6 epochs), and
the warm-up, EMA momentum and teacher-temperature schedules are sized to those steps:

    python -m sove_jax.main --config=configs/default.py --workdir=runs/default
    python -m sove_jax.evaluate.knn --workdir=runs/default

Expected (measured on 2 CPU cores, 10.7 min with the k-NN monitor): teacher [CLS] k-NN top-1 at
k = 20 of 73.4% on the whole Fashion-MNIST test split; on the monitor's subsets 68.2%, against
63.6% for the random initialization and 82.8% for raw pixels (README, "Does it learn?").

Fields are grouped: data (input pipeline and views), model (backbone + head), sove (the
objective), optim (optimizer and schedules), mesh (devices), and run control (logging,
checkpoints, eval).
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128          # global batch (all hosts); divisible by the device count
  c.num_epochs = 1.6          # training length in epochs of the train split...
  c.total_steps = -1          # ...or, when > 0, in steps (overrides num_epochs)
  c.run_steps = -1            # steps this process takes before saving and exiting (-1: to the end)

  # --- data: input pipeline (sove_jax/data) and the multi-crop recipe -------------------------
  c.data = d = ml_collections.ConfigDict()
  d.source = "fashion_mnist"  # "fashion_mnist" | "tfds" | "folder"
  # Where the views are made. "host": the tf.data pipeline crops, colors and normalizes, and
  # float32 views cross to the device. "device": inside the jitted step (sove_jax/views.py, the
  # same recipe); the host only decodes each image and fits it into a uint8 canvas of
  # canvas_size, and an in-memory source (Fashion-MNIST) lives whole in device memory, the host
  # sending indices. Either way the masks are made on the host. This config keeps "host", by
  # measurement (benchmarks/augment_modes.py, both modes' training loops alternating on this
  # 2-core CPU, where the same cores make the views either way): "device" cost 5% more CPU per
  # step (1742 vs 1653 ms, median of 3 rounds); the wall clock, swamped by other load, could
  # not separate them (best rounds 11.3 vs 12.0 s). The ImageNet configs use "device".
  d.augment = "host"
  d.canvas_size = 0           # device mode, decoded sources: side of the square uint8 canvas
                              # each image is fitted into (downscaled, aspect kept, if larger;
                              # paper: 512, which holds ImageNet's 500 px images whole); 0 for
                              # in-memory sources (their images are their canvases)
  d.name = ""                 # TFDS name for source="tfds", e.g. "imagenet2012"
  d.data_dir = ""             # IDX dir (fashion_mnist; "" = /usr/share/datasets/fashion-mnist),
                              # TFDS data_dir, or the image-folder root (folder/<split>/<class>/*)
  d.train_split = "train"
  d.eval_split = "test"
  d.num_local = 4             # local crops per image (paper: 10)
  d.global_size = 28          # global crop side, px (paper: 224)
  d.local_size = 14           # local crop side, px (paper: 96)
  d.global_scale = (0.25, 1.0)  # paper: (0.14, 1.0)
  d.local_scale = (0.05, 0.4)
  d.aspect_ratio = (3.0 / 4.0, 4.0 / 3.0)
  d.flip = True
  d.color_jitter_prob = 0.8
  d.color_jitter = (0.4, 0.4, 0.2, 0.1)   # brightness, contrast, saturation, hue
  d.grayscale_prob = 0.2
  d.blur_prob = (1.0, 0.1, 0.5)           # global 1, global 2, locals
  d.blur_sigma = (0.1, 2.0)
  d.solarize_prob = (0.0, 0.2, 0.0)       # global 1, global 2, locals
  d.mean = (0.485, 0.456, 0.406)
  d.std = (0.229, 0.224, 0.225)
  d.eval_resize = 28          # eval: resize shorter side (paper-size images: 256)...
  d.eval_crop = 28            # ...then center crop (224)
  # Masks of the 2 global crops (sove_jax/data/masking.py), one per crop:
  #   "block": the authors' (iBOT's loader, after BEiT): blocks of >= (min(h, w) // 3) ** 2
  #     patches until ratio * h * w is reached or 10 tries in a row fail; may end short of it
  #     (on this 4 x 4 grid: 4 of the 4.8 patches, in blocks of >= 1 patch);
  #   "block_exact": BEiT blocks of >= 4 patches, topped up to exactly round(ratio * h * w);
  #   "random": exactly round(ratio * h * w) uniformly drawn patches (use ratio 0.7).
  d.mask_type = "block"
  d.mask_ratio = 0.3          # paper: 0.3 block; random option: 0.7
  d.mask_ratio_var = 0.0      # ratio drawn uniformly in ratio +- var per image
  d.mask_min_patches = 0      # smallest block, in patches (0: the type's own, see above)
  d.image_key = "image"       # TFDS feature holding the image
  d.label_key = "label"       # TFDS feature holding the label ("" = none; labels become -1)
  d.shuffle_buffer = 10_000   # tfds records in the shuffle buffer (folders/arrays: whole epochs)
  d.prefetch = 2              # host batches prepared ahead
  d.threads = 0               # tf.data worker threads per host (0 = one per core)

  # --- model: student/teacher backbone and projection head (sove_jax/models) -----------------
  c.model = m = ml_collections.ConfigDict()
  m.variant = "ti"            # ViT size (width/depth/heads): "ti" 192/12/3, "s" 384/12/6,
                              # "b" 768/12/12, "l" 1024/24/16
  m.width = 128               # > 0 replaces the variant's width, 0 keeps it; here a small ViT
  m.depth = 4                 # for CPUs (as width); the ImageNet configs set all three to 0
  m.num_heads = 4             # (as width)
  m.patch_size = 7
  m.drop_path = 0.1           # student only
  m.dtype = "float32"         # compute dtype (paper configs: "bfloat16"); parameters are float32
  m.remat = False             # rematerialize each block (memory for compute; ViT-L)
  m.scan_layers = False       # scan over blocks (compile time; ViT-L)
  m.attention = "xla"         # "xla" | "cudnn" (GPU flash attention; head dim % 8, 16-bit dtype)
  m.pos_interpolation = "size"  # resizing pos_embed for local crops: "size" (to the grid) |
                              # "dino" (scale_factor (grid + 0.1) / n, as DINO, iBOT, the authors)
  m.head_hidden = 256         # paper: 2048
  m.head_out = 128            # d, the embedding size (paper: 256)

  # --- sove: the objective (sove_jax/objective.py, docs/method.md §2-§7) ------------------------
  c.sove = s = ml_collections.ConfigDict()
  s.class_bank_size = 4096    # M_c (paper 65536)
  s.patch_bank_size = 2048    # M_p (paper 8192)
  s.num_anchors = 512         # K per class task (paper 8192; official 64)
  s.anchor_keep = 1.0         # fraction of anchors kept per task (official 0.5)
  s.num_neighbors = 8         # k; J = k + 1 judges per concept
  s.class_tasks = 2           # T_c (paper 4)
  s.patch_anchors = 128       # K_p (paper 512)
  s.patch_neighbors = 0       # J_p - 1 (paper 0: the anchor alone)
  s.patch_tasks = 1           # T_p
  s.smoothing = 0.1
  s.labels = "soft"           # "soft" | "onehot"
  s.student_temp = 0.1
  s.teacher_temp = 0.04
  s.teacher_temp_warmup = 0.04  # start value, ramped linearly to teacher_temp...
  s.teacher_temp_warmup_epochs = 0.0  # ...over these epochs (paper 30)
  s.class_weight = 1.0        # lambda_1
  s.patch_weight = 1.0        # lambda_2
  s.judge_chunk = 1024        # anchors per chunk of the anchor-by-bank similarity

  # --- optim (sove_jax/optim.py) --------------------------------------------------------------
  c.optim = o = ml_collections.ConfigDict()
  o.base_lr = 1e-3            # per 256 images: lr = base_lr * batch_size / 256 (paper 5e-4)
  o.min_lr = 1e-6
  o.warmup_epochs = 0.3       # paper 10
  o.weight_decay = 0.04       # on weights only: no bias, no 1-D tensor (norm scales), as DINO
  o.weight_decay_end = 0.4
  o.b1 = 0.9
  o.b2 = 0.999
  o.clip = 3.0                # 0 disables
  o.clip_mode = "per_tensor"  # "per_tensor" (official, DINO; each layer its own) | "global"
  o.ema_momentum = 0.99       # teacher EMA, cosine to ema_momentum_end (paper 0.996)
  o.ema_momentum_end = 1.0

  # --- mesh (sove_jax/sharding.py) -------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1            # -1: all devices not used by fsdp
  c.mesh.fsdp = 1             # parameter/optimizer sharding axis
  c.mesh.shard_params = False  # FSDP-shard parameters by their logical axes, by these rules:
  # (logical axis, mesh axis) pairs; one matrix dimension per parameter is enough to divide its
  # memory by the fsdp size, and the model width ("embed") is in every block matrix.
  c.mesh.rules = (("embed", "fsdp"), ("proj_hidden", "fsdp"))
  c.mesh.max_replicated = 0.02  # FSDP: largest share of parameter bytes left whole (else error)

  # --- run control ------------------------------------------------------------------------------
  c.log_every = 20            # steps between metric lines / TensorBoard points (window means)
  c.profile = False           # trace 5 steps (after the first) with jax.profiler into the workdir
  c.checkpoint_every = 500    # steps between asynchronous checkpoints (and at the end)
  c.keep_checkpoints = 3
  c.knn_every = 250           # steps between k-NN monitor evaluations (0: never)
  c.knn_k = (10, 20, 100, 200)
  c.knn_temperature = 0.07
  c.knn_train_examples = 10_000  # monitor: train-set memory size (-1: the whole split)
  c.knn_eval_examples = 2_000    # monitor: evaluated examples (-1: the whole split)
  return c
