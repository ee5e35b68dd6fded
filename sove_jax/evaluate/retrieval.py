r"""Image retrieval on revisited Oxford and Paris with frozen features (the paper's Table 5).

The revisited protocol of Radenović et al. (CVPR 2018), as the authors run it (`--protocol=paper`,
the default: `paris_oxford_reid` in their `run.sh` and iBOT's, DINO's `eval_image_retrieval.py`
with `--imsize 512 --multiscale 1`):
- Every image, database and query alike, is used whole, brought down to 512 px on its longer
  side as PIL's `thumbnail` does (aspect kept, never enlarged, Lanczos).
- Its descriptor is the teacher's [CLS] (final LayerNorm output); with `multiscale`, the mean of
  the [CLS] of the whole image at scales 1, 1/sqrt(2) and 1/2 (the image resized bilinearly to
  floor(side x scale), as `F.interpolate(scale_factor=s)`; the patch embedding drops what does
  not fill a patch), then L2-normalized.
- The database is ranked by cosine similarity to each query; average precision is the protocol's
  (precision averaged over the recall steps, each step the trapezoid between the precision just
  before and just at a positive), with the query's junk images removed from the ranking.
- Three setups of increasing difficulty, from the same annotation:
    Easy:   positives = easy;          ignored = hard + junk
    Medium: positives = easy + hard;   ignored = junk
    Hard:   positives = hard;          ignored = easy + junk
  A query without positives in a setup is left out of that setup's mean.
The paper reports Medium and Hard mAP; Easy and mean precision at 1, 5, 10 come along.

`--protocol=cropped224` is the revisited protocol's own query handling at DINO's default size:
queries cropped to their ground-truth box, 224 px, one scale. `--imsize`, `--multiscale` and
`--query_crop` change one setting of either; the record then names the protocol with the change
(`paper+imsize=224`).

The data are the standard layout: DATA_DIR/roxford5k/{jpg/*.jpg, gnd_roxford5k.pkl} (or
DATA_DIR pointing at the dataset folder itself). The ground-truth pickle is read by an unpickler
that builds only lists, dicts, tuples, sets, numbers, strings and NumPy arrays: nothing in the file
can run code.

    python -m sove_jax.evaluate.retrieval --workdir=runs/vits --data_dir=/data/revisitop \
        --dataset=roxford5k [--protocol=cropped224]

Results go to OUT_DIR/retrieval_<dataset>.json.
"""
import functools
import json
import pickle

import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from sove_jax import sharding as sharding_lib
from sove_jax.evaluate import features as features_lib
from sove_jax.evaluate import images as images_lib
from sove_jax.evaluate import protocol

DATASETS = ("roxford5k", "rparis6k")
SETUPS = ("easy", "medium", "hard")
SCALES = (1.0, 2 ** -0.5, 0.5)
KAPPAS = (1, 5, 10)
PROTOCOLS = {
    "paper": dict(imsize=512, multiscale=True, query_crop=False),
    "cropped224": dict(imsize=224, multiscale=False, query_crop=True),
}


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

def rescale(images, scale: float):
  """[b, H, W, c] -> [b, floor(H s), floor(W s), c] by bilinear interpolation at exactly `scale`
  (source pixel (x + 0.5) / s - 0.5, no antialiasing), as `F.interpolate(scale_factor=s,
  mode="bilinear", align_corners=False)`."""
  b, h, w, c = images.shape
  shape = (b, int(math.floor(h * scale)), int(math.floor(w * scale)), c)
  return jax.image.scale_and_translate(images, shape, (1, 2), jnp.full((2,), scale, jnp.float32),
                                       jnp.zeros((2,), jnp.float32), "linear", antialias=False)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _descriptor(graphdef, scales, state, images):
  """The L2-normalized mean over `scales` of the [CLS] of the whole image rescaled."""
  model = nnx.merge(graphdef, state)
  total = 0.0
  for s in scales:
    x = images if s == 1.0 else rescale(images, s)
    total = total + model(x)[:, 0].astype(jnp.float32)
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


