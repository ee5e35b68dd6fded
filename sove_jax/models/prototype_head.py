"""DINO's head, also iBOT's: an MLP to a bottleneck, L2-normalized, then a prototype layer.

`PrototypeHead(x)` maps [..., in_dim] to float32 logits [..., num_prototypes]:
Linear-GELU-Linear-GELU-Linear to the bottleneck (the same MLP as `ProjectionHead`, whose
output is already unit-norm), then a weight-normalized linear layer without bias whose columns
are the prototypes. iBOT runs one such head over the [CLS] and the patch tokens alike (its
"shared head"), so the head maps any leading shape.

Faithful to the reference heads where it changes training:
- the prototype layer is weight-normalized per prototype, `w_k = g_k v_k / ||v_k||`, with
  `g = 1` fixed (DINO's `norm_last_layer=True`: the logits are cosine similarities) or
  trainable from 1 (`norm_last_layer=False`, iBOT's ViT recipes);
- `v` starts from PyTorch's default `nn.Linear` draw, uniform in +-1/sqrt(bottleneck_dim): the
  reference heads initialize the MLP with a truncated normal (std 0.02) *before* creating the
  prototype layer, and with weight normalization the scale of `v` sets how fast the prototypes
  turn under Adam;
- `g` is stored as [1, K] (PyTorch's `weight_g` is [K, 1]), so the optimizer's weight-decay
  mask, which decays parameters of rank > 1, treats it as the references' parameter groups do.

The prototype layer is the attribute `last_layer`: DINO's name, and the one
`sove_jax.prototypes.freeze_last_layer` looks for.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sove_jax.models.head import ProjectionHead


def _named(init, names):
  """Logical axis names on a parameter; eager sharding off, as in `models.vit`."""
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def _uniform(limit: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


class WeightNormPrototypes(nnx.Module):
  """[..., in_dim] -> float32 [..., num_prototypes] = g_k <x, v_k / ||v_k||>."""

  def __init__(self, in_dim: int, num_prototypes: int, *, norm_last_layer: bool = True,
               dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_named(_uniform(1.0 / math.sqrt(in_dim)),
                                   ("proj_out", "prototypes"))(
        rngs.params(), (in_dim, num_prototypes), jnp.dtype(param_dtype)))
    if not norm_last_layer:
      self.scale = nnx.Param(_named(jax.nn.initializers.ones, (None, "prototypes"))(
          rngs.params(), (1, num_prototypes), jnp.dtype(param_dtype)))
    self.norm_last_layer = norm_last_layer
    self.dtype = jnp.dtype(dtype)

  def weight(self) -> jax.Array:
    """The effective [in_dim, K] weight, float32: unit columns, times g when it is trained."""
    v = self.kernel[...].astype(jnp.float32)
    # PyTorch's weight norm has no epsilon; a tiny floor keeps an all-zero column finite.
    w = v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=0, keepdims=True), 1e-24))
    if not self.norm_last_layer:
      w = w * self.scale[...].astype(jnp.float32)
    return w

  def __call__(self, x):
    return jnp.einsum("...d,dk->...k", x.astype(self.dtype), self.weight().astype(self.dtype),
                      preferred_element_type=jnp.float32)


class PrototypeHead(nnx.Module):
  """[..., in_dim] -> float32 prototype logits [..., num_prototypes] (DINO / iBOT head)."""

  def __init__(self, in_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
               num_prototypes: int = 65536, norm_last_layer: bool = True,
               dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs: nnx.Rngs):
    for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim),
                        ("bottleneck_dim", bottleneck_dim), ("num_prototypes", num_prototypes)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    self.mlp = ProjectionHead(in_dim, hidden_dim=hidden_dim, out_dim=bottleneck_dim,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.last_layer = WeightNormPrototypes(bottleneck_dim, num_prototypes,
                                           norm_last_layer=norm_last_layer, dtype=dtype,
                                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.last_layer(self.mlp(x))
