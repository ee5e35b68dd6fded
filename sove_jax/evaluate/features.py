"""Frozen-backbone features for the evaluation protocols (docs/method.md §12).

Evaluation runs the teacher backbone once over a split and keeps the features on the host:
k-NN and the linear probe then work on arrays, not on images. This module holds which features a
backbone gives (`knn_features`, the one definition the trainer's k-NN monitor shares;
`cls_features`, `probe_features`) and how a split is run through it on the mesh
(`extract_features`).
"""
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sove_jax import reporting
from sove_jax.models import network
from sove_jax.models.head import l2_normalize
from sove_jax.models.network import GLOBAL_POOLS

PROBE_CONVENTIONS = ("last4_cls", "cls_meanpatch")


def knn_features(backbone, images, pool: str = "cls"):
  """float32 [B, D]: the k-NN features of `images` [B, H, W, 3], the backbone's global
  representation (`pool`: its final-LayerNorm [CLS], or the mean of its patch tokens) divided by
  max(norm, 1e-12), as torch's `normalize` in DINO's k-NN. A pure function of the module, for
  use inside a jitted function: `evaluate.knn` and the trainer's k-NN monitor both call it, so
  the monitor's figures are the evaluator's."""
  return l2_normalize(network.global_pool(backbone(images), pool))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _backbone_features(graphdef, convention, last_blocks, state, images):
  """One jitted forward for every backbone of a structure; parameters are arguments, not
  constants, so another backbone of the same structure reuses the compiled function."""
  model = nnx.merge(graphdef, state)
  if convention in GLOBAL_POOLS:
    return knn_features(model, images, convention)
  if convention == "last4_cls":
    _, blocks = model(images, return_blocks=last_blocks)
    return jnp.concatenate([b[:, 0] for b in blocks], axis=-1).astype(jnp.float32)
  if convention == "cls_meanpatch":
    tokens = model(images)
    feats = jnp.concatenate([tokens[:, 0], jnp.mean(tokens[:, 1:], axis=1)], axis=-1)
    return feats.astype(jnp.float32)
  raise ValueError(f"unknown feature convention {convention!r}")


@jax.jit
def _pixel_features(images):
  return l2_normalize(images.reshape(images.shape[0], -1).astype(jnp.float32))


def pixel_features():
  """The raw-pixel baseline: each normalized evaluation image flattened and L2-normalized, the
  features a k-NN or a probe sees without any network."""
  return _pixel_features


def _apply_fn(model, convention, mesh):
  # "last4_cls" on a backbone shallower than 4 blocks (smoke runs) takes all its blocks.
  last_blocks = min(4, getattr(model, "depth", 4))
  graphdef, state = nnx.split(model)
  if mesh is not None:
    # Images arrive sharded over `mesh`; parameters living elsewhere (one device, another
    # mesh) would make the jitted forward reject its arguments, so they are replicated.
    replicated = jax.NamedSharding(mesh, jax.P())

    def place(x):
      s = getattr(x, "sharding", None)
      on_mesh = isinstance(s, jax.NamedSharding) and s.mesh == mesh
      return x if on_mesh else jax.device_put(x, replicated)

    state = jax.tree.map(place, state)
  return functools.partial(_backbone_features, graphdef, convention, last_blocks, state)


def cls_features(model, *, mesh=None, pool: str = "cls"):
  """images -> `knn_features` of `model` (jitted; parameters placed on `mesh`): the
  L2-normalized [CLS], or with `pool="mean_patch"` the mean patch token (a run trained with
  `model.global_pool="mean_patch"`, whose [CLS] token no loss trained)."""
  if pool not in GLOBAL_POOLS:
    raise ValueError(f"pool must be one of {GLOBAL_POOLS}, got {pool!r}")
  return _apply_fn(model, pool, mesh)


def probe_features(model, convention, *, mesh=None):
  """images -> linear-probe features, by the official conventions: "last4_cls", the concat
  of the last 4 blocks' (LayerNorm-ed) [CLS] (ViT-S; all blocks of a shallower model; a Swin's
  last 4 blocks' token averages, of their stages' widths), or "cls_meanpatch", the last
  block's [CLS] ++ the mean of its patch tokens (ViT-B and up)."""
  if convention not in PROBE_CONVENTIONS:
    raise ValueError(f"convention must be one of {PROBE_CONVENTIONS}, got {convention!r}")
  return _apply_fn(model, convention, mesh)