def thumbnail_size(width: int, height: int, size: int) -> tuple[int, int]:
  """(width, height) of PIL's `thumbnail((size, size))`: unchanged when both sides fit; else the
  longer side becomes `size` and the other the floor or the ceiling of its exact scaled value,
  whichever keeps the aspect ratio closer (at least 1)."""
  if width <= size and height <= size:
    return width, height
  aspect = width / height
  if width >= height:
    exact = size / aspect
    other = min((max(math.floor(exact), 1), max(math.ceil(exact), 1)),
                key=lambda n: abs(aspect - size / n))
    return size, other
  exact = size * aspect
  other = min((max(math.floor(exact), 1), max(math.ceil(exact), 1)),
              key=lambda n: abs(aspect - n / size))
  return other, size


class ImageSpec:
  """One image of the protocol: a file, an optional crop box, the longer-side size; knows its
  array shape without decoding and loads itself normalized, whole (the backbone drops what does
  not fill a patch, at every scale)."""

  def __init__(self, path, box, *, imsize, stride, mean, std, scales):
    self.path, self.box, self.imsize = path, box, imsize
    self.mean, self.std = mean, std
    width, height = images_lib.image_size(path)
    if box is not None:
      x0, y0, x1, y1 = self.box = crop_box(box, width, height)
      width, height = x1 - x0, y1 - y0
      if width < 1 or height < 1:
        raise ValueError(f"the query box {tuple(box)} lies outside {path}")
    w, h = thumbnail_size(width, height, imsize) if imsize else (width, height)
    smallest = min(math.floor(min(w, h) * s) for s in scales)
    if smallest < stride:
      raise ValueError(f"{path}{' cropped' if box is not None else ''} is {w}x{h} px after "
                       f"resizing, smaller than one {stride}-px patch at scale {min(scales):g}; "
                       "use a larger --imsize or no --multiscale")
    self.shape = (h, w, 3)

  def load(self):
    image = images_lib.read_image(self.path)
    if self.box is not None:
      image = image.crop(self.box)
    if self.imsize:
      image.thumbnail((self.imsize, self.imsize), Image.LANCZOS)
    if image.size != self.shape[1::-1]:  # a PIL whose thumbnail rounds otherwise
      image = image.resize(self.shape[1::-1], Image.LANCZOS)
    return images_lib.to_array(image, self.mean, self.std)


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


def settings(protocol_name: str = "paper", *, imsize=None, multiscale=None, query_crop=None):
  """(the protocol's name as records give it, its settings): a preset of `PROTOCOLS`, each
  setting replaced by one given (not None); a changed setting is named after the preset."""
  if protocol_name not in PROTOCOLS:
    raise ValueError(f"--protocol={protocol_name!r} is not one of {', '.join(PROTOCOLS)}.")
  preset = PROTOCOLS[protocol_name]
  given = dict(imsize=imsize, multiscale=multiscale, query_crop=query_crop)
  chosen = {k: preset[k] if v is None else type(preset[k])(v) for k, v in given.items()}
  changed = [f"{k}={chosen[k]}" for k in preset if chosen[k] != preset[k]]
  return "+".join([protocol_name] + changed), chosen


