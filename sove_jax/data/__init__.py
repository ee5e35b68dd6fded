"""Host-side tf.data input: sources, multi-crop augmentation, patch masks. The only place TensorFlow is imported."""
