"""Host-side tf.data input: sources, multi-crop augmentation, patch masks.

The only place TensorFlow is imported.

TensorFlow is told here, before any pipeline exists, that it may not use a GPU: the accelerators
belong to JAX, and a TensorFlow that grabbed one would reserve most of its memory.
"""
import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # TensorFlow had already initialized its devices
  pass