def evaluate_retrieval(config, model, *, data_dir, dataset, protocol_name="paper", imsize=None,
                       multiscale=None, query_crop=None, batch_size=0, mesh=None, kappas=KAPPAS):
  """Revisited-protocol retrieval of `model`'s [CLS] descriptors on `dataset` under
  `data_dir`, by the protocol `settings` gives. Returns {"protocol", "imsize", "multiscale",
  "query_crop", "easy"|"medium"|"hard": {"mAP", "mP@k", "queries"}, "database": n,
  "queries": n} (percentages)."""
  name, chosen = settings(protocol_name, imsize=imsize, multiscale=multiscale,
                          query_crop=query_crop)
  root = dataset_dir(data_dir, dataset)
  gt = load_ground_truth(root / f"gnd_{dataset}.pkl")
  mesh = sharding_lib.batch_mesh() if mesh is None else mesh
  scales = SCALES if chosen["multiscale"] else (1.0,)
  spec = functools.partial(ImageSpec, imsize=chosen["imsize"],
                           stride=images_lib.token_stride(model), mean=tuple(config.data.mean),
                           std=tuple(config.data.std), scales=scales)
  jpg = root / "jpg"
  database = [spec(jpg / f"{name_}.jpg", None) for name_ in gt["imlist"]]
  queries = [spec(jpg / f"{q}.jpg", g["bbx"] if chosen["query_crop"] else None)
             for q, g in zip(gt["qimlist"], gt["gnd"])]
  apply_fn = descriptor_fn(model, mesh=mesh, multiscale=chosen["multiscale"])
  run = functools.partial(images_lib.map_images, apply_fn, load=lambda s: s.load(),
                          shape_of=lambda s: s.shape, mesh=mesh, batch_size=batch_size)
  db_features = run(database, description=f"{dataset} database")
  query_features = run(queries, description=f"{dataset} queries")
  results = evaluate_rankings(rank_database(db_features, query_features), gt["gnd"], kappas)
  return {"protocol": f"retrieval_{name}", "dataset": dataset, **chosen, **results,
          "database": len(database), "queries": len(queries)}


def format_table(dataset, results, kappas=KAPPAS, baselines=None):
  """One row per setup: mAP and mP@k (%); each baseline's rows after the trained network's."""
  cols = ["mAP"] + [f"mP@{k}" for k in kappas]
  lines = [f"{dataset:<24}" + "".join(f"{c:>8}" for c in cols)]
  for who, res in [("trained", results)] + [(protocol.BASELINE_NAMES[b], r)
                                            for b, r in (baselines or {}).items()]:
    for setup in SETUPS:
      lines.append(f"{setup + ', ' + who:<24}"
                   + "".join(f"{res[setup][c]:8.2f}" for c in cols))
  return "\n".join(lines)


# --- the protocol ---------------------------------------------------------------------------------

def _evaluate(loaded, out_dir, **options):
  del out_dir
  return evaluate_retrieval(*loaded, **options)


def _check(options):
  settings(options.get("protocol_name", "paper"))
  load_ground_truth(dataset_dir(options.get("data_dir"), options["dataset"])
                    / f"gnd_{options['dataset']}.pkl")


def _options(f) -> dict:
  return dict(dataset=f.dataset, data_dir=f.data_dir, protocol_name=f.protocol,
              imsize=f.imsize, multiscale=f.multiscale, query_crop=f.query_crop,
              batch_size=f.batch_size)


def _define_flags(flags):
  flags.DEFINE_string("data_dir", None, "Folder holding <dataset>/jpg and "
                      "<dataset>/gnd_<dataset>.pkl (or the dataset folder itself).",
                      required=True)
  flags.DEFINE_enum("dataset", "roxford5k", DATASETS, "Revisited dataset.")
  flags.DEFINE_enum("protocol", "paper", tuple(PROTOCOLS), "paper: 512 px, multiscale, whole "
                    "queries (the authors' run); cropped224: queries cropped to their box, 224 "
                    "px, one scale.")
  flags.DEFINE_integer("imsize", None, "Longer image side, px (never enlarged; 0 keeps the "
                       "original size); default the protocol's.")
  flags.DEFINE_bool("multiscale", None, "Average the [CLS] over scales 1, 1/sqrt(2), 1/2; "
                    "default the protocol's.")
  flags.DEFINE_bool("query_crop", None, "Crop queries to their bounding box; default the "
                    "protocol's.")


PROTOCOL = protocol.Protocol(
    name="retrieval", title="retrieval", evaluate=_evaluate, define_flags=_define_flags,
    options=_options, table=lambda r, b: format_table(r["dataset"], r, baselines=b),
    record=lambda results, options: dict(results), check=_check,
    result_name=lambda options: f"retrieval_{options['dataset']}",
    baselines=("random_init",))


if __name__ == "__main__":
  protocol.main(PROTOCOL)
