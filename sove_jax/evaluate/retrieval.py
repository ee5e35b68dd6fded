r"""Image retrieval on revisited Oxford and Paris with frozen features (the paper's Table 5).

The protocol of Radenović et al. (CVPR 2018), "Revisiting Oxford and Paris":
- Every query image is cropped to its ground-truth bounding box before any processing; the
  database images are used whole.
- An image's descriptor is the teacher's [CLS] (final LayerNorm output), L2-normalized; with
  `multiscale`, the mean of the [CLS] at scales 1, 1/sqrt(2) and 1/2 (DINO's multi-scale
  descriptor: GeM pooling over scales with p = 1), then L2-normalized. Images are first brought
  down to `imsize` on their longer side, as DINO's retrieval evaluation does.
- The database is ranked by cosine similarity to each query; average precision is the protocol's
  (precision averaged over the recall steps, each step the trapezoid between the precision just
  before and just at a positive), with the query's junk images removed from the ranking.
- Three setups of increasing difficulty, from the same annotation:
    Easy:   positives = easy;          ignored = hard + junk
    Medium: positives = easy + hard;   ignored = junk
    Hard:   positives = hard;          ignored = easy + junk
  A query without positives in a setup is left out of that setup's mean.
The paper reports Medium and Hard mAP; Easy and mean precision at 1, 5, 10 come along.

The data are the standard layout: DATA_DIR/roxford5k/{jpg/*.jpg, gnd_roxford5k.pkl} (or
DATA_DIR pointing at the dataset folder itself). The ground-truth pickle is read by an unpickler
that builds only lists, dicts, tuples, sets, numbers, strings and NumPy arrays: nothing in the file
can run code.

    python -m sove_jax.evaluate.retrieval --workdir=runs/vits --data_dir=/data/revisitop \
        --dataset=roxford5k [--imsize=224] [--multiscale] [--noquery_crop]

DINO's and iBOT's retrieval scripts feed the whole query image; `--noquery_crop` reproduces
that setting. Results go to WORKDIR/retrieval_<dataset>.json.
"""
import functools
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from sove_jax.evaluate import features as features_lib
from sove_jax.evaluate import images as images_lib

DATASETS = ("roxford5k", "rparis6k")
SETUPS = ("easy", "medium", "hard")
SCALES = (1.0, 2 ** -0.5, 0.5)
KAPPAS = (1, 5, 10)


# --- the ground truth ----------------------------------------------------------------------------

class GroundTruthError(ValueError):
  """A ground-truth file that is unsafe to load or not shaped like the protocol's."""


