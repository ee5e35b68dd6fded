"""Weights in and out of PyTorch (DINO/iBOT key layout); torch itself is imported lazily.

The names are looked up in `torch_weights` on first use, so `python -m
sove_jax.interop.torch_weights` runs that module once (an eager import here would load it twice
and make runpy warn on every command)."""
__all__ = ("MaskTokenNotLoaded", "export_checkpoint", "from_torch_state_dict", "import_weights",
           "load_pth", "load_safetensors", "load_weights_file", "safetensors_metadata",
           "save_pth", "save_safetensors", "select_backbone", "to_torch_state_dict")


def __getattr__(name):
  if name in __all__:
    from sove_jax.interop import torch_weights
    return getattr(torch_weights, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
