r"""Linear probe on frozen features (docs/method.md §12), in two protocols.

- `--protocol=paper`: DINO's `eval_linear.py` as iBOT runs it (`eval_linear_multi.py`): every
  epoch, every training image is a fresh RandomResizedCrop (area 8-100%, aspect 3/4-4/3) with a
  random flip at the evaluation crop size, normalized with the run's mean and std and run through
  the frozen backbone; the features are used as they come (no standardization). One linear head
  per learning rate (iBOT's grid: 1..9 x 10^-4..10^0, each x batch / 256), initialized N(0,
  0.01), bias 0, trained by SGD with momentum 0.9 and no weight decay, the rate following a
  cosine to 0 over the epochs, stepped once per epoch (`CosineAnnealingLR`), 100 epochs.
  Features: the last 4 blocks' [CLS] for ViT-S (and smaller), [CLS] + the mean patch token for
  ViT-B and ViT-L (`features.default_probe_convention`).
- `--protocol=fast` (default): features are extracted once from the evaluation crops,
  standardized with train-set statistics, and the heads trained on those arrays (SGD with
  momentum 0.9, a cosine per step, rates used as given). Minutes instead of hours, for small
  data and for studies: its figures are not the paper's protocol, and the record says which ran.

Several learning rates train together as independent heads over the same batches (SGD is
linear in the learning rate, so one update, scaled per head, is exact). The rate is selected on
a validation split (`--select_split`, default minival: heads trained on train-minival), then one
head is trained at that rate on the whole train split and reported on the test split, so the test
split chooses nothing. `--select_split=none` picks the best test figure instead (DINO's report),
and the record says "selected_on": the test split.

    python -m sove_jax.evaluate.linear --workdir=runs/default [--protocol=paper]
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sove_jax import reporting
from sove_jax import sharding as sharding_lib
from sove_jax.evaluate import features as features_lib
from sove_jax.evaluate import protocol, splits

PROTOCOLS = ("fast", "paper")
# Fast: one head per rate (a head costs little). The grid reaches past the rates our runs prefer:
# every run of the Fashion-MNIST studies peaked at the old grid's top (0.1), and the base recipe's
# seed 0 read 0.8 points more at 0.3 (docs/study.md).
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# Paper: iBOT's sweep, per 256 images.
PAPER_LRS = tuple(round(n * 10.0 ** k, 10) for k in range(-4, 1) for n in range(1, 10))
PAPER = dict(epochs=100, batch_size=1024, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
             init_std=0.01)


# --- heads, one per learning rate -----------------------------------------------------------------

def _loss(params, x, y):
  """Sum over heads of each head's mean cross-entropy: heads' gradients stay independent."""
  logits = jnp.einsum("bd,hdc->hbc", x, params["w"]) + params["b"][:, None, :]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[None, :])
  return jnp.sum(jnp.mean(ce, axis=1))


def _heads_update(tx, params, opt_state, lrs, x, y):
  """One step of every head: tx runs at learning rate 1, each head's update scaled by its rate."""
  grads = jax.grad(_loss)(params, x, y)
  updates, opt_state = tx.update(grads, opt_state, params)
  updates = jax.tree.map(lambda u: lrs.reshape((-1,) + (1,) * (u.ndim - 1)) * u, updates)
  return optax.apply_updates(params, updates), opt_state


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1, 2))
def _epoch(tx, params, opt_state, lrs, feats, labels, order):
  """One epoch as a scan over the rows of `order` [steps, batch] (indices into feats)."""
  def step(carry, idx):
    return _heads_update(tx, *carry, lrs, feats[idx], labels[idx]), None

  (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), order)
  return params, opt_state


_step = jax.jit(_heads_update, static_argnums=(0,), donate_argnums=(1, 2))


@jax.jit
def _predict(params, x):
  return jnp.argmax(jnp.einsum("bd,hdc->hbc", x, params["w"]) + params["b"][:, None, :], -1)


def _accuracy(params, feats, labels, lrs, transform=lambda x: x):
  """Top-1 (%) per head, {lr: acc}."""
  correct = np.zeros(len(lrs))
  for start in range(0, len(feats), 4096):
    x = transform(feats[start:start + 4096])
    correct += np.sum(np.asarray(_predict(params, x)) == labels[start:start + 4096], axis=1)
  return {lr: float(100.0 * c / len(feats)) for lr, c in zip(lrs, correct)}


