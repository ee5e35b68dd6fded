r"""End-to-end fine-tuning of a trained backbone with a classifier (Table 1's fine-tuning columns).

The teacher backbone of a checkpoint (or released weights; or, with `--init=random`, a freshly
initialized network of the same architecture) gets a classifier (`classifier.Classifier`) and is
trained whole on labeled images by one of two recipes (configs/finetune.py; `RECIPES`):

- "full", BEiT's recipe as iBOT fine-tunes on all of ImageNet: AdamW with layer-wise decay, a
  per-step warm-up and cosine, drop-path, label smoothing, mixup / cutmix, a linear head.
- "semi", iBOT's `semi_supervised/eval_cls.py` for the 1% and 10% label splits: 1000 epochs, lr
  5e-6 x batch / 512, timm's per-epoch cosine, and the classifier started from the projection
  head's first layer (`finetune_head_layer=1`).
By default a label subset takes "semi", all labels "full".

Both recipes augment as BEiT and iBOT do: a random-resized crop (+ flip) per image at the run's
global crop size, timm's RandAugment `rand-m9-mstd0.5-inc1` and random erasing with probability
0.25 (`sove_jax.data.randaugment`); the evaluation input is the run's resize + centre crop.

Labels: `--label_split=FILE` lists the train images to use (SimCLRv2's `1percent.txt` and
`10percent.txt`: one image name per line; or train indices), `--label_fraction=0.01` draws a
class-balanced random subset instead (its record says so); epochs are epochs of the subset.
The batch (`--batch_size`, default the run's) is the global train and evaluation batch, sharded
over all devices; parameters are replicated.

    python -m sove_jax.evaluate.finetune --workdir=runs/default [--init=random] \
        [--label_split=1percent.txt] [--config.epochs=...] [--dataset=tfds:imagenet2012]

Each arm (init x labels) checkpoints into OUT_DIR/finetune/ARM/ after every evaluation and
resumes from there; its record goes into OUT_DIR/finetune.json beside the other arms'.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from sove_jax import configuration, reporting
from sove_jax import sharding as sharding_lib
from sove_jax.evaluate import classifier as clf
from sove_jax.evaluate import protocol, splits
from sove_jax.models import network
from sove_jax.models.vit import trunc_normal

INITS = ("pretrained", "random")
RECIPE_NAMES = ("auto", "full", "semi")
HEADS = ("linear", "projection")
SCHEDULES = ("step", "epoch")
# The recipes' values of the fields configs/finetune.py leaves unset; a dict is per model size
# (ViT-Ti, ViT-S and custom small models as "s").
RECIPES = {
    "full": dict(epochs={"s": 200, "b": 100, "l": 50}, warmup_epochs={"s": 20.0, "b": 20.0,
                                                                      "l": 5.0},
                 layer_decay={"s": 0.75, "b": 0.65, "l": 0.75},
                 drop_path={"s": 0.1, "b": 0.2, "l": 0.4}, base_lr=1e-3, lr_batch=256,
                 min_lr=1e-6, warmup_lr=0.0, schedule="step", head="linear", init_scale=0.001),
    "semi": dict(epochs=1000, warmup_epochs=5.0, layer_decay=1.0, drop_path=0.1, base_lr=5e-6,
                 lr_batch=512, min_lr=1e-5, warmup_lr=1e-6, schedule="epoch", head="projection",
                 init_scale=1.0),
}
UNSET = dict(epochs=0, warmup_epochs=-1.0, layer_decay=0.0, drop_path=-1.0, base_lr=0.0,
             lr_batch=0, min_lr=-1.0, warmup_lr=-1.0, schedule="", head="", init_scale=0.0)
_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "finetune.py"


def default_config(recipe: str = "auto") -> ml_collections.ConfigDict:
  """configs/finetune.py's `get_config(recipe)`."""
  return configuration.sibling("finetune", of=str(_CONFIG)).get_config(recipe)


def resolve(config, variant: str, subset: bool) -> ml_collections.ConfigDict:
  """A copy of the fine-tuning config with the recipe chosen ("auto": "semi" for a label subset,
  else "full") and its values in every field left unset, for the model size `variant`."""
  c = ml_collections.ConfigDict(config.to_dict())
  if c.recipe not in RECIPE_NAMES:
    raise configuration.ConfigError(f"--config.recipe={c.recipe!r} is not one of "
                                    f"{', '.join(RECIPE_NAMES)}.")
  if c.recipe == "auto":
    c.recipe = "semi" if subset else "full"
  size = variant if variant in ("b", "l") else "s"
  for field, unset in UNSET.items():
    if c[field] == unset:
      value = RECIPES[c.recipe][field]
      c[field] = value[size] if isinstance(value, dict) else value
  return c


