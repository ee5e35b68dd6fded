"""The network of every method: a backbone (`model.arch`: ViT or Swin) and a head applied to its
tokens.

SOVE's head is the projection head (unit embeddings, compared with the banks); DINO's and iBOT's
is the prototype head (logits over learned prototypes), chosen by `config.method`. Student and
teacher are two parameter sets of this one module (same graph): the teacher is called without a
drop-path key and without a mask. Both backbones return `[CLS-role token, final tokens...]`: the
ViT its [CLS] and patch tokens, the Swin the average of its final tokens and those tokens (the
final stage's grid), so the step treats them alike; masks are drawn on the backbone's final token
grid (`token_grid`).

The global representation, the one the [CLS] loss (and SOVE's class bank) sees, is the [CLS]
token or the mean of the patch tokens (`model.global_pool`, the paper's Table B.2); `global_pool`
gives it from the backbone's tokens, for the head here and for k-NN evaluation alike.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from sove_jax.models.head import ProjectionHead
from sove_jax.models.prototype_head import PrototypeHead
from sove_jax.models.swin import SWIN_VARIANTS, Swin
from sove_jax.models.vit import VARIANTS, ViT

ARCHS = ("vit", "swin")
METHODS = ("sove", "dino", "ibot")
GLOBAL_POOLS = ("cls", "mean_patch")


def global_pool(tokens, pool: str = "cls"):
  """The global representation of backbone tokens [N, 1 + L, D]: the [CLS] token ("cls") or
  the mean of the L patch tokens ("mean_patch"), [N, D]."""
  if pool == "cls":
    return tokens[:, 0]
  if pool == "mean_patch":
    return jnp.mean(tokens[:, 1:], axis=1)
  raise ValueError(f"global pool {pool!r} is not one of {GLOBAL_POOLS}")


class Network(nnx.Module):
  """Backbone + head. Returns the head's output for the global representation and
  (optionally) for every patch token: L2-normalized embeddings (SOVE) or prototype logits
  (DINO, iBOT)."""

  def __init__(self, backbone, head, pool: str = "cls"):
    if pool not in GLOBAL_POOLS:
      raise ValueError(f"pool={pool!r} is not one of {GLOBAL_POOLS}")
    self.backbone = backbone
    self.head = head
    self.pool = pool

  def __call__(self, images, mask=None, *, key=None, patch_tokens=True):
    tokens = self.backbone(images, mask, key=key)
    if patch_tokens:
      if self.pool != "cls":  # the pooled token takes the [CLS] token's place
        tokens = jnp.concatenate([global_pool(tokens, self.pool)[:, None], tokens[:, 1:]], 1)
      out = self.head(tokens)
      return out[:, 0], out[:, 1:]
    return self.head(global_pool(tokens, self.pool)), None


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


def arch(model_config) -> str:
  """The backbone architecture; "vit" for workdirs whose config.json predates `model.arch`."""
  return model_config.get("arch", "vit")


def swin_size(model_config) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
  """(embed_dim, depths, heads) of the Swin `model.variant` (t, s, b), each overridden when > 0:
  `model.width` is the first stage's width, `model.num_heads` the first stage's heads (both
  doubled at each later stage, the reference's rule), `model.depth` the blocks kept: the
  variant's stages from the first, as many as hold exactly `depth` blocks (Swin-T: 2, 4, 10 or
  12; 4 is stages (2, 2)). A depth that ends inside a stage raises ValueError."""
  m = model_config
  if m.variant not in SWIN_VARIANTS:
    raise ValueError(f"model.variant={m.variant!r} is not a Swin size, one of "
                     f"{sorted(SWIN_VARIANTS)}")
  embed_dim, depths, heads = SWIN_VARIANTS[m.variant]
  if m.width > 0:
    embed_dim = m.width
  if m.num_heads > 0:
    heads = tuple(m.num_heads * 2 ** i for i in range(len(depths)))
  if m.depth > 0:
    ends = [sum(depths[:i + 1]) for i in range(len(depths))]
    if m.depth not in ends:
      raise ValueError(f"model.depth={m.depth} does not end at a stage of Swin-"
                       f"{m.variant.upper()} {depths}: use one of {ends}")
    stages = ends.index(m.depth) + 1
    depths, heads = depths[:stages], heads[:stages]
  return embed_dim, tuple(depths), tuple(heads)


def token_stride(model_config) -> int:
  """Input pixels per final token, per side: the ViT's patch; the Swin's patch doubled by each
  patch merging (Swin-T, patch 4: 32)."""
  m = model_config
  if arch(m) == "swin":
    return m.patch_size * 2 ** (len(swin_size(m)[1]) - 1)
  return m.patch_size


def token_grid(model_config, image_size: int) -> int:
  """Side of the backbone's final token grid at `image_size` px: where the step's masks are
  drawn and the patch loss compares tokens (ViT-S/16 at 224 px: 14; Swin-T at 224 px: 7)."""
  return image_size // token_stride(model_config)


def backbone_kwargs(model_config) -> dict:
  """ViT constructor arguments from a config's `model` block. (The defaults of `get` serve
  workdirs whose config.json predates those fields.)"""
  m = model_config
  width, depth, num_heads = vit_size(m)
  return dict(width=width, depth=depth, num_heads=num_heads, patch_size=m.patch_size,
              drop_path_rate=m.drop_path, dtype=_dtype(m.dtype), remat=m.remat,
              scan_layers=m.scan_layers, attention=m.get("attention", "xla"),
              pos_interpolation=m.get("pos_interpolation", "size"))


def swin_kwargs(model_config) -> dict:
  """Swin constructor arguments from a config's `model` block (`swin_size`, the window)."""
  m = model_config
  embed_dim, depths, heads = swin_size(m)
  return dict(embed_dim=embed_dim, depths=depths, num_heads=heads,
              window_size=m.get("window_size", 7), patch_size=m.patch_size,
              drop_path_rate=m.drop_path, dtype=_dtype(m.dtype), remat=m.remat)


