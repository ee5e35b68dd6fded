"""Released PyTorch weights as a backbone every evaluation takes (`--weights=FILE --arch=NAME`).

The authors' SOVE checkpoints and DINO's and iBOT's are ViTs in DINO's `vision_transformer.py`
layout (`torch_weights`): a released backbone (flat, or iBOT's {"state_dict": ...}) or a whole
training checkpoint ({"teacher": ..., "student": ...}, `checkpoint_key` picks one). The network
is rebuilt from the ImageNet config of the paper (`configs/vits.py`: 224 px crops, evaluation
resize 256 and centre crop 224, ImageNet mean and std) with the architecture `arch` names, in
float32 and with DINO's position-embedding resize (`pos_interpolation="dino"`), so features at
any size are those of the code that trained the weights.

Names follow DINO's and iBOT's `--arch`: vit_tiny, vit_small, vit_base, vit_large; the patch
size (16 or 8) and the image size the weights were trained at are read from the file (the patch
embedding's kernel, the position embedding's grid). Released Swins (iBOT's swin_tiny) use another
key layout, not read here.
"""
from __future__ import annotations

import math
import pathlib
import warnings

from absl import logging
from flax import nnx

from sove_jax import configuration
from sove_jax.interop import torch_weights, trained, weight_files

ARCHS = {"vit_tiny": "ti", "vit_small": "s", "vit_base": "b", "vit_large": "l"}
_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def released_config(arch: str, *, patch_size: int = 16, image_size: int = 224):
  """The run config an evaluation reads for released weights: the paper's ImageNet config with
  the released architecture (every evaluation takes its data, sizes and normalization from a
  run config; `--dataset` and the split flags point it elsewhere as for a workdir)."""
  if arch not in ARCHS:
    raise ValueError(f"--arch={arch!r} is not a released ViT: use one of {', '.join(ARCHS)} "
                     "(released Swins are not read).")
  if patch_size < 1 or image_size < patch_size:
    raise ValueError(f"--patch_size={patch_size} and --image_size={image_size} must hold at "
                     "least one patch.")
  config = configuration.load(str(_CONFIGS / "vits.py"))
  config.model.update(arch="vit", variant=ARCHS[arch], width=0, depth=0, num_heads=0,
                      patch_size=patch_size, dtype="float32", pos_interpolation="dino",
                      global_pool="cls")
  config.data.global_size = config.data.eval_crop = image_size
  config.data.eval_resize = round(image_size * 256 / 224)
  return config


def trained_sizes(tensors) -> tuple[int, int]:
  """(patch size, image size) of DINO-layout backbone tensors: the patch embedding's kernel side
  and the side of the position embedding's square grid, in patches, times the patch."""
  for key in ("patch_embed.proj.weight", "pos_embed"):
    if key not in tensors:
      raise ValueError(f"No {key} among the backbone's tensors: not a ViT in DINO's layout.")
  patch = int(tensors["patch_embed.proj.weight"].shape[-1])
  tokens = int(tensors["pos_embed"].shape[1]) - 1
  grid = math.isqrt(tokens)
  if grid * grid != tokens:
    raise ValueError(f"pos_embed holds {tokens} patch positions, not a square grid.")
  return patch, grid * patch


def check_arch(tensors, arch: str, path: str):
  """One sentence when the file's ViT is not `arch` (width from the final norm, depth from the
  blocks), naming the architecture it is."""
  from sove_jax.models.vit import VARIANTS
  width = int(tensors["norm.weight"].shape[0]) if "norm.weight" in tensors else None
  depth = 1 + max((int(k.split(".")[1]) for k in tensors if k.startswith("blocks.")), default=-1)
  want = VARIANTS[ARCHS[arch]][:2]
  if (width, depth) != tuple(want):
    named = [a for a, v in ARCHS.items() if tuple(VARIANTS[v][:2]) == (width, depth)]
    raise ValueError(f"{path} holds a ViT of width {width} and depth {depth}"
                     f"{' (' + named[0] + ')' if named else ''}, not {arch} (width {want[0]}, "
                     f"depth {want[1]}): pass --arch={named[0] if named else '...'}.")


def load_released(path: str, *, arch: str, checkpoint_key: str = "teacher",
                  trusted: bool = False):
  """`trained.LoadedBackbone` of the weights in `path` (.pth or .safetensors): the
  backbone, the config it is evaluated with (`released_config` at the file's patch and image
  size), no step, and the projection head's first layer where the file holds the head (a
  training checkpoint's teacher)."""
  from sove_jax.models import network

  released_config(arch)  # the name, checked before the file is read
  raw = weight_files.load_weights_file(path, trusted=trusted)
  tensors, _, _ = weight_files.select_backbone(raw, checkpoint_key=checkpoint_key)
  check_arch(tensors, arch, path)
  patch_size, image_size = trained_sizes(tensors)
  config = released_config(arch, patch_size=patch_size, image_size=image_size)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: network.build_backbone(config.model, image_size,
                                                          nnx.Rngs(0)))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", torch_weights.MaskTokenNotLoaded)
    torch_weights.import_weights(raw, model, checkpoint_key=checkpoint_key,
                                 pos_interpolation="dino")
  if any(issubclass(w.category, torch_weights.MaskTokenNotLoaded) for w in caught):
    logging.info("%s has no mask token (DINO trains none); evaluation does not use one.", path)
  head = weight_files.select_head_layer(raw, checkpoint_key=checkpoint_key)
  return trained.LoadedBackbone(config, model, None, source=str(path), head_layer=head)
