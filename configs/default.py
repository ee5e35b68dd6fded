r"""Default config: every field, documented once. Variants in this folder override a few.

This default trains a small ViT (width 128, depth 4, patch 7) with SOVE on Fashion-MNIST (the
embedded dataset) in about 10 minutes on 2 CPU cores: 2160 steps of 64 images (2.3 epochs), the
compiled step costing 0.282 GFLOP per image. The recipe was searched for that budget
(docs/tuning.md): mild crops (the dataset's objects are centered and size-normalized), no local
crops (at 14 px they are 4 patches; the steps they cost buy more), no blur or solarization, a
teacher that moves (EMA 0.95 to 0.995), batches of 64, a 4x learning rate, the official code's 4
tasks of 32 kept anchors, and a KoLeo uniformity term of weight 0.8 on the student's [CLS]
embeddings (against a narrow embedding; chosen on the validation split over 0.05-1.6, 2 seeds
each, studies/ten_minutes.py); warm-up and schedules are sized to the steps taken:

    python -m sove_jax.main --config=configs/default.py --workdir=runs/default
    python -m sove_jax.evaluate.knn --workdir=runs/default

Expected (whole Fashion-MNIST test split, teacher [CLS], seeds 0 and 1): k-NN top-1 at
k = 10/20/100/200 of 83.0/82.6/80.9/80.2 (k = 20: 82.85, 82.38); linear probe 83.9 and 84.1
(`python -m sove_jax.evaluate.linear --lrs=0.01,0.03,0.1,0.3,1,3,10`: 100 epochs, the rate
chosen on the validation split); on validation (memory train-minival, queries minival) k-NN
83.06 and 82.06. The same network at random initialization gives 67.5 k-NN and 75.5 linear, the
raw pixels 85.2 and 84.6. Without KoLeo (configs/default_without_koleo.py) the same protocol
gives 79.9 k-NN and 82.9 linear. The KoLeo term's cost is within the noise of a step's CPU time
(docs/tuning.md); without it the default trained in 8 min 16 s of wall time on 2 quiet CPU cores,
start-up, compilation and the k-NN monitor included, under tcmalloc (the trainer's allocator
where it is installed, sove_jax/allocator.py). docs/tuning.md has the figures and how they were
found.

Fields are grouped: the method, data (input pipeline and views), model (backbone + head), sove
(the objective), baseline (DINO's and iBOT's objective), optim (optimizer and schedules), mesh
(devices), and run control (logging, checkpoints, eval).

The same entry point trains the baselines at this budget, with every shared setting the same:

    python -m sove_jax.main --config=configs/default.py --config.method=dino --workdir=runs/dino
    python -m sove_jax.main --config=configs/default.py --config.method=ibot --workdir=runs/ibot
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64           # global batch (all hosts); divisible by the device count (64:
                              # twice the updates of 128 on the same images, docs/tuning.md)
  c.num_epochs = 2.305        # training length in epochs of the train split (2160 steps)...
  c.total_steps = -1          # ...or, when > 0, in steps (overrides num_epochs)
  c.run_steps = -1            # steps this process takes before saving and exiting (-1: to the end)
  # The objective: "sove" (the `sove` block), or a baseline on the same backbone, views, masks,
  # optimizer, EMA teacher and schedules, with its own head and loss (the `baseline` block):
  # "dino" (Caron et al., 2021: [CLS] loss over prototypes, student's global views unmasked) or
  # "ibot" (Zhou et al., 2022: DINO's [CLS] loss + the masked-patch loss, one shared head).
  c.method = "sove"

  # --- data: input pipeline (sove_jax/data) and the multi-crop recipe -------------------------
  c.data = d = ml_collections.ConfigDict()
  d.source = "fashion_mnist"  # "fashion_mnist" | "tfds" | "folder"
  # Where the views are made. "host": the tf.data pipeline crops, colors and normalizes, and
  # float32 views cross to the device. "device": inside the jitted step (sove_jax/views.py, the
  # same recipe); the host only decodes each image and fits it into a uint8 canvas of
  # canvas_size, and an in-memory source (Fashion-MNIST) lives whole in device memory, the host
  # sending indices; the step draws the masks too. This config keeps "host", by
  # measurement (`python benchmarks/augment_modes.py --rounds 3 --steps 20`, both modes'
  # training loops alternating on the quiet 2-core CPU, where the same cores make the views
  # either way): a tie, 253 vs 252 ms per step (best rounds), 484 vs 474 CPU ms per step
  # (medians, "device" 2% less); again a tie with the masks drawn in the step (a busier
  # machine: 294 vs 288 ms best, 578 vs 595 CPU ms median); the figures in this docstring were
  # measured with "host". The ImageNet configs use "device".
  d.augment = "host"
  d.canvas_size = 0           # device mode, decoded sources: side of the square uint8 canvas
                              # each image is fitted into (downscaled, aspect kept, if larger;
                              # paper: 512, which holds ImageNet's 500 px images whole); 0 for
                              # in-memory sources (their images are their canvases)
  d.name = ""                 # TFDS name for source="tfds", e.g. "imagenet2012"
  d.data_dir = ""             # IDX dir (fashion_mnist; "" = /usr/share/datasets/fashion-mnist),
                              # TFDS data_dir, or the image-folder root (folder/<split>/<class>/*)
  d.train_split = "train"     # any split of the source, or one carved from its "train" split:
  d.eval_split = "test"       # "minival" / "train-minival" (docs/input.md)
  d.minival_examples = 10_000  # examples in "minival" (Fashion-MNIST: 1,000 of each class)...
  d.minival_seed = 0          # ...chosen by this seed; "train-minival" is the rest (50,000)
  d.num_local = 0             # local crops per image (paper: 10; here none: at 14 px they are 4
                              # patches, and the steps they cost buy more, docs/tuning.md m8)
  d.global_size = 28          # global crop side, px (paper: 224)
  d.local_size = 14           # local crop side, px (paper: 96)
  d.global_scale = (0.8, 1.0)   # paper: (0.14, 1.0); Fashion-MNIST's objects fill a centered
  d.local_scale = (0.3, 0.8)    # frame: mild crops (docs/tuning.md); paper (0.05, 0.4)
  d.aspect_ratio = (3.0 / 4.0, 4.0 / 3.0)
  d.flip = True
  d.translate = 0             # shift each view by up to this many px after its crop (uniform
                              # integers per axis, black border; host augmentation only)
  d.color_jitter_prob = 0.8
  d.color_jitter = (0.4, 0.4, 0.2, 0.1)   # brightness, contrast, saturation, hue
  d.grayscale_prob = 0.2
  d.blur_prob = (0.0, 0.0, 0.0)           # global 1, global 2, locals (paper 1, 0.1, 0.5)
  d.blur_sigma = (0.1, 2.0)
  d.solarize_prob = (0.0, 0.0, 0.0)       # global 1, global 2, locals (paper 0, 0.2, 0)
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
  d.mask_prob = 1.0           # chance a global crop is masked at all (iBOT's official 0.5)
  d.mask_start_epoch = 0      # no crop masked before this epoch (iBOT's pred_start_epoch)
  d.image_key = "image"       # TFDS feature holding the image
  d.label_key = "label"       # TFDS feature holding the label ("" = none; labels become -1)
  d.shuffle_buffer = 10_000   # tfds records in the shuffle buffer (folders/arrays: whole epochs)
  d.prefetch = 2              # host batches prepared ahead
  d.threads = 0               # tf.data worker threads per host (0 = one per core)

  # --- model: student/teacher backbone and projection head (sove_jax/models) -----------------
  c.model = m = ml_collections.ConfigDict()
  m.arch = "vit"              # backbone: "vit" | "swin" (Swin: variant "t" | "s" | "b"; width,
                              # num_heads: stage 1's; depth: blocks of the first stages kept;
                              # [CLS] role: mean of the final tokens; see configs/swint.py)
  m.window_size = 7           # Swin only: attention window side (reference 7; paper's Swin-T: 14)
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
  m.head_hidden = 256         # paper: 2048 (DINO, iBOT: their head's hidden width too)
  m.head_out = 128            # d, the embedding size (paper: 256); DINO, iBOT: the bottleneck
                              # before the prototype layer (theirs: 256)
  # The global representation the [CLS] loss, SOVE's class bank and the k-NN evaluation use:
  # "cls" (the [CLS] token) | "mean_patch" (the mean of the patch tokens; paper Table B.2). The
  # k-NN monitor and `evaluate.knn` take the same from the teacher backbone (after its final
  # LayerNorm); the linear probe's default for "mean_patch" is "cls_meanpatch".
  m.global_pool = "cls"

  # --- sove: the objective (sove_jax/objective/, docs/method.md §2-§7) ------------------------
  c.sove = s = ml_collections.ConfigDict()
  s.class_bank_size = 4096    # M_c (paper 65536)
  s.patch_bank_size = 2048    # M_p (paper 8192)
  s.num_anchors = 64          # K per class task (paper 8192; official 64)
  s.anchor_keep = 0.5         # fraction of anchors kept per task (official 0.5)
  s.num_neighbors = 8         # k; J = k + 1 judges per concept
  s.class_tasks = 4           # T_c (paper 4)
  s.patch_anchors = 128       # K_p (paper 512)
  s.patch_neighbors = 0       # J_p - 1 (paper 0: the anchor alone)
  s.patch_tasks = 1           # T_p
  s.smoothing = 0.1
  s.labels = "soft"           # "soft" | "onehot"
  s.student_temp = 0.1
  s.teacher_temp = 0.04
  s.teacher_temp_warmup = 0.04  # start value, ramped linearly to teacher_temp...
  s.teacher_temp_warmup_epochs = 0.0  # ...over these epochs (paper 30)
  s.class_weight = 1.0        # lambda_1 ([CLS] loss); 0: MIM only, nothing of it is computed
  s.patch_weight = 1.0        # lambda_2 (MIM loss); 0: [CLS] only, no patch head or patch bank
  s.judge_chunk = 1024        # anchors per chunk of the anchor-by-bank similarity
  s.koleo_weight = 0.8        # KoLeo uniformity term on the student's global-view embeddings
                              # (objective.koleo_loss_per_example; the authors' code:
                              # koleo_loss_weight, default 0; the paper: none); 0: off, nothing
                              # computed; 0.8: the best of 0.05-1.6 here (docs/tuning.md)

  # --- baseline: DINO's and iBOT's objective (config.method "dino" | "ibot"; sove_jax/prototypes.py)
  # Their papers' values in brackets (DINO / iBOT ViT-S/16); here scaled to this run's length.
  c.baseline = bl = ml_collections.ConfigDict()
  bl.num_prototypes = 4096    # K, the prototype layer's size [65536 / 8192]
  bl.norm_last_layer = True   # prototypes of unit norm (DINO's default); False: a trained
                              # per-prototype norm (both papers' ViT-S/16 recipes)
  bl.student_temp = 0.1
  bl.teacher_temp = 0.07      # [CLS] targets, after a linear warm-up [0.04 -> 0.07 / 0.07]
  bl.teacher_temp_warmup = 0.04  # ...from this value...
  bl.teacher_temp_warmup_epochs = 0.5  # ...over these epochs [30], for patches too (as iBOT)
  bl.teacher_patch_temp = 0.07  # iBOT's patch targets [0.07]...
  bl.teacher_patch_temp_warmup = 0.04  # ...warmed up from this value [0.04]
  bl.center_momentum = 0.9    # EMA of the teacher's mean logits, each center [0.9]
  bl.freeze_last_layer_epochs = 0.1  # the prototype layer held still (no update, no decay) [1]
  bl.class_weight = 1.0       # lambda_1, the [CLS] loss; 0: iBOT MIM only (DINO needs it)
  bl.patch_weight = 1.0       # lambda_2, iBOT's masked-patch loss; 0: [CLS] only (DINO has none)

  # --- optim (sove_jax/optim.py) --------------------------------------------------------------
  c.optim = o = ml_collections.ConfigDict()
  o.base_lr = 4e-3            # per 256 images: lr = base_lr * batch_size / 256 (paper 5e-4)
  o.min_lr = 1e-6
  o.warmup_epochs = 0.3       # paper 10
  o.weight_decay = 0.04       # on weights only: no bias, no 1-D tensor (norm scales), as DINO
  o.weight_decay_end = 0.4
  o.b1 = 0.9
  o.b2 = 0.999
  o.clip = 3.0                # 0 disables
  o.clip_mode = "per_tensor"  # "per_tensor" (official, DINO; each layer its own) | "global"
  o.ema_momentum = 0.95       # teacher EMA, cosine to ema_momentum_end (paper 0.996 to 1; a
  o.ema_momentum_end = 0.995  # 749-step run needs a teacher that moves: docs/tuning.md)

  # --- mesh (sove_jax/sharding.py) -------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1            # -1: all devices not used by fsdp
  c.mesh.fsdp = 1             # parameter/optimizer sharding axis
  c.mesh.shard_params = False  # FSDP-shard parameters by their logical axes, by these rules:
  # (logical axis, mesh axis) pairs; one matrix dimension per parameter is enough to divide its
  # memory by the fsdp size, and the model width ("embed") is in every block matrix; DINO's and
  # iBOT's prototype layer is split along its prototypes (a rule for an axis the run's network
  # lacks is idle).
  c.mesh.rules = (("embed", "fsdp"), ("proj_hidden", "fsdp"), ("prototypes", "fsdp"))
  c.mesh.max_replicated = 0.02  # FSDP: largest share of parameter bytes left whole (else error)

  # --- run control ------------------------------------------------------------------------------
  c.log_every = 20            # steps between metric lines / TensorBoard points (window means)
  c.profile = False           # trace 5 steps (after the first) with jax.profiler into the workdir
  c.checkpoint_every = 500    # steps between asynchronous checkpoints (and at the end)
  c.keep_checkpoints = 3
  c.keep_period = 0           # > 0: checkpoints whose step is a multiple are kept for good
                              # (a multiple of checkpoint_every; 0: only the last few are kept)
  c.prefetch_to_device = 2    # batches put on the devices ahead, on a thread, while the step
                              # runs (sove_jax/feed.py); 0: between steps, on the main thread
  c.knn_every = 500           # steps between k-NN monitor evaluations (0: never)
  c.knn_k = (10, 20, 100, 200)
  c.knn_temperature = 0.07
  c.knn_train_split = "train-minival"  # monitor: its memory and its queries, the validation
  c.knn_eval_split = "minival"         # split (data.minival_*), never the test split
  c.knn_train_examples = 10_000  # monitor: train-set memory size (-1: the whole split)
  c.knn_eval_examples = 2_000    # monitor: evaluated examples (-1: the whole split)

  # --- hosts: how long one process of a multi-process run waits for the others (sove_jax/hosts.py)
  # None of these changes a result; a restart may change them freely.
  c.hosts = h = ml_collections.ConfigDict()
  h.stall_timeout_s = 90.0    # no step done for this long: the watchdog asks every process where
                              # it is, names those that do not answer, and exits (code 1)
  h.slow_timeout_s = 1800.0   # the same for start-up (compilation, restore), saves, k-NN monitor
  h.answer_s = 15.0           # how long a stuck process waits for the others' answers
  h.heartbeat_timeout_s = 300.0  # JAX's heartbeat: a process silent this long ends the job
                              # (jax.distributed.initialize); sent every half of it, so at least
                              # twice stall_timeout_s + answer_s + 10 s
  h.shutdown_timeout_s = 60.0  # how long a process that ends waits for the others to end too
  return c
