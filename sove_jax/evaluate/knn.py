r"""Weighted k-NN classification on frozen features (docs/method.md §12; the DINO protocol).

Train-set features are the memory, sharded by rows over the devices; test features go through
in chunks. Each device takes the top-k of its shard for a chunk, the candidates are gathered and
merged, so neither a train-by-test matrix nor the whole memory sits on one device. One top-k with
the largest k serves every k. Votes are `exp(sim / T)` per neighbor, summed per class.

The reported figure uses the train split as the memory and the test split as queries (DINO's
protocol: nothing is tuned on it). `--select_split=minival` adds the validation figure (memory:
train-minival, queries: minival), the one to choose settings by. `--lowshot` adds k-NN with 1%
and 10% of the train labels (Table A.1): SimCLRv2's split files with `--lowshot_split_1pct` and
`--lowshot_split_10pct` (one image name per line), else class-balanced random subsets, which the
record names as such.

    python -m sove_jax.evaluate.knn --workdir=runs/default [--dataset=tfds:imagenet2012] [--lowshot]
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sove_jax import sharding as sharding_lib
from sove_jax.evaluate import features as features_lib
from sove_jax.evaluate import protocol, splits

DEFAULT_KS = (10, 20, 100, 200)
LOWSHOT_FRACTIONS = (0.01, 0.1)


def _mesh_rows(mesh):
  """The memory's rows are split over every mesh axis."""
  return jax.P(tuple(mesh.axis_names))


def _global_rows(host, mesh, pad_value, rows):
  """Host array -> global array of `rows` rows sharded over the mesh, padded with `pad_value`.
  Every process holds the whole host array, so a callback (which works across processes)
  cuts each device's rows without copying the padded whole."""
  shape = (rows,) + host.shape[1:]

  def shard(index):
    r = index[0]
    start, stop = r.start or 0, rows if r.stop is None else r.stop
    part = host[start:min(stop, len(host))]
    missing = stop - start - len(part)
    if missing > 0:
      pad = np.full((missing,) + host.shape[1:], pad_value, host.dtype)
      part = np.concatenate([part, pad])
    return part

  return jax.make_array_from_callback(shape, jax.NamedSharding(mesh, _mesh_rows(mesh)), shard)


_normalize = jax.jit(features_lib.l2_normalize)


def _replicated(host, mesh):
  return jax.make_array_from_callback(host.shape, jax.NamedSharding(mesh, jax.P()),
                                      lambda index: host[index])


@functools.lru_cache(maxsize=None)
def _chunk_predict(mesh, k_local, k_max, ks, temperature, num_classes):
  """The jitted chunk step: [C, D] test features -> [len(ks), C] predicted classes."""
  axes = tuple(mesh.axis_names)

  def per_device(memory, memory_labels, queries):
    sim = jnp.matmul(queries, memory.T, precision=jax.lax.Precision.HIGHEST)
    sim = jnp.where(memory_labels[None, :] >= 0, sim, -jnp.inf)  # padding rows never win
    vals, idx = jax.lax.top_k(sim, k_local)
    labs = memory_labels[idx]
    # Candidates of every shard, merged: [C, devices * k_local] -> the global top k_max.
    vals = jax.lax.all_gather(vals, axes, axis=1, tiled=True)
    labs = jax.lax.all_gather(labs, axes, axis=1, tiled=True)
    vals, pos = jax.lax.top_k(vals, k_max)
    labs = jnp.take_along_axis(labs, pos, axis=1)
    # exp((s - s_max) / T): the same argmax as exp(s / T), without overflow at small T.
    weights = jnp.where(labs >= 0, jnp.exp((vals - vals[:, :1]) / temperature), 0.0)
    rows = jnp.arange(queries.shape[0])[:, None]
    preds = []
    for k in ks:
      k = min(k, k_max)
      scores = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
      scores = scores.at[rows, jnp.maximum(labs[:, :k], 0)].add(weights[:, :k])
      preds.append(jnp.argmax(scores, axis=1))
    # Every device holds the same answer; all_gather's result is typed as device-varying,
    # so each returns its copy along the device axis and the host reads one.
    return jnp.stack(preds).astype(jnp.int32)[None]

  rows = _mesh_rows(mesh)
  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(rows, rows, jax.P()),
                               out_specs=rows))


