r"""ViT backbone weights to and from PyTorch, in the DINO/iBOT `vision_transformer.py` key layout.

    python -m sove_jax.interop.torch_weights export --workdir=runs/vits --out=teacher.safetensors
    python -m sove_jax.interop.torch_weights export --workdir=runs/vits --out=teacher.pth
    python -m sove_jax.interop.torch_weights import --checkpoint=dino_vitsmall16.pth --variant=s

Why: released DINO/iBOT/SOP weights can then be evaluated with this project's probes, and our
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

torch is optional: it is imported only by the `.pth` functions. `.safetensors` files are read
and written by the `safetensors` library.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import sys
import traceback
import warnings
from collections.abc import Mapping

import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from sove_jax import paths

# Prefixes that wrappers put in front of backbone keys: DistributedDataParallel ("module."),
# DINO's MultiCropWrapper ("backbone."), and checkpoints that flatten {"teacher": ...}.
STRIP_PREFIXES = ("module.", "backbone.", "teacher.")
# Keys after stripping that belong to the projection head, not the backbone.
IGNORED_PREFIXES = ("head.",)
MASK_KEY = "masked_embed"


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


def _to_numpy(v) -> np.ndarray:
  """NumPy view of a torch tensor, jax array or array-like; bfloat16 tensors become float32."""
  if hasattr(v, "detach"):  # torch.Tensor, without importing torch
    t = v.detach().cpu()
    try:
      return t.numpy()
    except TypeError:  # dtypes NumPy lacks (bfloat16): widen, which is exact
      return t.float().numpy()
  import jax
  return np.asarray(jax.device_get(v))


def _is_array(v) -> bool:
  return hasattr(v, "shape") and hasattr(v, "dtype")


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
    a = np.asarray(_to_numpy(leaf), np.float32)
    if path[0] != "blocks":
      out[key] = _to_torch_layout(a, kind)
    elif scanned:
      for i in range(depth):
        out[key.format(i)] = _to_torch_layout(a[i], kind)
    else:
      out[key.format(index)] = _to_torch_layout(a, kind)
  return {k: out[k] for k in _dino_order(out)}


def _strip(key: str) -> str:
  changed = True
  while changed:
    changed = False
    for p in STRIP_PREFIXES:
      if key.startswith(p):
        key, changed = key[len(p):], True
  return key


def select_backbone(checkpoint, *, checkpoint_key: str = "teacher"):
  """(backbone tensors as NumPy with plain DINO keys, ignored keys, where they came from).

  `checkpoint` is a flat state dict or a training checkpoint holding one under
  `checkpoint_key` (DINO/iBOT/SOP `checkpoint.pth`: {'student', 'teacher', 'optimizer', ...}).
  Wrapper prefixes are stripped; head keys are set aside, never silently loaded.
  """
  if not isinstance(checkpoint, Mapping):
    raise TypeError(f"Expected a state dict (a mapping), got {type(checkpoint)}")
  if isinstance(checkpoint.get(checkpoint_key), Mapping):
    state_dict, source = checkpoint[checkpoint_key], f"the {checkpoint_key!r} entry"
  else:
    others = sorted(str(k) for k, v in checkpoint.items() if not _is_array(v))
    if others:
      raise ValueError(
          f"Not a flat state dict and no {checkpoint_key!r} entry holding one; top-level "
          f"non-tensor keys: {others}. Pass checkpoint_key= (CLI --checkpoint_key) to pick one.")
    state_dict, source = checkpoint, "a flat state dict"
  tensors, ignored = {}, []
  for raw, value in state_dict.items():
    key = _strip(str(raw))
    if key.startswith(IGNORED_PREFIXES):
      ignored.append(str(raw))
      continue
    if not _is_array(value):
      raise ValueError(f"Checkpoint key {raw!r} holds a {type(value).__name__}, not a tensor")
    if key in tensors:
      raise ValueError(f"Two checkpoint keys map to {key!r} once prefixes are stripped")
    tensors[key] = _to_numpy(value)
  return tensors, ignored, source


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
      value = np.asarray(_to_numpy(leaf)) if concrete else np.zeros(leaf.shape)
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


# ------------------------------------------------------------------ files


def _write_atomically(path: str, data: bytes):
  """Write through a temporary file and rename it, so a crash never leaves half a file."""
  path = epath.Path(path)
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  try:
    tmp.write_bytes(data)
    tmp.rename(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def save_safetensors(state_dict: Mapping, path: str, metadata: Mapping | None = None):
  """Write a .safetensors file (the `safetensors` library); metadata values become str."""
  import safetensors.numpy

  tensors = {str(k): np.ascontiguousarray(_to_numpy(v)) for k, v in state_dict.items()}
  meta = {str(k): str(v) for k, v in (metadata or {}).items()} or None
  _write_atomically(path, safetensors.numpy.save(tensors, metadata=meta))


def _open_safetensors(path: str):
  """A local file is memory-mapped; one in a bucket (gs://...) is read whole through epath."""
  import safetensors
  import safetensors.numpy

  if not epath.Path(path).exists():
    raise FileNotFoundError(f"No file {path}.")
  try:
    if paths.is_local(path):
      return safetensors.safe_open(os.fspath(path), framework="np")
    return _SafetensorsBytes(epath.Path(path).read_bytes())
  except (safetensors.SafetensorError, ValueError) as e:
    raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


class _SafetensorsBytes:
  """The part of `safetensors.safe_open` used here, over a file's bytes."""

  def __init__(self, data: bytes):
    import safetensors.numpy

    size = int.from_bytes(data[:8], "little")
    self._meta = json.loads(data[8:8 + size]).get("__metadata__")
    self._tensors = safetensors.numpy.load(data)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    del exc

  def metadata(self):
    return self._meta

  def keys(self):
    return list(self._tensors)

  def get_tensor(self, name):
    return self._tensors[name]


def safetensors_metadata(path: str) -> dict[str, str]:
  """The `__metadata__` of a .safetensors file ({} when it has none)."""
  with _open_safetensors(path) as f:
    return dict(f.metadata() or {})


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """Read a .safetensors file into NumPy arrays (bfloat16 as ml_dtypes.bfloat16)."""
  with _open_safetensors(path) as f:
    return {name: f.get_tensor(name) for name in f.keys()}


def save_pth(state_dict: Mapping, path: str):
  """torch.save of CPU tensors: loads with `torch.load(path, weights_only=True)`."""
  torch = _import_torch(path)

  tensors = {str(k): torch.from_numpy(np.array(_to_numpy(v), copy=True))
             for k, v in state_dict.items()}
  buffer = io.BytesIO()
  torch.save(tensors, buffer)
  _write_atomically(path, buffer.getvalue())


def _tree_to_numpy(obj):
  if hasattr(obj, "detach"):
    return _to_numpy(obj)
  if isinstance(obj, Mapping):
    return {k: _tree_to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_tree_to_numpy(v) for v in obj)
  return obj


def load_pth(path: str, *, trusted: bool = False):
  """torch.load a .pth on CPU, tensors turned into NumPy (nested dicts kept).

  Loads with `weights_only=True` (no arbitrary code), allowing argparse.Namespace, which DINO,
  iBOT and SOP store as 'args' in full checkpoints. `trusted=True` unpickles anything; use it
  only for files you trust.
  """
  torch = _import_torch(path)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"No file {path}.")
  source = path if paths.is_local(path) else io.BytesIO(epath.Path(path).read_bytes())
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(source, map_location="cpu", weights_only=not trusted)
  except pickle.UnpicklingError as e:
    if "unsupported global" in str(e).lower():  # a well-formed file with other objects
      raise ValueError(
          f"{path} holds objects other than tensors and plain containers, so it was not "
          f"unpickled. If you trust the file, load it with trusted=True (CLI --trust_pickle): "
          f"{_torch_reason(e)}") from e
    raise ValueError(f"{path} is not a readable PyTorch file (corrupt, truncated or another "
                     f"format): {_torch_reason(e)}") from e
  except (RuntimeError, EOFError, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"{path} is not a readable PyTorch file (corrupt, truncated or another "
                     f"format): {_torch_reason(e)}") from e
  return _tree_to_numpy(obj)


