"""SOVE projection head (docs/method.md §9): Linear-GELU-Linear-GELU-Linear, L2-normalized output.

One head serves [CLS] and patch tokens, so it maps any leading shape. There is no prototype
layer: the banks play that role. The last layer accumulates and returns float32, since the
objective compares unit vectors at temperature 0.04 and a bf16 rounding of them would show.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sove_jax.models.vit import Dense


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) along the last axis, with a finite gradient at zero."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class ProjectionHead(nnx.Module):
  """[..., in_dim] -> float32 [..., out_dim] with unit L2 norm."""

  def __init__(self, in_dim: int, *, hidden_dim: int = 2048, out_dim: int = 256,
               dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Dense((in_dim,), (hidden_dim,), in_names=("embed",),
                     out_names=("proj_hidden",), **common)
    self.fc2 = Dense((hidden_dim,), (hidden_dim,), in_names=(None,),
                     out_names=("proj_hidden",), **common)
    self.fc3 = Dense((hidden_dim,), (out_dim,), in_names=("proj_hidden",),
                     out_names=("proj_out",), out_dtype=jnp.float32, **common)

  def __call__(self, x):
    x = jax.nn.gelu(self.fc1(x), approximate=False)
    x = jax.nn.gelu(self.fc2(x), approximate=False)
    return l2_normalize(self.fc3(x))
