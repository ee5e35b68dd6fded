r"""End-to-end fine-tuning (`python -m sove_jax.evaluate.finetune`): the recipe, one field each.

Two recipes, as the paper's numbers were made (`sove_jax/evaluate/finetune.py`, RECIPES):
- "full": BEiT's fine-tuning as iBOT runs it on all of ImageNet (Table 1's fine-tuning column):
  per size (ViT-S and smaller / B / L) 200 / 100 / 50 epochs, layer decay 0.75 / 0.65 / 0.75,
  drop-path 0.1 / 0.2 / 0.4, warm-up 20 / 20 / 5 epochs; lr 1e-3 per 256 images with a per-step
  cosine to 1e-6; a linear head started at 0.001 of its usual scale.
- "semi": iBOT's `semi_supervised/eval_cls.py` with the arguments of its README for the 1% and
  10% splits (Table 1's low-label columns): 1000 epochs, lr 5e-6 per 512 images, warm-up 5
  epochs from 1e-6, timm's per-epoch cosine to 1e-5, no layer decay, drop-path 0.1, and the
  classifier started from the projection head's first layer (+ GELU + a new linear layer).
"auto" (the default) takes "semi" for a label subset (`--label_split`, `--label_fraction`) and
"full" otherwise; `--config=configs/finetune.py:semi` (or `:full`) forces one.

Fields left at 0, -1 or "" take the recipe's value; any field can be set on the command line:

    python -m sove_jax.evaluate.finetune --workdir=runs/vits --label_split=1percent.txt \
        --config.epochs=100 --config.base_lr=1e-5
"""
import ml_collections


def get_config(recipe: str = "auto"):
  c = ml_collections.ConfigDict()
  c.recipe = recipe          # "auto" | "full" | "semi"
  # --- the recipe's, unless set (0, -1 or "": the recipe's value for the model size) -------------
  c.epochs = 0               # epochs of the labeled examples
  c.warmup_epochs = -1.0     # linear warm-up
  c.base_lr = 0.0            # peak learning rate per `lr_batch` images
  c.lr_batch = 0             # the batch base_lr is given for (lr = base_lr * batch / lr_batch)
  c.min_lr = -1.0            # learning rate at the end of the cosine
  c.warmup_lr = -1.0         # learning rate the warm-up starts from
  c.schedule = ""            # "step": updated every step (BEiT) | "epoch": once an epoch (timm)
  c.layer_decay = 0.0        # layer-wise learning-rate decay (1: none)
  c.drop_path = -1.0         # drop-path rate of the last block
  c.head = ""                # "linear" | "projection" (the projection head's first layer first)
  c.init_scale = 0.0         # the last layer's initial std, in units of 0.02
  # --- shared by both recipes ---------------------------------------------------------------------
  c.weight_decay = 0.05      # AdamW, weights only; BEiT's exemptions below
  c.no_decay = ("cls_token", "pos_embed", "relative_position_bias_table")
  c.smoothing = 0.1          # label smoothing
  c.mixup = 0.8              # mixup Beta alpha (0: off)
  c.cutmix = 1.0             # cutmix Beta alpha (0: off)
  c.mix_prob = 1.0           # probability that a batch is mixed
  c.switch_prob = 0.5        # probability of cutmix over mixup when both are on
  c.crop_scale = (0.08, 1.0)  # RandomResizedCrop area range
  c.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)  # ... and aspect-ratio range
  c.flip = True              # random horizontal flips
  c.randaugment = "rand-m9-mstd0.5-inc1"  # timm's RandAugment policy after the crop ("": none)
  c.reprob = 0.25            # random erasing probability (timm's "pixel" mode), after normalizing
  c.pooling = "cls"          # classifier input: "cls" (iBOT's --use_cls) | "cls_meanpatch"
  c.clip_grad = 0.0          # global gradient-norm clip (0: off)
  c.b1 = 0.9
  c.b2 = 0.999
  # --- the run ------------------------------------------------------------------------------------
  c.eval_every = 1           # epochs between evaluations and checkpoints (and the last)
  c.log_every = 50           # steps between progress lines
  c.seed = 0                 # the subset, the head, the order and the augmentations
  return c
