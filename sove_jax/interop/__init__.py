"""Weights in and out of PyTorch (DINO/iBOT key layout); torch itself is imported lazily."""
from sove_jax.interop.torch_weights import (
    MaskTokenNotLoaded, export_checkpoint, from_torch_state_dict, import_weights, load_pth,
    load_safetensors, load_weights_file, safetensors_metadata, save_pth, save_safetensors,
    select_backbone, to_torch_state_dict)