# --- the fast probe: precomputed features -------------------------------------------------------

def linear_probe_sweep(train_f, train_y, test_f, test_y, *, num_classes, lrs=DEFAULT_LRS,
                       epochs=100, batch_size=1024, weight_decay=0.0, seed=0):
  """Top-1 (%) on the test set per learning rate, {lr: acc}, one head per rate.

  Learning rates are used as given (no batch-size scaling). The train features live on one
  device for the whole run; every epoch is one jitted scan over a fresh permutation
  (`seed`); the last partial batch of an epoch is dropped, a different one each epoch.
  """
  train_f = np.asarray(train_f, np.float32)
  test_f = np.asarray(test_f, np.float32)
  mean = train_f.mean(axis=0)
  std = train_f.std(axis=0) + 1e-6
  n, dim = train_f.shape
  batch_size = min(batch_size, n)
  steps = n // batch_size
  lrs = tuple(float(lr) for lr in lrs)

  heads = len(lrs)
  params = {"w": jnp.zeros((heads, dim, num_classes)), "b": jnp.zeros((heads, num_classes))}
  tx = optax.chain(optax.add_decayed_weights(weight_decay),
                   optax.sgd(optax.cosine_decay_schedule(1.0, epochs * steps), momentum=0.9))
  opt_state = tx.init(params)
  feats = jnp.asarray((train_f - mean) / std)
  labels = jnp.asarray(train_y, jnp.int32)
  lr_array = jnp.asarray(lrs, jnp.float32)
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(n)[:steps * batch_size].reshape(steps, batch_size)
    params, opt_state = _epoch(tx, params, opt_state, lr_array, feats, labels, order)
  return _accuracy(params, test_f, np.asarray(test_y), lrs, lambda x: (x - mean) / std)


def train_linear_probe(train_f, train_y, test_f, test_y, *, num_classes, epochs=100,
                       batch_size=1024, lr=0.01, weight_decay=0.0, seed=0):
  """Top-1 (%) of one linear probe at learning rate `lr` (see `linear_probe_sweep`)."""
  return linear_probe_sweep(train_f, train_y, test_f, test_y, num_classes=num_classes,
                            lrs=(lr,), epochs=epochs, batch_size=batch_size,
                            weight_decay=weight_decay, seed=seed)[float(lr)]


# --- the paper's probe: augmented images through the frozen backbone each epoch ---------------

