"""Weight files: `.safetensors` (the `safetensors` library) and PyTorch `.pth` (torch, imported
only when a `.pth` is read or written), local or in a bucket (gs://...), written atomically; and
which state dict of a file holds the backbone.

A `.pth` is loaded with `weights_only=True`: nothing in it can run code, unless the caller
trusts the file (`trusted=True`, CLI `--trust_pickle`). Tensors come back as NumPy arrays, nested
dicts kept (the training checkpoints of DINO, iBOT and the authors' code hold several state dicts
and their `args`).

Which state dict: a flat one (DINO's released backbones), the `checkpoint_key` entry of a
training checkpoint (DINO, iBOT, the authors' `checkpoint.pth`: {"student", "teacher",
"optimizer", ...}), or the "state_dict" entry (iBOT's released `checkpoint_teacher.pth`). Wrapper
prefixes (`module.`, `backbone.`) are stripped; the projection head's keys (`head.*`) are set
aside, and its first layer (`head.mlp.0`) is what semi-supervised fine-tuning starts from
(`select_head_layer`).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
from collections.abc import Mapping

import numpy as np
from etils import epath

from sove_jax import paths

# Prefixes that wrappers put in front of backbone keys: DistributedDataParallel ("module."),
# DINO's MultiCropWrapper ("backbone."), and checkpoints that flatten {"teacher": ...}.
STRIP_PREFIXES = ("module.", "backbone.", "teacher.")
# Keys after stripping that belong to the projection head, not the backbone.
IGNORED_PREFIXES = ("head.",)
# The projection head's first Linear in DINO's, iBOT's and the authors' heads (`head.mlp.0`).
HEAD_LAYER = "head.mlp.0"
# Where a file that is not a flat state dict holds one, besides `checkpoint_key`: iBOT's
# released `checkpoint_teacher.pth` is {"state_dict": {...}}.
STATE_DICT_KEY = "state_dict"


def to_numpy(v) -> np.ndarray:
  """NumPy view of a torch tensor, jax array or array-like; bfloat16 tensors become float32."""
  if hasattr(v, "detach"):  # torch.Tensor, without importing torch
    t = v.detach().cpu()
    try:
      return t.numpy()
    except TypeError:  # dtypes NumPy lacks (bfloat16): widen, which is exact
      return t.float().numpy()
  import jax
  return np.asarray(jax.device_get(v))


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

  tensors = {str(k): np.ascontiguousarray(to_numpy(v)) for k, v in state_dict.items()}
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

  tensors = {str(k): torch.from_numpy(np.array(to_numpy(v), copy=True))
             for k, v in state_dict.items()}
  buffer = io.BytesIO()
  torch.save(tensors, buffer)
  _write_atomically(path, buffer.getvalue())


def _treeto_numpy(obj):
  if hasattr(obj, "detach"):
    return to_numpy(obj)
  if isinstance(obj, Mapping):
    return {k: _treeto_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_treeto_numpy(v) for v in obj)
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
  return _treeto_numpy(obj)


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


def weights_format(path: str, fmt: str | None) -> str:
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
  if weights_format(path, fmt) == "safetensors":
    return load_safetensors(path)
  return load_pth(path, trusted=trusted)


# --- which state dict ------------------------------------------------------------------------------

def _is_array(v) -> bool:
  return hasattr(v, "shape") and hasattr(v, "dtype")


def _strip(key: str) -> str:
  changed = True
  while changed:
    changed = False
    for p in STRIP_PREFIXES:
      if key.startswith(p):
        key, changed = key[len(p):], True
  return key


def _state_dict(checkpoint, checkpoint_key: str):
  """(the state dict a file holds, where it came from): see the module docstring."""
  if not isinstance(checkpoint, Mapping):
    raise TypeError(f"Expected a state dict (a mapping), got {type(checkpoint)}")
  for key in (checkpoint_key, STATE_DICT_KEY):
    if isinstance(checkpoint.get(key), Mapping):
      return checkpoint[key], f"the {key!r} entry"
  others = sorted(str(k) for k, v in checkpoint.items() if not _is_array(v))
  if others:
    raise ValueError(
        f"Not a flat state dict and no {checkpoint_key!r} entry holding one; top-level "
        f"non-tensor keys: {others}. Pass checkpoint_key= (CLI --checkpoint_key) to pick one.")
  return checkpoint, "a flat state dict"


def select_backbone(checkpoint, *, checkpoint_key: str = "teacher"):
  """(backbone tensors as NumPy with plain DINO keys, ignored keys, where they came from).

  `checkpoint` is a flat state dict, a training checkpoint holding one under `checkpoint_key`,
  or iBOT's {"state_dict": ...}. Wrapper prefixes are stripped; head keys are set aside, never
  silently loaded.
  """
  state_dict, source = _state_dict(checkpoint, checkpoint_key)
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
    tensors[key] = to_numpy(value)
  return tensors, ignored, source


def select_head_layer(checkpoint, *, checkpoint_key: str = "teacher"):
  """The projection head's first Linear (`head.mlp.0`) of a checkpoint as {"kernel": [D,
  hidden], "bias": [hidden]} float32 NumPy, or None when the file holds no head (a released
  backbone)."""
  state_dict, _ = _state_dict(checkpoint, checkpoint_key)
  found = {}
  for raw, value in state_dict.items():
    key = str(raw)
    while key.startswith(("module.", "teacher.")):
      key = key.split(".", 1)[1]
    if key in (f"{HEAD_LAYER}.weight", f"{HEAD_LAYER}.bias"):
      found[key.rsplit(".", 1)[1]] = np.asarray(to_numpy(value), np.float32)
  if "weight" not in found:
    return None
  hidden = found["weight"].shape[0]
  return {"kernel": np.ascontiguousarray(found["weight"].T),
          "bias": found.get("bias", np.zeros(hidden, np.float32))}
