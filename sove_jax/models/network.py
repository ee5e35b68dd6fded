"""The SOVE network: a ViT backbone and the projection head applied to its tokens.

Student and teacher are two parameter sets of this one module (same graph): the teacher is
called without a drop-path key and without a mask.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from sove_jax.models.head import ProjectionHead
from sove_jax.models.vit import VARIANTS, ViT


class Network(nnx.Module):
  """Backbone + head. Returns L2-normalized [CLS] and (optionally) patch embeddings."""

  def __init__(self, backbone, head):
    self.backbone = backbone
    self.head = head

  def __call__(self, images, mask=None, *, key=None, patch_tokens=True):
    tokens = self.backbone(images, mask, key=key)
    if patch_tokens:
      out = self.head(tokens)
      return out[:, 0], out[:, 1:]
    return self.head(tokens[:, 0]), None


def _dtype(name: str):
  return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}[name]


def vit_size(model_config) -> tuple[int, int, int]:
  """(width, depth, num_heads): those of `model.variant`, each replaced by the config's own
  `width`, `depth` or `num_heads` when that is > 0."""
  m = model_config
  if m.variant not in VARIANTS:
    raise ValueError(f"model.variant={m.variant!r} is not one of {sorted(VARIANTS)}")
  return tuple(own if own > 0 else preset
               for own, preset in zip((m.width, m.depth, m.num_heads), VARIANTS[m.variant]))


def backbone_kwargs(model_config) -> dict:
  """ViT constructor arguments from a config's `model` block. (The defaults of `get` serve
  workdirs whose config.json predates those fields.)"""
  m = model_config
  width, depth, num_heads = vit_size(m)
  return dict(width=width, depth=depth, num_heads=num_heads, patch_size=m.patch_size,
              drop_path_rate=m.drop_path, dtype=_dtype(m.dtype), remat=m.remat,
              scan_layers=m.scan_layers, attention=m.get("attention", "xla"),
              pos_interpolation=m.get("pos_interpolation", "size"))


def build_backbone(model_config, image_size: int, rngs: nnx.Rngs):
  return ViT(image_size=image_size, rngs=rngs, **backbone_kwargs(model_config))


def build_network(model_config, image_size: int, rngs: nnx.Rngs) -> Network:
  backbone = build_backbone(model_config, image_size, rngs)
  head = ProjectionHead(backbone.width, hidden_dim=model_config.head_hidden,
                        out_dim=model_config.head_out, dtype=_dtype(model_config.dtype),
                        rngs=rngs)
  return Network(backbone, head)


def abstract_network(model_config, image_size: int):
  """(graphdef, abstract param State) without allocating parameters."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: build_network(model_config, image_size, nnx.Rngs(0)))
  return nnx.split(model)


def init_params(model_config, image_size: int, key: jax.Array) -> dict:
  """Fresh parameters as a pure dict (the train state stores pure dicts)."""
  with nnx.use_eager_sharding(False):
    model = build_network(model_config, image_size, nnx.Rngs(key))
  return nnx.state(model, nnx.Param).to_pure_dict()