def _numpy_constructors():
  """What NumPy's own pickles reference, under both the NumPy 1 and NumPy 2 module names."""
  core = getattr(np, "_core", None) or np.core
  table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
  for module in ("numpy.core", "numpy._core"):
    table[(f"{module}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
    table[(f"{module}.multiarray", "scalar")] = core.multiarray.scalar
    table[(f"{module}.numeric", "_frombuffer")] = core.numeric._frombuffer
  return table


def _allowed_globals():
  import _codecs
  import builtins
  table = {}
  for module in ("builtins", "__builtin__"):  # Python 3 and Python 2 pickles
    for name in ("list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "bool",
                 "str", "bytes", "bytearray"):
      table[(module, name)] = getattr(builtins, name)
  table[("__builtin__", "unicode")] = str
  table[("__builtin__", "long")] = int
  table[("_codecs", "encode")] = _codecs.encode  # how protocol-2 pickles store bytes
  table.update(_numpy_constructors())
  return table


class _RestrictedUnpickler(pickle.Unpickler):
  """An unpickler whose only importable names are builtin containers, numbers, strings and
  NumPy's array constructors: anything else (functions, classes, `os.system`) is refused
  before it is looked up, so the file cannot run code."""

  def __init__(self, file, source):
    super().__init__(file, encoding="latin1")  # Python 2 pickles of NumPy arrays need latin1
    self.source = source
    self.allowed = _allowed_globals()

  def find_class(self, module, name):
    try:
      return self.allowed[(module, name)]
    except KeyError:
      raise GroundTruthError(
          f"{self.source} holds a {module}.{name} object, but a ground-truth file needs only "
          "lists, dicts, numbers, strings and NumPy arrays, so it is not loaded (unpickling it "
          "could run code).") from None

  def persistent_load(self, pid):
    raise GroundTruthError(f"{self.source} refers to external objects, which a ground-truth "
                           "file does not need, so it is not loaded.")


def safe_unpickle(data: bytes, source: str = "the pickle"):
  """The object in pickle `data`, built without executing code from it (see
  `_RestrictedUnpickler`); GroundTruthError for anything else or a corrupt file."""
  import io
  try:
    return _RestrictedUnpickler(io.BytesIO(data), source).load()
  except GroundTruthError:
    raise
  except Exception as e:  # truncated, corrupt, not a pickle
    raise GroundTruthError(f"{source} is not a readable pickle ({type(e).__name__}: {e}).") \
        from None


def _indices(value, name, source, n):
  idx = np.asarray(value, dtype=np.float64).reshape(-1)
  if idx.size and (np.any(idx != np.round(idx)) or idx.min() < 0 or idx.max() >= n):
    raise GroundTruthError(f"{source}: {name} holds indices outside the {n} database images.")
  return idx.astype(np.int64)


def check_ground_truth(cfg, source: str = "the ground truth"):
  """The protocol's ground truth from a loaded `gnd_*.pkl` dict: {"imlist": [str] (database),
  "qimlist": [str] (queries), "gnd": [{"easy", "hard", "junk": int64 arrays of database
  indices, "bbx": float64 [4] (x0, y0, x1, y1)}] one per query}."""
  if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
    raise GroundTruthError(f"{source} is not a revisited-protocol ground truth (a dict with "
                           "imlist, qimlist and gnd).")
  imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
  for name, names in (("imlist", imlist), ("qimlist", qimlist)):
    if not all(isinstance(x, str) for x in names):
      raise GroundTruthError(f"{source}: {name} must be a list of image names.")
  if len(gnd) != len(qimlist):
    raise GroundTruthError(f"{source}: {len(gnd)} gnd entries for {len(qimlist)} queries.")
  out = []
  for i, g in enumerate(gnd):
    missing = {"easy", "hard", "junk", "bbx"} - set(g if isinstance(g, dict) else ())
    if missing:
      raise GroundTruthError(f"{source}: query {i} lacks {', '.join(sorted(missing))}.")
    bbx = np.asarray(g["bbx"], np.float64).reshape(-1)
    if bbx.shape != (4,) or bbx[2] <= bbx[0] or bbx[3] <= bbx[1]:
      raise GroundTruthError(f"{source}: query {i} has no valid bbx (x0, y0, x1, y1).")
    out.append({k: _indices(g[k], f"query {i} {k}", source, len(imlist))
                for k in ("easy", "hard", "junk")} | {"bbx": bbx})
  return {"imlist": list(imlist), "qimlist": list(qimlist), "gnd": out}


def load_ground_truth(path):
  """Reads and checks a `gnd_*.pkl` file without executing code from it."""
  return check_ground_truth(safe_unpickle(epath.Path(path).read_bytes(), str(path)), str(path))


# --- average precision ----------------------------------------------------------------------------

def protocol_sets(query, setup: str):
  """(positives, ignored) database indices of one query's ground truth in a setup."""
  if setup == "easy":
    return query["easy"], np.concatenate([query["hard"], query["junk"]])
  if setup == "medium":
    return np.concatenate([query["easy"], query["hard"]]), query["junk"]
  if setup == "hard":
    return query["hard"], np.concatenate([query["easy"], query["junk"]])
  raise ValueError(f"setup must be one of {SETUPS}, got {setup!r}")


def positive_ranks(ranking, positives, ignored):
  """0-based ranks of the positives in `ranking` (database indices, best first) once the
  ignored images are taken out of it."""
  kept = ranking[~np.isin(ranking, ignored)]
  return np.flatnonzero(np.isin(kept, positives))


def average_precision(ranks, num_positives: int) -> float:
  """The protocol's AP: for the j-th positive (0-based) at rank r, the mean of the precision
  just before it (j / r; 1 at r = 0) and at it ((j + 1) / (r + 1)), summed over positives and
  divided by the number of positives (positives never retrieved count zero)."""
  ranks = np.asarray(ranks, np.float64)
  j = np.arange(len(ranks), dtype=np.float64)
  before = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1.0))
  at = (j + 1.0) / (ranks + 1.0)
  return float(np.sum((before + at) / 2.0) / num_positives)


def precision_at(ranks, kappa: int) -> float:
  """The protocol's precision at `kappa`: positives within the first min(kappa, rank of the last
  positive + 1) images, over that count."""
  ranks = np.asarray(ranks) + 1
  cut = min(int(ranks.max()), kappa)
  return float(np.sum(ranks <= cut) / cut)