TORCH_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def _import_torch(path):
  """torch, or an ImportError that says how to install it (and that .safetensors needs none)."""
  try:
    import torch
  except ImportError:
    raise ImportError(f"{path} is a PyTorch file: reading or writing it needs PyTorch, which is "
                      f"not installed; install the CPU build with `{TORCH_INSTALL}`, or use "
                      ".safetensors files, which do not need it.") from None
  return torch


def _torch_reason(error) -> str:
  """The informative line of torch.load's long message."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  for i, line in enumerate(lines):
    if "WeightsUnpickler error" in line and i + 1 < len(lines):
      return lines[i + 1]
    if "unsupported global" in line.lower():
      return line
  return lines[0].split(". ")[0][:200] if lines else type(error).__name__


def _format(path: str, fmt: str | None) -> str:
  if fmt is None:
    ext = os.path.splitext(path)[1].lower()
    fmt = {".safetensors": "safetensors", ".pth": "pth", ".pt": "pth"}.get(ext)
    if fmt is None:
      raise ValueError(f"Cannot tell the format of {path!r}: use .safetensors, .pth or .pt, "
                       "or pass fmt='safetensors' | 'pth'")
  if fmt not in ("safetensors", "pth"):
    raise ValueError(f"fmt must be 'safetensors' or 'pth', got {fmt!r}")
  return fmt


def load_weights_file(path: str, *, fmt: str | None = None, trusted: bool = False):
  """A .safetensors or .pth file as NumPy (the format from the extension unless `fmt`)."""
  if _format(path, fmt) == "safetensors":
    return load_safetensors(path)
  return load_pth(path, trusted=trusted)


def export_checkpoint(workdir: str, out_path: str, *, step=None, which: str = "teacher",
                      fmt: str | None = None, mask_token: bool = True) -> dict:
  """Write one backbone of a training checkpoint as DINO-layout weights; returns a summary.

  `step=None` takes the latest checkpoint; `fmt` defaults to the extension of `out_path`.
  The .safetensors metadata records the step and the ViT shape, so it can be rebuilt.
  """
  from sove_jax.evaluate import backbone

  fmt = _format(out_path, fmt)
  loaded = backbone.load_backbone(workdir, step=step, which=which)  # the latest readable one
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
    save_safetensors(state_dict, out_path, metadata=summary)
  else:
    save_pth(state_dict, out_path)
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
  state_dict = load_weights_file(path, trusted=trusted) if isinstance(path, (str, os.PathLike)) \
      else path
  params = from_torch_state_dict(state_dict, model, checkpoint_key=checkpoint_key)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  if pos_interpolation is not None:
    model.pos_interpolation = pos_interpolation
  return model


# ------------------------------------------------------------------ command line

def _export_main(args):
  summary = export_checkpoint(args.workdir, args.out, step=args.step, which=args.which,
                              fmt=args.format, mask_token=not args.no_mask_token)
  print(json.dumps(summary, indent=2))


def _import_main(args):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sove_jax.models.vit import create_vit

  overrides = {k: getattr(args, k) for k in ("width", "depth", "num_heads")
               if getattr(args, k) is not None}
  # Abstract: nothing is initialized only to be overwritten (a DINO mask token becomes zeros).
  model = nnx.eval_shape(lambda: create_vit(
      args.variant, patch_size=args.patch_size, image_size=args.image_size, dtype=jnp.float32,
      rngs=nnx.Rngs(0), **overrides))
  raw = load_weights_file(args.checkpoint, trusted=args.trust_pickle)
  tensors, ignored, source = select_backbone(raw, checkpoint_key=args.checkpoint_key)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", MaskTokenNotLoaded)
    import_weights(raw, model, checkpoint_key=args.checkpoint_key,
                   pos_interpolation=args.pos_interpolation)
  images = jax.random.normal(jax.random.key(0), (1, args.image_size, args.image_size, 3))
  cls = np.asarray(model(images)[0, 0])
  print(f"Loaded {len(tensors)} backbone tensors from {source} of {args.checkpoint} into "
        f"ViT width={model.width} depth={model.depth} heads={model.num_heads} "
        f"patch={model.patch_size} image={args.image_size} "
        f"pos_interpolation={model.pos_interpolation}.")
  print(f"Parameters: {sum(a.size for a in tensors.values()):,}.")
  if ignored:
    print(f"Ignored {len(ignored)} head keys (e.g. {ignored[0]}).")
  for w in caught:
    if issubclass(w.category, MaskTokenNotLoaded):
      print(f"Warning: {w.message}")
  print(f"Forward check on a random image: [CLS] norm {np.linalg.norm(cls):.4f}, "
        f"finite={bool(np.isfinite(cls).all())}.")


def main(argv=None):
  """`export` a training checkpoint's backbone, or `import` a PyTorch one and report it."""
  parser = argparse.ArgumentParser(prog="python -m sove_jax.interop.torch_weights",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export", help="training checkpoint -> .safetensors / .pth")
  ex.add_argument("--workdir", required=True)
  ex.add_argument("--out", required=True, help="*.safetensors, *.pth or *.pt")
  ex.add_argument("--step", type=int, default=None, help="default: the latest")
  ex.add_argument("--which", choices=("teacher", "student"), default="teacher")
  ex.add_argument("--format", choices=("safetensors", "pth"), default=None)
  ex.add_argument("--no_mask_token", action="store_true",
                  help="leave out masked_embed (for DINO's strict load_state_dict)")
  im = sub.add_parser("import", help="check that a PyTorch checkpoint loads into our ViT")
  im.add_argument("--checkpoint", required=True, help="*.pth, *.pt or *.safetensors")
  im.add_argument("--variant", default="s", help="ti | s | b | l")
  im.add_argument("--patch_size", type=int, default=16)
  im.add_argument("--image_size", type=int, default=224)
  im.add_argument("--width", type=int, default=None)
  im.add_argument("--depth", type=int, default=None)
  im.add_argument("--num_heads", type=int, default=None)
  im.add_argument("--pos_interpolation", choices=("dino", "size"), default="dino",
                  help="position-embedding resize at other input sizes (dino: as the PyTorch "
                       "code that trained the weights)")
  im.add_argument("--checkpoint_key", default="teacher",
                  help="entry of a full training checkpoint to load")
  im.add_argument("--trust_pickle", action="store_true",
                  help="unpickle arbitrary objects (only for files you trust)")
  for command in (ex, im):
    command.add_argument("--verbose", action="store_true",
                         help="show the traceback of a failure (by default one line)")
  args = parser.parse_args(argv)
  from sove_jax import reporting
  try:
    (_export_main if args.command == "export" else _import_main)(args)
  except reporting.expected_errors() as e:
    if args.verbose:
      traceback.print_exc()
    sys.exit(f"Error: {reporting.error_line(e)}")


if __name__ == "__main__":
  main()
