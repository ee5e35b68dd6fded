r"""ViT backbone weights to and from PyTorch, in the DINO/iBOT `vision_transformer.py` key layout.

    python -m sove_jax.interop.torch_weights export --workdir=runs/vits --out=teacher.safetensors
    python -m sove_jax.interop.torch_weights export --workdir=runs/vits --out=teacher.pth
    python -m sove_jax.interop.torch_weights import --checkpoint=dino_vitsmall16.pth --variant=s

Why: released DINO/iBOT/SOP weights can then be evaluated with this project's probes (every
evaluation takes `--weights=FILE --arch=vit_small`: `sove_jax.interop.released`), and our
teachers can be evaluated with theirs. Layout (D width, H heads, Dh = D / H, p patch, C channels):

    PyTorch key                      shape        our parameter               shape
    patch_embed.proj.weight          [D, C, p, p] patch_embed.kernel          [p, p, C, D]
    patch_embed.proj.bias            [D]          patch_embed.bias            [D]
    cls_token / pos_embed            same         cls_token / pos_embed       same
    blocks.{i}.norm{1,2}.weight/bias [D]          blocks[i].norm{1,2}.scale/bias
    blocks.{i}.attn.qkv.weight       [3D, D]      blocks[i].attn.qkv.kernel   [D, 3, H, Dh]
    blocks.{i}.attn.qkv.bias         [3D]         blocks[i].attn.qkv.bias     [3, H, Dh]
    blocks.{i}.attn.proj.weight      [D, D]       blocks[i].attn.proj.kernel  [H, Dh, D]
    blocks.{i}.mlp.fc{1,2}.weight    [out, in]    blocks[i].mlp.fc{1,2}.kernel [in, out]
    norm.weight / norm.bias          [D]          norm.scale / norm.bias
    masked_embed (iBOT, SOP)         [1, D]       mask_token                  [1, D]

The qkv output index is (q/k/v, head, dim) flattened row-major, as DINO's `reshape(B, N, 3, H,
Dh)`; the projection input index is (head, dim), as its `transpose(1, 2).reshape(B, N, C)`.

Position embeddings: at the trained resolution both sides add `pos_embed` as is. At other sizes
DINO, iBOT and the authors' code resize the patch grid with `F.interpolate(scale_factor=(grid +
0.1) / sqrt(N), mode="bicubic")`, which samples slightly different source positions than a
resize to the target size. Imported weights therefore get our ViT's `pos_interpolation="dino"`,
which computes exactly theirs (`import_weights(..., pos_interpolation=None)` keeps the model's
own); the export records the mode its model used.

Which state dict of a file is read (a flat one, a training checkpoint's teacher or student,
iBOT's {"state_dict": ...}), with its wrapper prefixes stripped and its head set aside:
`weight_files.select_backbone`.

torch is optional: it is imported only by the `.pth` functions (`weight_files`).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping

import numpy as np
from absl import logging
from flax import traverse_util

from sove_jax.interop import weight_files

MASK_KEY = "masked_embed"
# Which state dict of a file, its prefixes and head keys: weight_files (re-exported here).
select_backbone = weight_files.select_backbone
select_head_layer = weight_files.select_head_layer


class MaskTokenNotLoaded(UserWarning):
  """The checkpoint has no `masked_embed` (DINO): our mask token was not loaded."""

# Conversion kinds: "same" (no change), "conv" (OIHW <-> HWIO), "linear<n>" (a Dense kernel with
# n input axes <-> a [out, in] Linear weight), "flat" (multi-axis bias <-> [out]).
_TOP = {
    ("cls_token",): ("cls_token", "same"),
    ("pos_embed",): ("pos_embed", "same"),
    ("patch_embed", "kernel"): ("patch_embed.proj.weight", "conv"),
    ("patch_embed", "bias"): ("patch_embed.proj.bias", "same"),
    ("norm", "scale"): ("norm.weight", "same"),
    ("norm", "bias"): ("norm.bias", "same"),
    ("mask_token",): (MASK_KEY, "same"),
}
_BLOCK = {
    ("norm1", "scale"): ("norm1.weight", "same"),
    ("norm1", "bias"): ("norm1.bias", "same"),
    ("attn", "qkv", "kernel"): ("attn.qkv.weight", "linear1"),
    ("attn", "qkv", "bias"): ("attn.qkv.bias", "flat"),
    ("attn", "proj", "kernel"): ("attn.proj.weight", "linear2"),
    ("attn", "proj", "bias"): ("attn.proj.bias", "same"),
    ("norm2", "scale"): ("norm2.weight", "same"),
    ("norm2", "bias"): ("norm2.bias", "same"),
    ("mlp", "fc1", "kernel"): ("mlp.fc1.weight", "linear1"),
    ("mlp", "fc1", "bias"): ("mlp.fc1.bias", "same"),
    ("mlp", "fc2", "kernel"): ("mlp.fc2.weight", "linear1"),
    ("mlp", "fc2", "bias"): ("mlp.fc2.bias", "same"),
}
_TOP_ORDER = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
_END_ORDER = ("norm.weight", "norm.bias", MASK_KEY)


# ------------------------------------------------------------------ layout conversions

def _torch_shape(kind: str, shape) -> tuple:
  """PyTorch shape of a parameter of JAX shape `shape` (for error messages and checks)."""
  shape = tuple(shape)
  if kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if kind.startswith("linear"):
    n = int(kind[6:])
    return (math.prod(shape[n:]), math.prod(shape[:n]))
  if kind == "flat":
    return (math.prod(shape),)
  return shape


def _to_torch_layout(a: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    a = a.transpose(3, 2, 0, 1)
  elif kind.startswith("linear"):
    n = int(kind[6:])
    a = a.reshape(math.prod(a.shape[:n]), -1).T
  elif kind == "flat":
    a = a.reshape(-1)
  return np.array(a, order="C")  # an owned, writable copy (jax buffers are read-only)


def _from_torch_layout(w: np.ndarray, kind: str, shape) -> np.ndarray:
  if kind == "conv":
    w = w.transpose(2, 3, 1, 0)
  elif kind.startswith("linear"):
    w = w.T
  return np.ascontiguousarray(w).reshape(shape)


# ------------------------------------------------------------------ parameter trees

def _pure_params(obj) -> dict:
  """Nested dict of backbone parameters from a ViT module, an nnx.State or a pure dict."""
  from flax import nnx

  if isinstance(obj, nnx.Module):
    obj = nnx.state(obj, nnx.Param)
  if isinstance(obj, nnx.State):
    obj = nnx.to_pure_dict(obj)
  if not isinstance(obj, Mapping):
    raise TypeError(f"Expected a ViT module, an nnx.State or a dict of parameters, got {type(obj)}")
  if "blocks" not in obj and "backbone" in obj:
    logging.info("Using the 'backbone' entry of a network parameter tree (the head is not "
                 "exported).")
    obj = obj["backbone"]
  if "blocks" not in obj:
    raise ValueError(f"Not ViT backbone parameters: top-level keys {sorted(map(str, obj))}")
  return obj


def _is_scanned(blocks: Mapping) -> bool:
  """True for scan_layers parameters ({'attn': ..., 'mlp': ...} with a leading depth axis)."""
  return not all(str(k).isdigit() for k in blocks)


def _depth(blocks: Mapping) -> int:
  if _is_scanned(blocks):
    return int(next(iter(traverse_util.flatten_dict(blocks).values())).shape[0])
  return len(blocks)


def _mapping(path: tuple, scanned: bool):
  """(torch key template, kind, block index or None) for one parameter path."""
  if path[0] == "blocks":
    rest, index = (path[1:], None) if scanned else (path[2:], int(path[1]))
    if rest not in _BLOCK:
      raise ValueError(f"Model parameter {'.'.join(map(str, path))} has no PyTorch counterpart")
    suffix, kind = _BLOCK[rest]
    return "blocks.{}." + suffix, kind, index
  if path not in _TOP:
    raise ValueError(f"Model parameter {'.'.join(map(str, path))} has no PyTorch counterpart")
  key, kind = _TOP[path]
  return key, kind, None


def _dino_order(keys) -> list:
  """DINO's state-dict order: embeddings, blocks in order, final norm, then masked_embed."""
  block_rank = {suffix: j for j, (suffix, _) in enumerate(_BLOCK.values())}

  def rank(k):
    if k in _TOP_ORDER:
      return (0, _TOP_ORDER.index(k), 0)
    if k.startswith("blocks."):
      _, i, suffix = k.split(".", 2)
      return (1, int(i), block_rank[suffix])
    return (2, _END_ORDER.index(k), 0)

  return sorted(keys, key=rank)