def evaluate_rankings(rankings, gnd, kappas=KAPPAS):
  """mAP and mean precision at each kappa (%) per setup, from `rankings` [n_queries, n_db]
  (database indices, best first) and the checked ground truth's per-query list.
  Returns {setup: {"mAP": .., "mP@k": .., "queries": number of queries with positives}}."""
  results = {}
  for setup in SETUPS:
    aps, prs = [], []
    for ranking, query in zip(rankings, gnd):
      positives, ignored = protocol_sets(query, setup)
      if len(positives) == 0:
        continue
      ranks = positive_ranks(np.asarray(ranking), positives, ignored)
      aps.append(average_precision(ranks, len(positives)))
      prs.append([precision_at(ranks, k) if len(ranks) else 0.0 for k in kappas])
    entry = {"mAP": 100.0 * float(np.mean(aps)) if aps else float("nan")}
    for k, p in zip(kappas, np.mean(prs, axis=0) if prs else [float("nan")] * len(kappas)):
      entry[f"mP@{k}"] = 100.0 * float(p)
    entry["queries"] = len(aps)
    results[setup] = entry
  return results


def rank_database(database, queries):
  """[n_queries, n_db] database indices by decreasing cosine similarity (rows L2-normalized)."""
  sim = np.asarray(queries, np.float64) @ np.asarray(database, np.float64).T
  return np.argsort(-sim, axis=1, kind="stable")


# --- descriptors ---------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1))
def _descriptor(graphdef, scales, state, images):
  """The L2-normalized mean over `scales` of the [CLS]; each rescaled image (bilinear, as
  DINO's multi-scale) is cut to whole patches."""
  model = nnx.merge(graphdef, state)
  b, h, w, c = images.shape
  patch = model.patch_size
  total = 0.0
  for s in scales:
    x = images
    if s != 1.0:
      x = jax.image.resize(images, (b, int(h * s), int(w * s), c), "linear", antialias=False)
    gh, gw = x.shape[1] // patch, x.shape[2] // patch
    total = total + model(x[:, :gh * patch, :gw * patch])[:, 0].astype(jnp.float32)
  return features_lib.l2_normalize(total / len(scales))


def descriptor_fn(model, *, mesh, multiscale: bool = False):
  """images [b, H, W, 3] -> L2-normalized global descriptors [b, D] (see `_descriptor`)."""
  graphdef, state = images_lib.replicated_state(model, mesh)
  scales = SCALES if multiscale else (1.0,)
  return functools.partial(_descriptor, graphdef, scales, state)


def crop_box(bbx, width: int, height: int):
  """Integer (x0, y0, x1, y1) of a float box as PIL's crop rounds it, inside the image."""
  x0, y0, x1, y1 = (round(float(v)) for v in bbx)
  x0, x1 = min(max(x0, 0), width), min(max(x1, 0), width)
  y0, y1 = min(max(y0, 0), height), min(max(y1, 0), height)
  return x0, y0, x1, y1