def cosine_per_epoch(epoch: int, epochs: int) -> float:
  """`CosineAnnealingLR(T_max=epochs, eta_min=0)` stepped once per epoch: the factor of the base
  rate during `epoch` (0-based)."""
  return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def augmented_probe_sweep(apply_fn, train_input, eval_batches, *, sharding, num_classes, lrs,
                          epochs, seed=0, init_std=PAPER["init_std"], name="linear probe"):
  """Top-1 (%) on `eval_batches` per base learning rate, {lr: acc}: one head per rate trained
  on `apply_fn` of every batch of `train_input` (host batches of augmented images, e.g.
  `data.labeled.labeled_train_input`, `steps_per_epoch` a epoch), by the paper protocol (module
  docstring): rates x batch / 256, a per-epoch cosine, SGD momentum 0.9, no decay."""
  from sove_jax.data import pipeline
  lrs = tuple(float(lr) for lr in lrs)
  scaled = np.asarray(lrs, np.float32) * train_input.batch_size * jax.process_count() / 256.0
  tx = optax.sgd(1.0, momentum=0.9)
  params = opt_state = None
  rng = jax.random.PRNGKey(seed)
  steps, say_every = train_input.steps_per_epoch, max(1, epochs // 10)
  for epoch in range(epochs):
    lr_now = jnp.asarray(scaled * cosine_per_epoch(epoch, epochs))
    for _ in range(steps):
      batch = pipeline.to_global(next(train_input), sharding)
      x = apply_fn(batch["image"])
      if params is None:  # the feature width is known at the first batch
        w = init_std * jax.random.normal(rng, (len(lrs), x.shape[-1], num_classes))
        params = {"w": w, "b": jnp.zeros((len(lrs), num_classes))}
        opt_state = tx.init(params)
      params, opt_state = _step(tx, params, opt_state, lr_now, x, batch["label"])
    if (epoch + 1) % say_every == 0 or epoch + 1 == epochs:
      reporting.say(f"{name}: epoch {epoch + 1}/{epochs}")
  feats, labels = features_lib.extract_features(apply_fn, eval_batches, sharding=sharding,
                                                name=f"{name}, evaluation")
  return _accuracy(params, feats, labels, lrs)


# --- selection and report -------------------------------------------------------------------------

def _best(per_lr: dict) -> float:
  """The rate with the highest accuracy (the smaller rate on a tie)."""
  return max(sorted(per_lr), key=lambda lr: per_lr[lr])


def evaluate_linear(config, model, *, input_fn, protocol_name="fast", convention=None,
                    dataset=None, data_dir=None, train_split=None, eval_split=None,
                    select_split=splits.VALIDATION, select_train_split="", batch_size=None,
                    lrs=None, epochs=None, probe_batch_size=None, weight_decay=0.0, seed=0,
                    max_train_examples=-1, max_eval_examples=-1, mesh=None, apply_fn=None):
  """Linear probe of `model` on a run's data by `protocol_name` ("fast" | "paper"): the rate
  chosen on `select_split` (heads trained on `select_train_split`, default train-minival; "" or
  "none": chosen on the test split), then reported on the eval split with a head trained on the
  train split. Returns {"protocol", "convention", "top1", "lr", "per_lr" (the selection split's
  accuracies), "selected_on", "select_train", "train", "reported_on"}. `apply_fn` replaces the
  model's features (`features.pixel_features()`: the raw-pixel baseline)."""
  if protocol_name not in PROTOCOLS:
    raise ValueError(f"--protocol={protocol_name!r} is not one of {', '.join(PROTOCOLS)}.")
  paper = protocol_name == "paper"
  mesh = sharding_lib.batch_mesh() if mesh is None else mesh
  sharding = jax.NamedSharding(mesh, jax.P(tuple(mesh.axis_names)))
  convention = convention or features_lib.default_probe_convention(config.model)
  data = splits.override_data(config.data, dataset=dataset, data_dir=data_dir,
                              train_split=train_split, eval_split=eval_split)
  batch_size = batch_size or config.batch_size
  if apply_fn is None:
    apply_fn = features_lib.probe_features(model, convention, mesh=mesh)
  else:
    convention = "pixels"
  lrs = tuple(lrs or (PAPER_LRS if paper else DEFAULT_LRS))
  epochs = epochs or (PAPER["epochs"] if paper else 100)
  probe_batch_size = probe_batch_size or (PAPER["batch_size"] if paper else 1024)
  select = "" if select_split in ("", "none") else select_split
  select_train = (select_train_split or splits.train_without(select, data.train_split)
                  if select else data.train_split)
  report = dict(train=data.train_split, test=data.eval_split)
  choose = dict(train=select_train, test=select or data.eval_split)
  features = functools.partial(features_lib.split_features, apply_fn, input_fn, data,
                               batch_size=batch_size, sharding=sharding)

  if paper:
    from sove_jax.data import labeled, sources

    def sweep(splits_, rates):
      source = sources.open_source(data, splits_["train"])
      cap = len(source) if max_train_examples < 0 else min(max_train_examples, len(source))
      train_input = labeled.labeled_train_input(
          data, split=splits_["train"], indices=None if cap == len(source) else np.arange(cap),
          size=data.eval_crop, scale=PAPER["scale"], ratio=PAPER["ratio"], flip=True,
          global_batch_size=probe_batch_size, seed=seed)
      eval_batches = input_fn(data, split=splits_["test"], global_batch_size=batch_size,
                              max_examples=max_eval_examples)
      return augmented_probe_sweep(
          apply_fn, train_input, eval_batches, sharding=sharding, lrs=rates, epochs=epochs,
          num_classes=splits.class_count(source, data), seed=seed,
          name=f"linear probe on {splits_['train']}")

    per_lr = sweep(choose, lrs)
    lr = _best(per_lr)
    top1 = sweep(report, (lr,))[lr] if select else per_lr[lr]
  else:
    cached = {}

    def split(name, max_examples):
      if name not in cached:
        cached[name] = features(split=name, max_examples=max_examples)
      return cached[name]

    train_cap, eval_cap = max_train_examples, max_eval_examples
    chosen_train, chosen_test = split(choose["train"], train_cap), split(choose["test"], eval_cap)
    if select and train_cap < 0:  # train = train-minival + minival: no third pass
      train = tuple(np.concatenate(p) for p in zip(chosen_train, chosen_test))
    else:
      train = split(report["train"], train_cap)
    test = split(report["test"], eval_cap)
    num_classes = int(max(y.max() for _, y in cached.values())) + 1
    kw = dict(num_classes=num_classes, epochs=epochs, batch_size=probe_batch_size,
              weight_decay=weight_decay, seed=seed)
    per_lr = linear_probe_sweep(*chosen_train, *chosen_test, lrs=lrs, **kw)
    lr = _best(per_lr)
    top1 = train_linear_probe(*train, *test, lr=lr, **kw) if select else per_lr[lr]
  return {"protocol": f"linear_{protocol_name}", "convention": convention, "top1": top1,
          "lr": lr, "per_lr": per_lr, "selected_on": choose["test"],
          "select_train": choose["train"], "train": report["train"],
          "reported_on": report["test"], "epochs": epochs}


# --- the protocol ---------------------------------------------------------------------------------

def _evaluate(loaded, out_dir, **options):
  del out_dir
  return evaluate_linear(*loaded, **options)


def _table(results, baselines):
  lines = []
  for who, res in [("trained", results)] + [(protocol.BASELINE_NAMES[b], r)
                                            for b, r in baselines.items()]:
    per_lr = "  ".join(f"lr={lr:g}: {acc:.2f}" for lr, acc in res["per_lr"].items())
    lines.append(f"{who} ({res['protocol']}, {res['convention']}): {res['reported_on']} top-1 "
                 f"{res['top1']:.2f}% at lr {res['lr']:g} (head trained on {res['train']}); the "
                 f"rate chosen on {res['selected_on']} (heads trained on {res['select_train']}: "
                 f"{per_lr})")
  return "\n".join(lines)


def _record(results, options):
  del options
  return {**results, "per_lr": {f"{lr:g}": acc for lr, acc in results["per_lr"].items()},
          "lr": float(results["lr"])}


def _options(f) -> dict:
  from sove_jax.data import pipeline
  return dict(**splits.data_options(f), input_fn=pipeline.eval_input, protocol_name=f.protocol,
              batch_size=f.batch_size or None, convention=f.convention or None,
              lrs=[float(lr) for lr in f.lrs] or None, epochs=f.epochs or None,
              probe_batch_size=f.probe_batch_size or None, weight_decay=f.weight_decay,
              seed=f.seed, select_split=f.select_split, select_train_split=f.select_train_split)


def _define_flags(flags):
  splits.define_flags(flags)
  flags.DEFINE_enum("protocol", "fast", PROTOCOLS, "paper: DINO's augmented probe (module "
                    "docstring); fast: precomputed, standardized centre-crop features.")
  flags.DEFINE_enum("convention", "", ("",) + features_lib.PROBE_CONVENTIONS,
                    "Probe features (default: last4_cls for ViT-Ti/S and Swins, "
                    "cls_meanpatch for ViT-B/L).")
  flags.DEFINE_list("lrs", [], "Learning rates, one head each (default: fast "
                    f"{','.join(map(str, DEFAULT_LRS))}; paper iBOT's 45 rates 1e-4..9, per 256).")
  flags.DEFINE_integer("epochs", 0, "Probe training epochs (default 100).")
  flags.DEFINE_integer("probe_batch_size", 0, "Probe training batch (default 1024).")
  flags.DEFINE_float("weight_decay", 0.0, "Probe weight decay (fast protocol).")
  flags.DEFINE_integer("seed", 0, "Probe seed (order, crops, head init).")
  flags.DEFINE_string("select_split", splits.VALIDATION, "Split the rate is chosen on (heads "
                      "trained on --select_train_split); none: the best test figure.")
  flags.DEFINE_string("select_train_split", "", "Training split of the rate choice (default: "
                      f"the train split less --select_split, e.g. train-{splits.VALIDATION}).")


PROTOCOL = protocol.Protocol(
    name="linear", title="linear probe", evaluate=_evaluate, define_flags=_define_flags,
    options=_options, table=_table, record=_record, baselines=protocol.BASELINES)


if __name__ == "__main__":
  protocol.main(PROTOCOL)
