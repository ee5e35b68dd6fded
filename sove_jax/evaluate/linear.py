r"""Linear probe on frozen features (docs/method.md §12).

Features are extracted once (no augmentation), standardized with train-set statistics, and a
linear layer is trained with cross-entropy: SGD with momentum 0.9 and a cosine schedule to 0,
as DINO's linear evaluation. Several learning rates train together as independent heads over
the same batches (SGD is linear in the learning rate, so one update, scaled per head, is exact);
the best top-1 is reported, as DINOv2 does on ImageNet.

    python -m sove_jax.evaluate.linear --workdir=runs/default [--convention=last4_cls]
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from sove_jax.evaluate import features as features_lib

# One head per rate, all trained in the same passes (a head costs little). The grid reaches past
# the rates our runs prefer: every run of the Fashion-MNIST studies peaked at the old grid's top
# (0.1), and the base recipe's seed 0 read 0.8 points more at 0.3 (docs/study.md). The studies
# keep the grid their finished runs were probed with.
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def _loss(params, x, y):
  """Sum over heads of each head's mean cross-entropy: heads' gradients stay independent."""
  logits = jnp.einsum("bd,hdc->hbc", x, params["w"]) + params["b"][:, None, :]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[None, :])
  return jnp.sum(jnp.mean(ce, axis=1))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1, 2))
def _epoch(tx, params, opt_state, lrs, feats, labels, order):
  """One epoch as a scan over the rows of `order` [steps, batch] (indices into feats)."""
  def step(carry, idx):
    params, opt_state = carry
    grads = jax.grad(_loss)(params, feats[idx], labels[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    # tx runs at learning rate 1; each head's update is scaled by its own rate.
    updates = jax.tree.map(lambda u: lrs.reshape((-1,) + (1,) * (u.ndim - 1)) * u, updates)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), order)
  return params, opt_state


@jax.jit
def _predict(params, x):
  return jnp.argmax(jnp.einsum("bd,hdc->hbc", x, params["w"]) + params["b"][:, None, :], -1)


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

  test_y = np.asarray(test_y)
  correct = np.zeros(heads)
  for start in range(0, len(test_f), 4096):
    x = (test_f[start:start + 4096] - mean) / std
    correct += np.sum(np.asarray(_predict(params, x)) == test_y[start:start + 4096], axis=1)
  return {lr: float(100.0 * c / len(test_f)) for lr, c in zip(lrs, correct)}


def train_linear_probe(train_f, train_y, test_f, test_y, *, num_classes, epochs=100,
                       batch_size=1024, lr=0.01, weight_decay=0.0, seed=0):
  """Top-1 (%) of one linear probe at learning rate `lr` (see `linear_probe_sweep`)."""
  return linear_probe_sweep(train_f, train_y, test_f, test_y, num_classes=num_classes,
                            lrs=(lr,), epochs=epochs, batch_size=batch_size,
                            weight_decay=weight_decay, seed=seed)[float(lr)]


def evaluate_linear(config, model, *, input_fn, convention=None, dataset=None, data_dir=None,
                    train_split=None, eval_split=None, batch_size=None, lrs=DEFAULT_LRS,
                    epochs=100, probe_batch_size=1024, weight_decay=0.0, seed=0,
                    max_train_examples=-1, max_eval_examples=-1, mesh=None, apply_fn=None):
  """Linear probe of `model` on a run's data: {"convention", "top1" (best), "per_lr"}.
  `convention` defaults to the official one for config.model (arch and variant); `apply_fn`
  replaces the model's features (`features.pixel_features()`: the raw-pixel baseline)."""
  mesh = features_lib.batch_mesh() if mesh is None else mesh
  sharding = jax.NamedSharding(mesh, jax.P(tuple(mesh.axis_names)))
  convention = convention or features_lib.default_probe_convention(config.model)
  data = features_lib.override_data(config.data, dataset=dataset, data_dir=data_dir,
                                    train_split=train_split, eval_split=eval_split)
  batch_size = batch_size or config.batch_size
  if apply_fn is None:
    apply_fn = features_lib.probe_features(model, convention, mesh=mesh)
  else:
    convention = "pixels"
  (train_f, train_y), (test_f, test_y), num_classes = features_lib.train_and_eval_features(
      apply_fn, input_fn, data, batch_size=batch_size, sharding=sharding,
      max_train_examples=max_train_examples, max_eval_examples=max_eval_examples)
  per_lr = linear_probe_sweep(train_f, train_y, test_f, test_y, num_classes=num_classes,
                              lrs=lrs, epochs=epochs, batch_size=probe_batch_size,
                              weight_decay=weight_decay, seed=seed)
  return {"convention": convention, "top1": max(per_lr.values()), "per_lr": per_lr}