def arm_name(init: str, label_split: str = "", label_fraction: float = 1.0) -> str:
  """`pretrained_10pct`, `random_full`, `pretrained_split-NAME`: the arm's key and folder."""
  if label_split:
    labels = "split-" + os.path.splitext(os.path.basename(label_split))[0]
  elif label_fraction >= 1.0:
    labels = "full"
  else:
    labels = f"{100 * label_fraction:g}pct"
  return f"{init}_{labels}"


def validate(c, *, init="pretrained", label_fraction=1.0, label_split="", batch_size=None,
             num_devices=1):
  """One-sentence errors for settings that cannot work, before anything loads or compiles
  (`c` resolved or not; `batch_size` None: not known yet, the run's)."""
  err = configuration.ConfigError
  if init not in INITS:
    raise err(f"--init must be one of {INITS}, got {init!r}.")
  if not 0.0 < label_fraction <= 1.0:
    raise err(f"--label_fraction must be in (0, 1], got {label_fraction}.")
  splits.check_split_file(label_split, "--label_split")
  if c.pooling not in clf.POOLINGS:
    raise err(f"--config.pooling must be one of {clf.POOLINGS}, got {c.pooling!r}.")
  for field, allowed in (("schedule", SCHEDULES), ("head", HEADS)):
    if c[field] not in allowed + ("",):
      raise err(f"--config.{field}={c[field]!r} is not one of {', '.join(allowed)}.")
  if c.epochs < 0 or c.eval_every < 1 or c.log_every < 1:
    raise err("--config.epochs must be >= 0 (0: the recipe's), --config.eval_every and "
              "--config.log_every >= 1.")
  if c.base_lr < 0 or c.lr_batch < 0 or c.weight_decay < 0:
    raise err("--config.base_lr, --config.lr_batch and --config.weight_decay must be >= 0 "
              "(0: the recipe's rate).")
  if not 0.0 <= c.layer_decay <= 1.0:
    raise err(f"--config.layer_decay must be in (0, 1] (0: the recipe's), got {c.layer_decay}.")
  if c.drop_path >= 1.0:
    raise err(f"--config.drop_path must be < 1, got {c.drop_path}.")
  if not 0.0 <= c.smoothing < 1.0:
    raise err(f"--config.smoothing must be in [0, 1), got {c.smoothing}.")
  if c.mixup < 0 or c.cutmix < 0:
    raise err("--config.mixup and --config.cutmix (Beta alphas) must be >= 0 (0: off).")
  if not (0.0 <= c.mix_prob <= 1.0 and 0.0 <= c.switch_prob <= 1.0):
    raise err("--config.mix_prob and --config.switch_prob must be probabilities in [0, 1].")
  if not 0.0 <= c.reprob <= 1.0:
    raise err(f"--config.reprob must be a probability in [0, 1], got {c.reprob}.")
  if c.randaugment:
    from sove_jax.data import randaugment
    try:
      randaugment.Policy(c.randaugment)
    except ValueError as e:
      raise err(f"--config.randaugment: {e}") from None
  if len(c.crop_scale) != 2 or len(c.crop_ratio) != 2:
    raise err("--config.crop_scale and --config.crop_ratio take two numbers: (lo, hi).")
  lo, hi = c.crop_scale
  if not 0.0 < lo <= hi <= 1.0:
    raise err(f"--config.crop_scale must be two area fractions 0 < lo <= hi <= 1, got "
              f"{tuple(c.crop_scale)}.")
  if not 0.0 < c.crop_ratio[0] <= c.crop_ratio[1]:
    raise err(f"--config.crop_ratio must be 0 < lo <= hi, got {tuple(c.crop_ratio)}.")
  if batch_size is None:
    return
  if batch_size <= 0 or batch_size % num_devices:
    raise err(f"--batch_size {batch_size} must be a positive multiple of the {num_devices} "
              "devices.")
  if clf.MixConfig(c.mixup, c.cutmix, c.mix_prob, c.switch_prob).active and batch_size % 2:
    raise err(f"mixup/cutmix pair each image with the batch reversed: --batch_size {batch_size} "
              "must be even.")