def knn_predict(train_features, train_labels, test_features, *, ks=DEFAULT_KS, temperature=0.07,
                num_classes=None, chunk_size=256, mesh=None):
  """Predicted class of every test row for every k: int32 [len(ks), N_test].

  Features are L2-normalized here (cosine similarity). A k larger than the memory uses the
  whole memory. `mesh` (default: all devices in a 1-D mesh) shards the memory by rows.
  """
  train_features = np.asarray(train_features, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  test_features = np.asarray(test_features, np.float32)
  if len(train_features) == 0:
    raise ValueError("empty k-NN memory")
  if num_classes is None:
    num_classes = int(train_labels.max()) + 1
  mesh = sharding_lib.batch_mesh() if mesh is None else mesh
  shards = mesh.devices.size
  rows = -(-len(train_features) // shards) * shards
  ks = tuple(int(k) for k in ks)
  if min(ks) < 1:
    raise ValueError(f"k-NN needs k >= 1, got ks={ks}.")
  larger = [k for k in ks if k > len(train_features)]
  if larger:
    logging.warning("k-NN: k=%s exceeds the %d train features: those votes use all of them.",
                    ",".join(map(str, larger)), len(train_features))
  k_max = min(max(ks), len(train_features))
  k_local = min(k_max, rows // shards)

  memory = _normalize(_global_rows(train_features, mesh, 0.0, rows))
  memory_labels = _global_rows(train_labels, mesh, -1, rows)
  step = _chunk_predict(mesh, k_local, k_max, ks, float(temperature), int(num_classes))

  n = len(test_features)
  chunk_size = max(1, min(chunk_size, n))
  preds = []
  for start in range(0, n, chunk_size):
    chunk = test_features[start:start + chunk_size]
    valid = len(chunk)
    if valid < chunk_size:  # a fixed chunk shape: one compilation
      chunk = np.concatenate([chunk, np.zeros((chunk_size - valid,) + chunk.shape[1:],
                                              np.float32)])
    out = step(memory, memory_labels, _normalize(_replicated(chunk, mesh)))
    preds.append(np.asarray(out.addressable_data(0))[0, :, :valid])
  return np.concatenate(preds, axis=1)


def knn_classify(train_features, train_labels, test_features, test_labels, *, ks=DEFAULT_KS,
                 temperature=0.07, num_classes=None, chunk_size=256, mesh=None):
  """Top-1 accuracy (%) per k, {k: acc}, of the weighted k-NN vote (see `knn_predict`)."""
  test_labels = np.asarray(test_labels)
  if num_classes is None:
    num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
  preds = knn_predict(train_features, train_labels, test_features, ks=ks,
                      temperature=temperature, num_classes=num_classes,
                      chunk_size=chunk_size, mesh=mesh)
  return {int(k): float(100.0 * np.mean(p == test_labels)) for k, p in zip(ks, preds)}


def knn_monitor(apply_fn, train_batches, eval_batches, *, ks=DEFAULT_KS, temperature=0.07,
                num_classes=None, sharding=None):
  """k-NN accuracy for the training log: {"knn/top1_k{k}": acc}. `apply_fn` is e.g.
  `features.cls_features(teacher, mesh=...)`, the batches are eval-input host batches of a
  train subset (the memory) and of the eval split, `sharding` the batch sharding."""
  train_f, train_y = features_lib.extract_features(apply_fn, train_batches, sharding=sharding,
                                                   name="k-NN monitor, train memory")
  test_f, test_y = features_lib.extract_features(apply_fn, eval_batches, sharding=sharding,
                                                 name="k-NN monitor, evaluation")
  mesh = None if sharding is None else sharding.mesh
  acc = knn_classify(train_f, train_y, test_f, test_y, ks=ks, temperature=temperature,
                     num_classes=num_classes, mesh=mesh)
  return {f"knn/top1_k{k}": v for k, v in acc.items()}


def voted_features(config, features: str = "") -> str:
  """The name of the features k-NN votes on: `features` (a linear-probe convention) when given,
  else the run's own pool (`model.global_pool`: [CLS], or the mean patch token)."""
  return features or config.model.get("global_pool", "cls")


def evaluate_knn(config, model, *, input_fn, dataset=None, data_dir=None, train_split=None,
                 eval_split=None, batch_size=None, ks=None, temperature=None, lowshot=False,
                 lowshot_splits=None, select_split="", select_train_split="",
                 max_train_examples=-1, max_eval_examples=-1, mesh=None, apply_fn=None,
                 features=""):
  """k-NN (and optionally low-shot and validation k-NN) of `model`'s `features.knn_features`
  ([CLS], or the mean patch token for a run trained with `model.global_pool="mean_patch"`), or
  with `features` one of the linear probe's conventions (`features.PROBE_CONVENTIONS`: the last
  4 blocks' [CLS], or [CLS] + mean patch), the concatenation L2-normalized as one vector.

  `input_fn` is the data package's `eval_input` (or a stand-in). `lowshot_splits` maps a
  fraction to a split file (`splits.split_indices`: image names or indices); fractions without
  one use `splits.class_balanced_subset`. `select_split` (e.g. "minival") adds the figure
  "validation": queries from that split, memory `select_train_split` (default
  "train-minival"). `apply_fn` replaces the model's features (`features.pixel_features()`).
  Returns {"full": {k: acc}, "1%": ..., "10%": ..., "validation": ...} (the keys asked for).
  """
  mesh = sharding_lib.batch_mesh() if mesh is None else mesh
  sharding = jax.NamedSharding(mesh, jax.P(tuple(mesh.axis_names)))
  data = splits.override_data(config.data, dataset=dataset, data_dir=data_dir,
                              train_split=train_split, eval_split=eval_split)
  batch_size = batch_size or config.batch_size
  ks = tuple(config.knn_k if ks is None else ks)
  temperature = config.knn_temperature if temperature is None else temperature
  if apply_fn is None and features:
    apply_fn = features_lib.probe_features(model, features, mesh=mesh)
  elif apply_fn is None:
    apply_fn = features_lib.cls_features(model, mesh=mesh, pool=voted_features(config))
  (train_f, train_y), (test_f, test_y), num_classes = features_lib.train_and_eval_features(
      apply_fn, input_fn, data, batch_size=batch_size, sharding=sharding,
      max_train_examples=max_train_examples, max_eval_examples=max_eval_examples)
  run = functools.partial(knn_classify, test_features=test_f, test_labels=test_y, ks=ks,
                          temperature=temperature, num_classes=num_classes, mesh=mesh)
  results = {"full": run(train_f, train_y)}
  if lowshot:
    lowshot_splits = lowshot_splits or {}
    names = lambda: splits.example_names(data, data.train_split)
    for fraction in LOWSHOT_FRACTIONS:
      idx, _ = splits.label_subset(train_y, split_file=lowshot_splits.get(fraction, ""),
                                   fraction=fraction, names=names)
      results[f"{fraction:.0%}"] = run(train_f[idx], train_y[idx])
  if select_split:
    memory = select_train_split or splits.train_without(select_split, data.train_split)
    mem_f, mem_y = features_lib.split_features(
        apply_fn, input_fn, data, split=memory, batch_size=batch_size, sharding=sharding,
        max_examples=max_train_examples)
    val_f, val_y = features_lib.split_features(
        apply_fn, input_fn, data, split=select_split, batch_size=batch_size, sharding=sharding,
        max_examples=max_eval_examples)
    results["validation"] = knn_classify(
        mem_f, mem_y, val_f, val_y, ks=ks, temperature=temperature, mesh=mesh,
        num_classes=max(num_classes, int(max(mem_y.max(), val_y.max())) + 1))
  return results


def format_table(results, ks, baselines=None, names=None):
  """Rows per label subset (and the validation figure), columns per k; each baseline's row under
  the trained one. `names` relabels subsets (e.g. "validation (minival, memory train-minival)")."""
  baselines, names = baselines or {}, names or {}
  rows = []
  for subset, acc in results.items():
    rows += [(f"{names.get(subset, subset)}, {who}", a) for who, a in
             [("trained", acc)] + [(protocol.BASELINE_NAMES[b], r[subset])
                                   for b, r in baselines.items()]]
  width = max(32, 2 + max(len(label) for label, _ in rows))
  lines = [f"{'k-NN top-1 (%)':<{width}}" + "".join(f"{'k=' + str(k):>8}" for k in ks)]
  lines += [f"{label:<{width}}" + "".join(f"{a[k]:8.2f}" for k in ks) for label, a in rows]
  return "\n".join(lines)


# --- the protocol ---------------------------------------------------------------------------------

def _evaluate(loaded, out_dir, **options):
  """`evaluate_knn` of a loaded backbone, with the splits and settings it used."""
  del out_dir
  config, model = loaded
  data = splits.override_data(config.data, dataset=options.get("dataset"),
                              train_split=options.get("train_split"),
                              eval_split=options.get("eval_split"))
  select = options.get("select_split", "")
  return {"top1": evaluate_knn(config, model, **options),
          "features": voted_features(config, options.get("features", "")),
          "ks": tuple(options.get("ks") or config.knn_k),
          "temperature": options.get("temperature") or config.knn_temperature,
          "memory": data.train_split, "reported_on": data.eval_split,
          "selected_on": select or None,
          "validation_memory": (options.get("select_train_split")
                                or splits.train_without(select, data.train_split)) if select
                               else None}


def _names(results) -> dict:
  names = {"full": f"{results['reported_on']} (memory {results['memory']})"}
  if results["selected_on"]:
    names["validation"] = (f"validation {results['selected_on']} (memory "
                           f"{results['validation_memory']})")
  return names


def _table(results, baselines):
  return format_table(results["top1"], results["ks"],
                      {b: r["top1"] for b, r in baselines.items()}, _names(results))


def _as_json(acc):
  return {str(k): v for k, v in acc.items()}


def _baseline_record(results, options):
  """A baseline's top-1 per subset and k, as the trained network's "top1"."""
  del options
  return {name: _as_json(acc) for name, acc in results["top1"].items()}


def _record(results, options):
  as_json = _as_json
  top1 = {name: as_json(acc) for name, acc in results["top1"].items() if name != "validation"}
  record = {"protocol": "knn", "features": results["features"],
            "temperature": results["temperature"],
            "memory": results["memory"], "reported_on": results["reported_on"],
            "selected_on": results["selected_on"], "top1": top1}
  if "validation" in results["top1"]:
    record["validation"] = {"split": results["selected_on"],
                            "memory": results["validation_memory"],
                            "top1": as_json(results["top1"]["validation"])}
  if options.get("lowshot"):
    files = options.get("lowshot_splits") or {}
    record["lowshot_labels"] = {f"{fr:.0%}": splits.describe_labels(files.get(fr, ""), fr)
                                for fr in LOWSHOT_FRACTIONS}
  return record


def _check(options):
  for fraction, path in (options.get("lowshot_splits") or {}).items():
    splits.check_split_file(path, f"--lowshot_split_{fraction:.0%}".replace("%", "pct"))


def _options(f) -> dict:
  from sove_jax.data import pipeline
  files = {0.01: f.lowshot_split_1pct, 0.1: f.lowshot_split_10pct}
  return dict(**splits.data_options(f), input_fn=pipeline.eval_input,
              batch_size=f.batch_size or None, ks=[int(k) for k in f.ks] if f.ks else None,
              temperature=f.temperature, lowshot=f.lowshot or any(files.values()),
              lowshot_splits={k: v for k, v in files.items() if v},
              select_split=f.select_split, select_train_split=f.select_train_split,
              features=f.features)


def _define_flags(flags):
  splits.define_flags(flags)
  flags.DEFINE_list("ks", [], "Neighbor counts (default config.knn_k).")
  flags.DEFINE_float("temperature", None, "Vote temperature (default config.knn_temperature).")
  flags.DEFINE_bool("lowshot", False, "Also report k-NN with 1% and 10% of the train labels.")
  flags.DEFINE_string("lowshot_split_1pct", "", "1% split file: SimCLRv2's 1percent.txt (one "
                      "image name per line) or train indices; default: a random class-balanced "
                      "subset.")
  flags.DEFINE_string("lowshot_split_10pct", "", "10% split file, as above.")
  flags.DEFINE_string("select_split", "", f"Also report the validation figure on this split "
                      f"(e.g. {splits.VALIDATION}), its memory --select_train_split.")
  flags.DEFINE_string("select_train_split", "", "Memory of the validation figure (default: "
                      f"the train split less --select_split, e.g. train-{splits.VALIDATION}).")
  flags.DEFINE_enum("features", "", ("",) + features_lib.PROBE_CONVENTIONS, "Features to vote "
                    "on (default: the run's global representation, its last [CLS]): the linear "
                    "probe's last4_cls or cls_meanpatch, L2-normalized as one vector.")


PROTOCOL = protocol.Protocol(
    name="knn", title="k-NN", evaluate=_evaluate, define_flags=_define_flags, options=_options,
    table=_table, record=_record, check=_check, baselines=protocol.BASELINES,
    default_baselines=("random_init",), baseline_record=_baseline_record)


if __name__ == "__main__":
  protocol.main(PROTOCOL)