# ------------------------------------------------------------------ export / import

def to_torch_state_dict(vit_params_or_model, *, mask_token: bool = True) -> dict[str, np.ndarray]:
  """Backbone parameters as a DINO-layout state dict of float32 NumPy arrays.

  Accepts a ViT module (loop or scan_layers), its nnx.State, or its pure dict (also a whole
  network's pure dict, whose 'backbone' entry is used). `mask_token=False` leaves out
  `masked_embed`, which DINO's `VisionTransformer` lacks (for `load_state_dict(strict=True)`).
  """
  params = _pure_params(vit_params_or_model)
  scanned = _is_scanned(params["blocks"])
  depth = _depth(params["blocks"])
  out = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    key, kind, index = _mapping(path, scanned)
    if key == MASK_KEY and not mask_token:
      continue
    a = np.asarray(weight_files.to_numpy(leaf), np.float32)
    if path[0] != "blocks":
      out[key] = _to_torch_layout(a, kind)
    elif scanned:
      for i in range(depth):
        out[key.format(i)] = _to_torch_layout(a[i], kind)
    else:
      out[key.format(index)] = _to_torch_layout(a, kind)
  return {k: out[k] for k in _dino_order(out)}


def from_torch_state_dict(state_dict, model_or_abstract, *, checkpoint_key: str = "teacher"):
  """Our backbone parameters (pure dict, the target's structure and dtypes) from a DINO-layout
  state dict or training checkpoint (torch tensors or NumPy arrays).

  `model_or_abstract`: a ViT (concrete or from `nnx.eval_shape`), its nnx.State or pure dict; it
  fixes the layout (loop or scan) and every expected shape. Missing keys, wrong shapes and
  unknown non-head keys raise ValueError naming each key, so a checkpoint of another size or
  architecture (layer scale, mean pooling) never loads partially. Without `masked_embed`
  (DINO), the target's mask token is kept (zeros for an abstract target), with a warning.
  """
  import jax
  import jax.numpy as jnp

  tensors, ignored, source = select_backbone(state_dict, checkpoint_key=checkpoint_key)
  target = _pure_params(model_or_abstract)
  scanned = _is_scanned(target["blocks"])
  depth = _depth(target["blocks"])
  width = target["norm"]["scale"].shape[-1]
  missing, wrong, used, loaded, mask_kept = [], [], set(), {}, None

  def fetch(key, kind, shape):
    if key not in tensors:
      missing.append(key)
      return None
    used.add(key)
    w, expect = tensors[key], _torch_shape(kind, shape)
    if tuple(w.shape) != expect:
      wrong.append(f"{key}: checkpoint {tuple(w.shape)}, model expects {expect}")
      return None
    return _from_torch_layout(np.asarray(w, np.float32), kind, shape)

  for path, leaf in traverse_util.flatten_dict(target).items():
    key, kind, index = _mapping(path, scanned)
    dtype = leaf.dtype
    if key == MASK_KEY and key not in tensors:
      concrete = not isinstance(leaf, jax.ShapeDtypeStruct)
      mask_kept = "its current value" if concrete else "zeros"
      value = np.asarray(weight_files.to_numpy(leaf)) if concrete else np.zeros(leaf.shape)
    elif path[0] != "blocks":
      value = fetch(key, kind, leaf.shape)
    elif scanned:
      layers = [fetch(key.format(i), kind, leaf.shape[1:]) for i in range(depth)]
      value = None if any(layer is None for layer in layers) else np.stack(layers)
    else:
      value = fetch(key.format(index), kind, leaf.shape)
    if value is not None:
      loaded[path] = jnp.asarray(value, dtype=dtype)

  unexpected = sorted(set(tensors) - used)
  if missing or wrong or unexpected:
    lines = [f"Cannot load {source} into a ViT of width {width}, depth {depth}:"]
    lines += [f"  missing key {k}" for k in missing]
    lines += [f"  shape mismatch {m}" for m in wrong]
    lines += [f"  unexpected key {k} (not in this architecture)" for k in unexpected]
    if any(k == "pos_embed" for k in missing + [m.split(":")[0] for m in wrong]):
      lines.append("  (pos_embed holds 1 + (image_size / patch_size)^2 tokens: build the ViT "
                   "with the checkpoint's image_size; it resizes internally for other inputs)")
    raise ValueError("\n".join(lines))
  if mask_kept:
    warnings.warn(
        f"The checkpoint has no {MASK_KEY!r} (DINO does not train one): the mask token keeps "
        f"{mask_kept}; it matters only for masked inputs.", MaskTokenNotLoaded, stacklevel=2)
  logging.info("Loaded %d tensors from %s%s.", len(used), source,
           f"; ignored {len(ignored)} head keys" if ignored else "")
  return traverse_util.unflatten_dict(loaded)