def learning_rate(c, steps_per_epoch: int, batch_size: int):
  """The recipe's schedule: the peak `base_lr * batch / lr_batch`; "step": a per-step linear
  warm-up from `warmup_lr` then a cosine to `min_lr` (BEiT); "epoch": timm's `CosineLRScheduler`
  stepped once per epoch (epoch e < warmup: warmup_lr + e (peak - warmup_lr) / warmup; then
  min_lr + (peak - min_lr) (1 + cos(pi e / epochs)) / 2)."""
  peak = c.base_lr * batch_size / c.lr_batch
  total = c.epochs * steps_per_epoch
  if c.schedule == "step":
    warmup = min(int(round(c.warmup_epochs * steps_per_epoch)), total - 1)
    return optax.warmup_cosine_decay_schedule(c.warmup_lr, peak, warmup, total, end_value=c.min_lr)

  def per_epoch(step):
    epoch = (step // steps_per_epoch).astype(jnp.float32)
    warm = c.warmup_lr + epoch * (peak - c.warmup_lr) / max(c.warmup_epochs, 1e-9)
    cosine = c.min_lr + 0.5 * (peak - c.min_lr) * (1.0 + jnp.cos(math.pi * epoch / c.epochs))
    return jnp.where(epoch < c.warmup_epochs, warm, cosine)

  return per_epoch


def _head_layer(c, loaded, init: str, width: int, seed: int):
  """The projection head's first layer the "projection" head starts from: the checkpoint's, or
  for a random initialization a fresh one (trunc-normal 0.02, bias 0) of the same shape."""
  if c.head != "projection":
    return None
  pretrained = loaded.head_layer
  if init == "pretrained":
    if pretrained is None:
      raise configuration.ConfigError(
          f"--config.head=projection (the semi-supervised recipe) starts from the projection "
          f"head's first layer, which {loaded.source or 'the weights'} does not hold: give a "
          "training checkpoint (its teacher) or --config.head=linear.")
    return pretrained
  hidden = pretrained["kernel"].shape[1] if pretrained is not None else 2048
  kernel = trunc_normal(0.02)(jax.random.PRNGKey(3000 + seed), (width, hidden), jnp.float32)
  return {"kernel": np.asarray(kernel), "bias": np.zeros(hidden, np.float32)}


def finetune(loaded, out_dir: str, *, config=None, init="pretrained", label_split="",
             label_fraction=1.0, dataset=None, data_dir=None, train_split=None, eval_split=None,
             batch_size=None, max_train_examples=-1, max_eval_examples=-1, mesh=None) -> dict:
  """Fine-tunes one arm of `loaded` (`backbone.LoadedBackbone`; resuming the arm's checkpoint
  in OUT_DIR/finetune/ARM if any) and returns its record: final and best top-1/top-5, the
  per-evaluation curve, the labels and data used and the resolved recipe."""
  from sove_jax import checkpoint
  from sove_jax.data import labeled, pipeline, randaugment, sources

  config = config if config is not None else default_config()
  mesh = sharding_lib.batch_mesh() if mesh is None else mesh
  run_config, pretrained = loaded
  subset = bool(label_split) or label_fraction < 1.0
  c = resolve(config, run_config.model.variant, subset)
  batch_size = batch_size or run_config.batch_size
  validate(c, init=init, label_fraction=label_fraction, label_split=label_split,
           batch_size=batch_size, num_devices=mesh.devices.size)
  data = splits.override_data(run_config.data, dataset=dataset, data_dir=data_dir,
                              train_split=train_split, eval_split=eval_split)
  size = run_config.data.global_size

  # Labels of the train split (the first `max_train_examples`), and the arm's subset of them.
  train_source = sources.open_source(data, data.train_split)
  if not subset and max_train_examples < 0 and isinstance(train_source, sources.TfdsSource):
    indices = None  # streamed whole; a TFDS split's labels would take a pass to list
    num_classes = splits.class_count(train_source, data)
    labels_used = f"all {len(train_source)} train labels"
  else:
    labels = labeled.split_labels(train_source)
    if max_train_examples >= 0:
      labels = labels[:max_train_examples]
    indices, labels_used = splits.label_subset(
        labels, split_file=label_split, fraction=label_fraction, seed=c.seed,
        names=lambda: splits.example_names(data, data.train_split))
    if indices is None and len(labels) < len(train_source):
      indices = np.arange(len(labels))
    num_classes = int(labels.max()) + 1
  extra = (randaugment.TrainAugment(c.randaugment, c.reprob, mean=tuple(data.mean))
           if c.randaugment or c.reprob > 0 else None)
  train_in = labeled.labeled_train_input(
      data, split=data.train_split, indices=indices, size=size, scale=tuple(c.crop_scale),
      ratio=tuple(c.crop_ratio), flip=c.flip, global_batch_size=batch_size, seed=c.seed,
      augment=extra)
  eval_batches = pipeline.eval_input(data, split=data.eval_split, global_batch_size=batch_size,
                                     max_examples=max_eval_examples)
  steps_per_epoch = train_in.steps_per_epoch
  total = c.epochs * steps_per_epoch
  schedule = learning_rate(c, steps_per_epoch, batch_size)

  # The model: backbone + head, drop-path set for training; parameters replicated.
  if init == "pretrained":
    backbone = pretrained
  else:
    with nnx.use_eager_sharding(False):
      backbone = network.build_backbone(run_config.model, size, nnx.Rngs(1000 + c.seed))
  backbone.drop_path_rate = float(c.drop_path)
  width = backbone.width * (2 if c.pooling == "cls_meanpatch" else 1)
  model = clf.Classifier(backbone, num_classes, pooling=c.pooling, init_scale=c.init_scale,
                         head_layer=_head_layer(c, loaded, init, width, c.seed),
                         rngs=nnx.Rngs(2000 + c.seed))
  graphdef, params = nnx.split(model)
  params = params.to_pure_dict()
  tx = clf.make_optimizer(params, clf.backbone_depths(backbone), learning_rate=schedule,
                          weight_decay=c.weight_decay, layer_decay=c.layer_decay, b1=c.b1,
                          b2=c.b2, clip=c.clip_grad, no_decay=tuple(c.no_decay))
  replicated = jax.NamedSharding(mesh, jax.P())
  batch_sharding = jax.NamedSharding(mesh, jax.P(tuple(mesh.axis_names)))
  state = jax.device_put(clf.State(jnp.zeros((), jnp.int32), params, tx.init(params)),
                         replicated)
  state_shardings = jax.tree.map(lambda _: replicated, state)
  mix = clf.MixConfig(c.mixup, c.cutmix, c.mix_prob, c.switch_prob)
  step_fn = clf.make_train_step(graphdef, tx, schedule, num_classes=num_classes,
                                smoothing=c.smoothing, mix=mix)
  train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)

  # Resume this arm if it has a checkpoint of the same settings.
  arm = arm_name(init, label_split, label_fraction)
  arm_dir = os.path.join(out_dir, "finetune", arm)
  record = {"protocol": f"finetune_{c.recipe}", "arm": arm, "init": init,
            "checkpoint_step": loaded.step if init == "pretrained" else None,
            "labels": labels_used,
            "dataset": f"{data.source}:{data.name}" if data.name else data.source,
            "train_examples": int(train_in.num_examples), "num_classes": num_classes,
            "batch_size": batch_size, "steps": total, "settings": c.to_dict(), "curve": []}
  record = json.loads(json.dumps(record))
  ckpt = checkpoint.Checkpointer(arm_dir, keep=1)
  try:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    restored = ckpt.restore(abstract)
    if restored is not None:
      saved = restored[1]
      if saved["settings"] != record["settings"]:
        raise configuration.ConfigError(
            f"{arm_dir} holds a fine-tuning run with other settings; remove it to start again.")
      state, record["curve"] = restored[0], saved["curve"]
      train_in.epoch = int(state.step) // steps_per_epoch
      reporting.say(f"{arm}: resumed at step {int(state.step)} of {total}")
    peak = c.base_lr * batch_size / c.lr_batch
    reporting.say(
        f"{arm} ({c.recipe} recipe): {c.epochs} epochs x {steps_per_epoch} steps of "
        f"{batch_size} on {labels_used} ({num_classes} classes), lr {peak:.2e}, layer decay "
        f"{c.layer_decay}, drop-path {c.drop_path}, {c.head} head")
    key = jax.device_put(jax.random.PRNGKey(c.seed), replicated)
    start = int(state.step)
    t_start = t_last = time.monotonic()
    step_last, losses = start, []
    for i in range(start + 1, total + 1):
      batch = pipeline.to_global(next(train_in), batch_sharding)
      state, metrics = train_step(state, batch, key)
      losses.append(metrics["loss"])
      epoch, in_epoch = divmod(i, steps_per_epoch)
      if i % c.log_every == 0 or i == total:
        loss = float(np.mean(jax.device_get(losses)))
        line = (f"{arm}: epoch {(i - 1) // steps_per_epoch + 1}/{c.epochs} step {i}/{total} | "
                f"loss {loss:.4f} | lr {float(metrics['learning_rate']):.2e}")
        now = time.monotonic()
        if step_last > start:  # the first window holds the compilation: no rate from it
          rate = (i - step_last) / max(now - t_last, 1e-9)
          line += (f" | {rate * batch_size:,.0f} img/s | ETA "
                   f"{reporting.duration((total - i) / max(rate, 1e-9))}")
        reporting.say(line)
        t_last, step_last, losses = now, i, []
      if in_epoch == 0 and (epoch % c.eval_every == 0 or i == total):
        top1, top5 = clf.accuracy(graphdef, state.params, eval_batches, batch_sharding)
        record["curve"].append({"epoch": epoch, "step": i, "top1": top1, "top5": top5})
        reporting.say(f"{arm}: epoch {epoch}: top-1 {top1:.2f}%  top-5 {top5:.2f}%")
        ckpt.save(i, state, {"settings": record["settings"], "curve": record["curve"]})
        t_last = time.monotonic()  # rates count training only
    record["minutes"] = (time.monotonic() - t_start) / 60.0
  finally:
    ckpt.close()
  last = record["curve"][-1]
  record.update(top1=last["top1"], top5=last["top5"],
                best_top1=max(c_["top1"] for c_ in record["curve"]))
  return record