def evaluate_checkpoint(workdir, *, load_backbone, input_fn, step=None, baselines=(), **kwargs):
  """Loads the teacher of `workdir` (latest or `step`), runs `evaluate_linear` on it and on each
  of `baselines` (features.BASELINES) with the same splits, prints the results and writes
  `linear.json` into the workdir (process 0). Returns the trained network's results."""
  loaded = load_backbone(workdir, step=step, which="teacher")
  config, model = loaded
  step = getattr(loaded, "step", step)  # the checkpoint read (backbone.LoadedBackbone)
  results = evaluate_linear(config, model, input_fn=input_fn, **kwargs)
  base = {}
  for name in baselines:
    other, apply_fn = features_lib.baseline(name, config)
    base[name] = evaluate_linear(config, other, input_fn=input_fn, apply_fn=apply_fn, **kwargs)
  if jax.process_index() == 0:
    for who, res in [("trained", results)] + [(features_lib.BASELINE_NAMES[b], r)
                                              for b, r in base.items()]:
      per_lr = "  ".join(f"lr={lr:g}: {acc:.2f}" for lr, acc in res["per_lr"].items())
      logging.info("linear probe of %s, %s (%s): top-1 %.2f%%  [%s]", workdir, who,
                   res["convention"], res["top1"], per_lr)
    as_json = lambda res: {"convention": res["convention"], "top1": res["top1"],
                           "per_lr": {f"{lr:g}": acc for lr, acc in res["per_lr"].items()}}
    record = {"step": "latest" if step is None else step, **as_json(results),
              "baselines": {b: as_json(r) for b, r in base.items()}}
    (epath.Path(workdir) / "linear.json").write_text(json.dumps(record, indent=2))
  return results


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  evaluate_checkpoint(
      **features_lib.flag_arguments(f), convention=f.convention or None,
      lrs=[float(lr) for lr in f.lrs], epochs=f.epochs, probe_batch_size=f.probe_batch_size,
      weight_decay=f.weight_decay, seed=f.seed, baselines=tuple(f.baselines))


def _define_flags():
  from absl import flags
  features_lib.define_flags(flags)
  flags.DEFINE_enum("convention", "", ("",) + features_lib.PROBE_CONVENTIONS,
                    "Probe features (default: last4_cls for ViT-Ti/S and Swins, "
                    "cls_meanpatch for ViT-B/L).")
  flags.DEFINE_list("lrs", [str(lr) for lr in DEFAULT_LRS], "Learning rates, one head each.")
  flags.DEFINE_integer("epochs", 100, "Probe training epochs.")
  flags.DEFINE_integer("probe_batch_size", 1024, "Probe training batch.")
  flags.DEFINE_float("weight_decay", 0.0, "Probe weight decay.")
  flags.DEFINE_integer("seed", 0, "Probe shuffling seed.")
  flags.DEFINE_multi_enum("baselines", [], features_lib.BASELINES,
                          "Baselines probed on the same splits and printed beside the trained "
                          "network (repeatable): random_init, pixels.")


if __name__ == "__main__":
  from absl import app

  from sove_jax import reporting
  _define_flags()
  app.run(reporting.command(main))
