"""sove_jax: SOVE self-supervised pretraining for Vision Transformers in JAX.

Importing the package imports nothing heavy: `from sove_jax import objective` needs only JAX.
TensorFlow is imported inside `sove_jax.data` alone.
"""

__version__ = "0.1.0"