def format_table(arms: dict) -> str:
  """One row per arm: recipe, examples, epochs, final top-1/top-5, best top-1."""
  lines = [f"{'arm':<28}{'recipe':>8}{'examples':>9}{'epochs':>7}{'top-1':>8}{'top-5':>8}"
           f"{'best':>8}"]
  for name, r in sorted(arms.items()):
    lines.append(f"{name:<28}{r['settings']['recipe']:>8}{r['train_examples']:>9}"
                 f"{r['settings']['epochs']:>7}{r['top1']:>8.2f}{r['top5']:>8.2f}"
                 f"{r['best_top1']:>8.2f}")
  return "\n".join(lines)


# --- the protocol ---------------------------------------------------------------------------------

def _check(options):
  validate(options.get("config") or default_config(), init=options.get("init", "pretrained"),
           label_fraction=options.get("label_fraction", 1.0),
           label_split=options.get("label_split", ""), batch_size=options.get("batch_size"),
           num_devices=jax.device_count())


def _options(f) -> dict:
  from absl import flags
  return dict(**splits.data_options(f), config=flags.FLAGS["config"].value, init=f.init,
              label_split=f.label_split, label_fraction=f.label_fraction,
              batch_size=f.batch_size or None)


def _define_flags(flags):
  from ml_collections import config_flags
  splits.define_flags(flags)
  config_flags.DEFINE_config_file("config", str(_CONFIG), "Fine-tuning recipe "
                                  "(configs/finetune.py[:full|:semi]); --config.FIELD=VALUE "
                                  "sets one field.")
  flags.DEFINE_enum("init", "pretrained", INITS, "Start from the evaluated backbone, or from a "
                    "random initialization of the same architecture (the baseline).")
  flags.DEFINE_string("label_split", "", "Train images to fine-tune on: SimCLRv2's "
                      "1percent.txt / 10percent.txt (one image name per line) or train indices.")
  flags.DEFINE_float("label_fraction", 1.0, "Without --label_split: a class-balanced random "
                     "subset of the train labels (0.01, 0.1), or all of them (1).")


PROTOCOL = protocol.Protocol(
    name="finetune", title="fine-tuning", evaluate=finetune, define_flags=_define_flags,
    options=_options, table=lambda record, baselines: format_table({record["arm"]: record}),
    record=lambda record, options: record, check=_check, arm=lambda record: record["arm"])


if __name__ == "__main__":
  protocol.main(PROTOCOL)