class ImageSpec:
  """One image of the protocol: a file, an optional crop box, the longer-side size and patch;
  knows its array shape without decoding and loads itself normalized."""

  def __init__(self, path, box, *, imsize, patch, mean, std, scales):
    self.path, self.box, self.imsize, self.patch = path, box, imsize, patch
    self.mean, self.std = mean, std
    width, height = images_lib.image_size(path)
    if box is not None:
      x0, y0, x1, y1 = self.box = crop_box(box, width, height)
      width, height = x1 - x0, y1 - y0
      if width < 1 or height < 1:
        raise ValueError(f"the query box {tuple(box)} lies outside {path}")
    self.resized = images_lib.longer_side_size(width, height, imsize) if imsize else (
        width, height)
    w, h = self.resized
    smallest = min(int(w // patch * patch * s) for s in scales), min(
        int(h // patch * patch * s) for s in scales)
    if min(smallest) < patch:
      raise ValueError(f"{path}{' cropped' if box is not None else ''} is {w}x{h} px after "
                       f"resizing, smaller than one {patch}-px patch at scale {min(scales):g}; "
                       "use a larger --imsize or no --multiscale")
    self.shape = images_lib.patch_multiple(w, h, patch)[::-1] + (3,)

  def load(self):
    image = images_lib.read_image(self.path)
    if self.box is not None:
      image = image.crop(self.box)
    if image.size != self.resized:
      image = image.resize(self.resized, Image.LANCZOS)
    x = images_lib.to_array(image, self.mean, self.std)
    return x[:self.shape[0], :self.shape[1]]


def dataset_dir(data_dir, dataset):
  """The folder that holds gnd_<dataset>.pkl: DATA_DIR/<dataset> or DATA_DIR itself."""
  if dataset not in DATASETS:
    raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
  if not data_dir:
    raise ValueError("--data_dir is required: the folder holding "
                     f"{dataset}/jpg and {dataset}/gnd_{dataset}.pkl")
  root = epath.Path(data_dir)
  for candidate in (root / dataset, root):
    if (candidate / f"gnd_{dataset}.pkl").exists():
      return candidate
  raise FileNotFoundError(f"no gnd_{dataset}.pkl in {root / dataset} or {root}")


def evaluate_retrieval(config, model, *, data_dir, dataset, imsize=224, multiscale=False,
                       query_crop=True, batch_size=0, mesh=None, kappas=KAPPAS):
  """Revisited-protocol retrieval of `model`'s [CLS] descriptors on `dataset` under
  `data_dir`. Returns {"easy"|"medium"|"hard": {"mAP", "mP@k", "queries"}, "database": n,
  "queries": n} (percentages)."""
  root = dataset_dir(data_dir, dataset)
  gt = load_ground_truth(root / f"gnd_{dataset}.pkl")
  mesh = features_lib.batch_mesh() if mesh is None else mesh
  scales = SCALES if multiscale else (1.0,)
  spec = functools.partial(ImageSpec, imsize=imsize, patch=model.patch_size,
                           mean=tuple(config.data.mean), std=tuple(config.data.std),
                           scales=scales)
  jpg = root / "jpg"
  database = [spec(jpg / f"{name}.jpg", None) for name in gt["imlist"]]
  queries = [spec(jpg / f"{name}.jpg", g["bbx"] if query_crop else None)
             for name, g in zip(gt["qimlist"], gt["gnd"])]
  apply_fn = descriptor_fn(model, mesh=mesh, multiscale=multiscale)
  run = functools.partial(images_lib.map_images, apply_fn, load=lambda s: s.load(),
                          shape_of=lambda s: s.shape, mesh=mesh, batch_size=batch_size)
  db_features = run(database, description=f"{dataset} database")
  query_features = run(queries, description=f"{dataset} queries")
  results = evaluate_rankings(rank_database(db_features, query_features), gt["gnd"], kappas)
  results.update(database=len(database), queries=len(queries))
  return results


def format_table(dataset, results, kappas=KAPPAS):
  """One row per setup: mAP and mP@k (%)."""
  cols = ["mAP"] + [f"mP@{k}" for k in kappas]
  lines = [f"{dataset:<12}" + "".join(f"{c:>8}" for c in cols)]
  for setup in SETUPS:
    lines.append(f"{setup:<12}" + "".join(f"{results[setup][c]:8.2f}" for c in cols))
  return "\n".join(lines)


def evaluate_checkpoint(workdir, *, load_backbone, dataset, step=None, **kwargs):
  """Loads the teacher of `workdir` (latest or `step`), runs `evaluate_retrieval`, prints the
  table and writes `retrieval_<dataset>.json` into the workdir (process 0)."""
  load_ground_truth(dataset_dir(kwargs.get("data_dir"), dataset) / f"gnd_{dataset}.pkl")
  loaded = load_backbone(workdir, step=step, which="teacher")  # data checked first
  config, model = loaded
  step = getattr(loaded, "step", step)  # the checkpoint read (backbone.LoadedBackbone)
  results = evaluate_retrieval(config, model, dataset=dataset, **kwargs)
  if jax.process_index() == 0:
    print(format_table(dataset, results))
    record = {"step": "latest" if step is None else step, "dataset": dataset,
              "imsize": kwargs.get("imsize", 224),
              "multiscale": bool(kwargs.get("multiscale", False)),
              "query_crop": bool(kwargs.get("query_crop", True)), **results}
    (epath.Path(workdir) / f"retrieval_{dataset}.json").write_text(json.dumps(record, indent=2))
  return results


def main(argv):
  del argv
  from absl import flags

  from sove_jax.evaluate import backbone
  f = flags.FLAGS
  evaluate_checkpoint(f.workdir, load_backbone=backbone.load_backbone, step=f.step,
                      dataset=f.dataset, data_dir=f.data_dir, imsize=f.imsize,
                      multiscale=f.multiscale, query_crop=f.query_crop,
                      batch_size=f.batch_size)


def _define_flags():
  from absl import flags
  images_lib.define_backbone_flags(flags)
  flags.DEFINE_string("data_dir", None, "Folder holding <dataset>/jpg and "
                      "<dataset>/gnd_<dataset>.pkl (or the dataset folder itself).",
                      required=True)
  flags.DEFINE_enum("dataset", "roxford5k", DATASETS, "Revisited dataset.")
  flags.DEFINE_integer("imsize", 224, "Longer image side, px (images are never enlarged); "
                       "0 keeps the original size.")
  flags.DEFINE_bool("multiscale", False, "Average the [CLS] over scales 1, 1/sqrt(2), 1/2.")
  flags.DEFINE_bool("query_crop", True, "Crop queries to their bounding box (the protocol); "
                    "--noquery_crop feeds whole query images as DINO's script does.")


if __name__ == "__main__":
  from absl import app

  from sove_jax import reporting
  _define_flags()
  app.run(reporting.command(main))
