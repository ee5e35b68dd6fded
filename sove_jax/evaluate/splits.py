"""Which data an evaluation reads: the dataset and splits, the validation split it selects on,
and label subsets (split files or class-balanced random subsets).

Every split-based evaluation (k-NN, the linear probe, fine-tuning) starts from the run's data
config, pointed at another dataset or split by flags (`define_flags`, `override_data`). Two
more split names come from the data package (`sove_jax.data.sources`): "minival", a
class-balanced 10,000 of the train split fixed by a seed, and "train-minival", the rest. An
evaluation selects its settings (a probe's learning rate) on minival with train-minival as its
training data, and reports on the test split with the whole train split: the test split is never
read to choose anything.

Label subsets (Table 1's and Table A.1's 1% and 10% of ImageNet) come from split files in
SimCLRv2's format, `imagenet_subsets/1percent.txt`: one image name per line (e.g.
`n01440764_10026.JPEG`), looked up among the train split's file names. A file of integer
indices (into the train split, in the order the evaluation input reads it) works too, for
datasets without file names. Without a file, `class_balanced_subset` draws a random subset, and
the records say so (`describe_labels`).
"""
from __future__ import annotations

import ml_collections
import numpy as np
from etils import epath

from sove_jax import configuration

VALIDATION = "minival"


def train_without(validation: str, train_split: str) -> str:
  """The training split that goes with a validation split: "train-minival" (the train split
  less minival), the data package's name for it."""
  return f"{train_split}-{validation}"


def override_data(data_config, *, dataset=None, data_dir=None, train_split=None,
                  eval_split=None):
  """A copy of the run's data config pointed at another dataset.

  `dataset`: "fashion_mnist" or "folder" set the source; "tfds:NAME" or a bare TFDS name set
  source "tfds" and that name. Empty/None arguments keep the run's values.
  """
  data = ml_collections.ConfigDict(data_config.to_dict())
  if dataset:
    if dataset in ("fashion_mnist", "folder"):
      data.source, data.name = dataset, ""
    else:
      data.source, data.name = "tfds", dataset.removeprefix("tfds:")
  if data_dir:
    data.data_dir = data_dir
  if train_split:
    data.train_split = train_split
  if eval_split:
    data.eval_split = eval_split
  return data


def define_flags(flags):
  """The data flags of the split-based evaluations."""
  flags.DEFINE_string("dataset", "", "Dataset override: fashion_mnist | folder | tfds:NAME "
                      "(or a bare TFDS name). Default: the run's data config.")
  flags.DEFINE_string("data_dir", "", "Override of config.data.data_dir.")
  flags.DEFINE_string("train_split", "", "Override of config.data.train_split (the split "
                      "reported with: the k-NN memory, the probe's final training data).")
  flags.DEFINE_string("eval_split", "", "Override of config.data.eval_split (the split "
                      "reported on).")
  flags.DEFINE_integer("max_train_examples", -1, "Use the first N train examples only (-1: the "
                       "whole split), for quick checks.")
  flags.DEFINE_integer("max_eval_examples", -1, "Evaluate the first N examples only (-1: the "
                       "whole split), for quick checks.")


def data_options(f) -> dict:
  """The keyword arguments of `define_flags`' flags, as the evaluators take them."""
  return dict(dataset=f.dataset, data_dir=f.data_dir, train_split=f.train_split,
              eval_split=f.eval_split, max_train_examples=f.max_train_examples,
              max_eval_examples=f.max_eval_examples)


# --- label subsets --------------------------------------------------------------------------------

def class_balanced_subset(labels, fraction, seed=0):
  """Sorted indices of a deterministic low-shot subset: per class, round(fraction * count)
  examples (at least 1), drawn without replacement with `seed`."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  picked = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    take = max(1, int(round(fraction * len(members))))
    picked.append(rng.choice(members, size=take, replace=False))
  return np.sort(np.concatenate(picked))


def read_split_lines(path) -> list[str]:
  """The entries of a split file: one per line, blank lines and '#' comments skipped."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No split file {path}.")
  lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
  entries = [line for line in lines if line]
  if not entries:
    raise ValueError(f"The split file {path} lists no examples.")
  return entries


