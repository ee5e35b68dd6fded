"""A backbone whose features are known by construction, for the evaluations' tests (imported as
`from stand_ins import ...`: pytest puts this folder on sys.path for the test modules in it).

Its patch tokens are each patch's mean standardised color and its [CLS] the image's mean color,
so what a retrieval, a PCA or a label propagation sees is fixed by the colors a test paints.
"""
import jax.numpy as jnp
from flax import nnx

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # the default config's normalization


class MeanColorViT(nnx.Module):
  """Patch tokens: each patch's mean standardised color; [CLS]: the image's mean color."""

  def __init__(self, patch=4):
    self.patch_size = patch
    self.scale = nnx.Param(jnp.ones(()))

  def __call__(self, images, mask=None, *, key=None, return_blocks=0):
    p = self.patch_size
    images = images[:, :images.shape[1] // p * p, :images.shape[2] // p * p]  # as a ViT's VALID conv
    b, h, w, c = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c).mean(axis=(2, 4)).reshape(b, -1, c)
    x = x * self.scale[...]
    return jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