def default_probe_convention(model_config):
  """The official choice per size: 4 blocks of [CLS] for ViT-Ti/S, [CLS] + mean patch above;
  [CLS] + mean patch as well for a run whose global representation was the mean patch token
  (`model.global_pool`), so the probe sees what the run trained; for a Swin (whose [CLS] role is
  already the mean of its tokens) the average-pooled tokens of its last 4 blocks, as iBOT probes
  its Swins."""
  if model_config.get("arch", "vit") == "swin":
    return "last4_cls"
  if model_config.get("global_pool", "cls") == "mean_patch":
    return "cls_meanpatch"
  return "cls_meanpatch" if model_config.variant in ("b", "l") else "last4_cls"


@functools.lru_cache(maxsize=None)
def _gather_to_replicated(mesh):
  """Every process needs the whole result; an identity with a replicated output is the
  all-gather that works across processes too."""
  return jax.jit(lambda *xs: xs, out_shardings=jax.NamedSharding(mesh, jax.P()))


def _row_sharding(sharding):
  """The batch sharding restricted to the leading axis, for labels and the valid mask."""
  spec = tuple(sharding.spec)
  return jax.NamedSharding(sharding.mesh, jax.P(spec[0] if spec else None))


def extract_features(apply_fn, batches, *, sharding=None, name="features"):
  """Runs `apply_fn` (images -> [b, D]) over eval host batches and returns the valid rows.

  With `sharding` (a NamedSharding of the batch axis) each host batch becomes one global array
  on the mesh, as the data package does, and the outputs, labels and valid masks are gathered
  back in global order; so every process returns the whole split, in the same order. A pass
  longer than `PROGRESS_EVERY_SECONDS` logs its progress (`name`, batches done, images/s, ETA).
  Returns (features float32 [N, D], labels int32 [N]).
  """
  feats, labels = [], []
  pending = None
  progress = _Progress(name, getattr(batches, "num_batches", None))

  def collect(out):
    f, y, v = (np.asarray(x) for x in out)
    feats.append(f[v].astype(np.float32))
    labels.append(y[v].astype(np.int32))

  for batch in batches:
    if sharding is None:
      out = (apply_fn(batch["image"]), batch["label"], np.asarray(batch["valid"], bool))
    else:
      rows = _row_sharding(sharding)
      images = jax.make_array_from_process_local_data(sharding, np.asarray(batch["image"]))
      label = jax.make_array_from_process_local_data(rows, np.asarray(batch["label"]))
      valid = jax.make_array_from_process_local_data(rows, np.asarray(batch["valid"], bool))
      out = _gather_to_replicated(sharding.mesh)(apply_fn(images), label, valid)
      out = tuple(x.addressable_data(0) for x in out)
    # One batch in flight: the device computes batch i+1 while the host copies batch i.
    if pending is not None:
      collect(pending)
    pending = out
    progress.update(len(batch["image"]))
  if pending is not None:
    collect(pending)
  if not feats:
    raise ValueError("no batches to extract features from")
  return np.concatenate(feats), np.concatenate(labels)


PROGRESS_EVERY_SECONDS = 30.0


class _Progress:
  """A console line every PROGRESS_EVERY_SECONDS of a long feature pass (process 0)."""

  def __init__(self, name: str, total_batches):
    self.name, self.total = name, total_batches
    self.start = self.last = time.monotonic()
    self.batches = self.images = 0

  def update(self, images: int):
    self.batches += 1
    self.images += images
    now = time.monotonic()
    if now - self.last < PROGRESS_EVERY_SECONDS:
      return
    self.last = now
    rate = self.batches / max(now - self.start, 1e-9)
    line = f"{self.name}: {self.batches}"
    if self.total:
      line += (f"/{self.total} batches, ETA "
               f"{reporting.duration((self.total - self.batches) / rate)}")
    else:
      line += " batches"
    reporting.say(f"{line} ({self.images / (now - self.start):,.0f} images/s per process)")


def split_features(apply_fn, input_fn, data_config, *, split, batch_size, sharding,
                   max_examples=-1):
  """Features and labels of one split, through the data package's `eval_input`-like
  `input_fn` (passed in, so that TensorFlow is imported only by the commands)."""
  batches = input_fn(data_config, split=split, global_batch_size=batch_size,
                     max_examples=max_examples)
  return extract_features(apply_fn, batches, sharding=sharding, name=f"features of {split}")


def train_and_eval_features(apply_fn, input_fn, data_config, *, batch_size, sharding,
                            max_train_examples=-1, max_eval_examples=-1):
  """((train features, labels), (eval features, labels), number of classes) of a run's two
  splits, as `split_features` gives them."""
  train = split_features(apply_fn, input_fn, data_config, split=data_config.train_split,
                         batch_size=batch_size, sharding=sharding, max_examples=max_train_examples)
  test = split_features(apply_fn, input_fn, data_config, split=data_config.eval_split,
                        batch_size=batch_size, sharding=sharding, max_examples=max_eval_examples)
  return train, test, int(max(train[1].max(), test[1].max())) + 1