def split_indices(path, names=None, num_examples: int | None = None) -> np.ndarray:
  """Sorted train indices of a split file: integer lines are indices; other lines are image
  names (SimCLRv2's files), found in `names` (the train split's file names in input order, with
  or without their folders; or a function giving them, called only for a file of names).
  One-sentence errors for names not found, repeats and indices outside the `num_examples`
  examples used."""
  entries = read_split_lines(path)
  if all(e.lstrip("-").isdigit() for e in entries):
    idx = np.array([int(e) for e in entries], np.int64)
  else:
    names = names() if callable(names) else names
    if names is None:
      raise ValueError(f"{path} lists image names, but this dataset's examples have no file "
                       "names (Fashion-MNIST): use a split file of integer indices.")
    where = {}
    for i, name in enumerate(names):
      where.setdefault(str(name).rsplit("/", 1)[-1], i)
    missing = [e for e in entries if e.rsplit("/", 1)[-1] not in where]
    if missing:
      raise ValueError(f"{path}: {len(missing)} of its {len(entries)} images are not in the train "
                       f"split (e.g. {missing[0]}).")
    idx = np.array([where[e.rsplit("/", 1)[-1]] for e in entries], np.int64)
  if len(np.unique(idx)) != len(idx):
    raise ValueError(f"{path} lists an example twice.")
  if num_examples is not None and len(idx) and (idx.min() < 0 or idx.max() >= num_examples):
    raise ValueError(f"{path} holds indices outside the {num_examples} train examples used.")
  return np.sort(idx)


def example_names(data_config, split: str):
  """The file names of a split's examples in the evaluation input's order (an image folder's
  files, a TFDS split's `file_name` feature), or None for a dataset without names."""
  from sove_jax.data import sources
  source = sources.open_source(data_config, split)
  if isinstance(source, sources.FileSource):
    return [str(p) for p in source.paths]
  if isinstance(source, sources.TfdsSource):
    features = source.builder.info.features
    if "file_name" not in features:
      return None
    import tensorflow_datasets as tfds
    ds = source.builder.as_dataset(split=split, shuffle_files=False,
                                   decoders={source.image_key: tfds.decode.SkipDecoding()})
    return [n.decode() for n in ds.map(lambda ex: ex["file_name"]).as_numpy_iterator()]
  return None


def label_subset(labels, *, split_file: str = "", fraction: float = 1.0, seed: int = 0,
                 names=None):
  """(indices or None for all, description) of the labels an evaluation trains on: a split
  file's (`names` as `split_indices` takes them), a class-balanced random `fraction`, or all.
  The description is what the records say, so a random subset is never mistaken for the
  paper's split."""
  if split_file:
    idx = split_indices(split_file, names, len(labels))
    return idx, f"split file {epath.Path(split_file).name} ({len(idx)} images)"
  if fraction >= 1.0:
    return None, f"all {len(labels)} train labels"
  idx = class_balanced_subset(labels, fraction, seed=seed)
  return idx, (f"random class-balanced {100 * fraction:g}% (seed {seed}, {len(idx)} images; not "
               "SimCLRv2's split)")


def describe_labels(split_file: str = "", fraction: float = 1.0, seed: int = 0) -> str:
  """What `label_subset` takes, in words, for records written without the labels at hand."""
  if split_file:
    return f"split file {epath.Path(split_file).name}"
  if fraction >= 1.0:
    return "all train labels"
  return f"random class-balanced {100 * fraction:g}% (seed {seed}; not SimCLRv2's split)"


def class_count(source, data_config) -> int:
  """Classes of a labeled source: a TFDS split's from its metadata (listing its labels would
  take a pass), else 1 + the largest label."""
  from sove_jax.data import sources
  if isinstance(source, sources.TfdsSource):
    return int(source.builder.info.features[data_config.label_key].num_classes)
  from sove_jax.data import labeled
  return int(labeled.split_labels(source).max()) + 1


def check_split_file(path, flag: str):
  """One-sentence error, before anything loads, for a split file that is not there."""
  if path and not epath.Path(path).exists():
    raise configuration.ConfigError(f"{flag} file {path} does not exist.")