def export_checkpoint(workdir: str, out_path: str, *, step=None, which: str = "teacher",
                      fmt: str | None = None, mask_token: bool = True) -> dict:
  """Write one backbone of a training checkpoint as DINO-layout weights; returns a summary.

  `step=None` takes the latest checkpoint; `fmt` defaults to the extension of `out_path`.
  The .safetensors metadata records the step and the ViT shape, so it can be rebuilt.
  """
  from sove_jax.interop import trained

  fmt = weight_files.weights_format(out_path, fmt)
  loaded = trained.load_backbone(workdir, step=step, which=which)  # the latest readable one
  config, model = loaded
  step = loaded.step
  state_dict = to_torch_state_dict(model, mask_token=mask_token)
  m = config.model
  summary = {"format": "pt", "producer": "sove_jax", "which": which, "step": int(step),
             "variant": m.variant, "width": model.width, "depth": model.depth,
             "num_heads": model.num_heads, "patch_size": model.patch_size,
             "image_size": int(config.data.global_size),
             "pos_interpolation": model.pos_interpolation}
  if fmt == "safetensors":
    weight_files.save_safetensors(state_dict, out_path, metadata=summary)
  else:
    weight_files.save_pth(state_dict, out_path)
  summary.update(path=out_path, num_tensors=len(state_dict),
                 num_params=int(sum(a.size for a in state_dict.values())))
  logging.info("Exported %s backbone of %s step %d to %s.", which, workdir, step, out_path)
  return summary