def build_backbone(model_config, image_size: int, rngs: nnx.Rngs):
  """The `model.arch` backbone, built for `image_size` px inputs (the global crop): the ViT's
  position embedding and the Swin's windows are fixed from that size."""
  if arch(model_config) == "swin":
    return Swin(image_size=image_size, rngs=rngs, **swin_kwargs(model_config))
  return ViT(image_size=image_size, rngs=rngs, **backbone_kwargs(model_config))


def method(config) -> str:
  """The run's method, "sove" for configs written before `method` existed."""
  return config.get("method", "sove")


def prototypes_of(config):
  """The `baseline` block when the run's method has a prototype head (DINO, iBOT), else None:
  the last argument of `build_network`, `abstract_network` and `init_params`."""
  return None if method(config) == "sove" else config.baseline


def build_network(model_config, image_size: int, rngs: nnx.Rngs,
                  baseline_config=None) -> Network:
  """Backbone and head. Without `baseline_config` the head is SOVE's projection head, MLP
  `model.head_hidden` -> `model.head_out`; with it, DINO's/iBOT's prototype head: the same MLP
  (`model.head_out` is its bottleneck) then `baseline.num_prototypes` weight-normalized
  prototypes."""
  m = model_config
  backbone = build_backbone(m, image_size, rngs)
  if baseline_config is None:
    head = ProjectionHead(backbone.width, hidden_dim=m.head_hidden, out_dim=m.head_out,
                          dtype=_dtype(m.dtype), rngs=rngs)
  else:
    head = PrototypeHead(backbone.width, hidden_dim=m.head_hidden, bottleneck_dim=m.head_out,
                         num_prototypes=baseline_config.num_prototypes,
                         norm_last_layer=baseline_config.norm_last_layer, dtype=_dtype(m.dtype),
                         rngs=rngs)
  return Network(backbone, head, pool=m.get("global_pool", "cls"))


def abstract_network(model_config, image_size: int, baseline_config=None):
  """(graphdef, abstract param State) without allocating parameters."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: build_network(model_config, image_size, nnx.Rngs(0),
                                                 baseline_config))
  return nnx.split(model)


def init_params(model_config, image_size: int, key: jax.Array, baseline_config=None) -> dict:
  """Fresh parameters as a pure dict (the train state stores pure dicts)."""
  with nnx.use_eager_sharding(False):
    model = build_network(model_config, image_size, nnx.Rngs(key), baseline_config)
  return nnx.state(model, nnx.Param).to_pure_dict()
