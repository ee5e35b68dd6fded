"""Backbones in and out: a run's, released PyTorch weights (DINO/iBOT/SOP key layout), PyTorch
files; torch itself is imported lazily.

- `trained`: a run's backbone, from its workdir's checkpoint.
- `released`: released weights (DINO, iBOT, the authors') as the same kind of backbone.
- `torch_weights`: our ViT's parameters <-> a DINO-layout state dict; the export/import command.
- `weight_files`: .safetensors and .pth files (torch only for .pth).
Every evaluation (`sove_jax.evaluate`) reads its backbone through one of the first two.

The names are looked up on first use, so `python -m sove_jax.interop.torch_weights` runs that
module once (an eager import here would load it twice and make runpy warn on every command)."""
_WHERE = {
    "torch_weights": ("MaskTokenNotLoaded", "export_checkpoint", "from_torch_state_dict",
                      "import_weights", "to_torch_state_dict"),
    "weight_files": ("load_pth", "load_safetensors", "load_weights_file",
                     "safetensors_metadata", "save_pth", "save_safetensors", "select_backbone",
                     "select_head_layer"),
    "released": ("load_released",),
    "trained": ("LoadedBackbone", "load_backbone"),
}
__all__ = tuple(name for names in _WHERE.values() for name in names)


def __getattr__(name):
  import importlib
  for module, names in _WHERE.items():
    if name in names:
      return getattr(importlib.import_module(f"sove_jax.interop.{module}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