def import_weights(path, model, *, checkpoint_key: str = "teacher", trusted: bool = False,
                   pos_interpolation: str | None = "dino"):
  """Load a .pth/.safetensors file (or an in-memory state dict) into `model`; returns it.

  `model` must be a ViT of the checkpoint's width, depth, heads, patch size and image size.
  `pos_interpolation` becomes the model's way of resizing the position embedding for inputs of
  another size: "dino" (default), as the DINO/iBOT/SOP code that trained such weights, so
  features at e.g. 96 px match theirs; None keeps the model's own.
  """
  from flax import nnx

  from sove_jax.models.vit import POS_INTERPOLATIONS

  if pos_interpolation is not None and pos_interpolation not in POS_INTERPOLATIONS:
    raise ValueError(f"pos_interpolation must be one of {POS_INTERPOLATIONS} or None, "
                     f"got {pos_interpolation!r}")
  state_dict = (weight_files.load_weights_file(path, trusted=trusted)
                if isinstance(path, (str, os.PathLike)) else path)
  params = from_torch_state_dict(state_dict, model, checkpoint_key=checkpoint_key)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  if pos_interpolation is not None:
    model.pos_interpolation = pos_interpolation
  return model


# ------------------------------------------------------------------ command line

def export_command(*, workdir, out, step=None, which="teacher", fmt=None, mask_token=True):
  """`export`: prints the summary of `export_checkpoint` as JSON."""
  summary = export_checkpoint(workdir, out, step=step, which=which, fmt=fmt,
                              mask_token=mask_token)
  print(json.dumps(summary, indent=2))
  return summary


def import_command(*, checkpoint, variant="s", patch_size=16, image_size=224, width=None,
                   depth=None, num_heads=None, pos_interpolation="dino", checkpoint_key="teacher",
                   trusted=False):
  """`import`: loads a PyTorch checkpoint into our ViT and prints what was loaded, what was set
  aside and a forward pass's [CLS] norm on a random image."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sove_jax.models.vit import create_vit

  overrides = {k: v for k, v in (("width", width), ("depth", depth), ("num_heads", num_heads))
               if v}
  # Abstract: nothing is initialized only to be overwritten (a DINO mask token becomes zeros).
  model = nnx.eval_shape(lambda: create_vit(
      variant, patch_size=patch_size, image_size=image_size, dtype=jnp.float32,
      rngs=nnx.Rngs(0), **overrides))
  raw = weight_files.load_weights_file(checkpoint, trusted=trusted)
  tensors, ignored, source = select_backbone(raw, checkpoint_key=checkpoint_key)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", MaskTokenNotLoaded)
    import_weights(raw, model, checkpoint_key=checkpoint_key, pos_interpolation=pos_interpolation)
  images = jax.random.normal(jax.random.key(0), (1, image_size, image_size, 3))
  cls = np.asarray(model(images)[0, 0])
  print(f"Loaded {len(tensors)} backbone tensors from {source} of {checkpoint} into "
        f"ViT width={model.width} depth={model.depth} heads={model.num_heads} "
        f"patch={model.patch_size} image={image_size} "
        f"pos_interpolation={model.pos_interpolation}.")
  print(f"Parameters: {sum(a.size for a in tensors.values()):,}.")
  if ignored:
    print(f"Ignored {len(ignored)} head keys (e.g. {ignored[0]}).")
  for w in caught:
    if issubclass(w.category, MaskTokenNotLoaded):
      print(f"Warning: {w.message}")
  print(f"Forward check on a random image: [CLS] norm {np.linalg.norm(cls):.4f}, "
        f"finite={bool(np.isfinite(cls).all())}.")


COMMANDS = ("export", "import")


def main(argv):
  """`export` a training checkpoint's backbone, or `import` a PyTorch one and report it."""
  from absl import app, flags
  f = flags.FLAGS
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"Give one command, {' or '.join(COMMANDS)}: python -m "
                         "sove_jax.interop.torch_weights export|import --flags")
  if argv[1] == "export":
    if not (f.workdir and f.out):
      raise app.UsageError("export needs --workdir and --out.")
    export_command(workdir=f.workdir, out=f.out, step=f.step, which=f.which,
                   fmt=f.format or None, mask_token=f.mask_token)
  else:
    if not f.checkpoint:
      raise app.UsageError("import needs --checkpoint.")
    import_command(checkpoint=f.checkpoint, variant=f.variant, patch_size=f.patch_size,
                   image_size=f.image_size, width=f.width, depth=f.depth,
                   num_heads=f.num_heads, pos_interpolation=f.pos_interpolation,
                   checkpoint_key=f.checkpoint_key, trusted=f.trust_pickle)


def _define_flags():
  from absl import flags

  from sove_jax import reporting
  reporting.define_verbose_flag(flags)
  # export
  flags.DEFINE_string("workdir", None, "export: the training run directory.")
  flags.DEFINE_string("out", None, "export: *.safetensors, *.pth or *.pt.")
  flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest).")
  flags.DEFINE_enum("which", "teacher", ("teacher", "student"), "export: which backbone.")
  flags.DEFINE_enum("format", "", ("", "safetensors", "pth"), "export: file format (default: "
                    "from the extension).")
  flags.DEFINE_bool("mask_token", True, "export: write masked_embed (--nomask_token for DINO's "
                    "strict load_state_dict).")
  # import
  flags.DEFINE_string("checkpoint", None, "import: *.pth, *.pt or *.safetensors.")
  flags.DEFINE_string("variant", "s", "import: ViT size, ti | s | b | l.")
  flags.DEFINE_integer("patch_size", 16, "import: patch size.")
  flags.DEFINE_integer("image_size", 224, "import: the image size the weights were trained at.")
  flags.DEFINE_integer("width", None, "import: width override.")
  flags.DEFINE_integer("depth", None, "import: depth override.")
  flags.DEFINE_integer("num_heads", None, "import: heads override.")
  flags.DEFINE_enum("pos_interpolation", "dino", ("dino", "size"), "import: position-embedding "
                    "resize at other input sizes (dino: as the PyTorch code that trained them).")
  flags.DEFINE_string("checkpoint_key", "teacher", "import: entry of a full training checkpoint.")
  flags.DEFINE_bool("trust_pickle", False, "import: unpickle arbitrary objects (only for files "
                    "you trust).")


if __name__ == "__main__":
  from absl import app

  from sove_jax import reporting
  _define_flags()
  app.run(reporting.command(main))
