"""Synthetic host batches with a config's shapes, shared by the step tests (imported by name:
pytest puts this folder on sys.path for the test modules in it)."""
import numpy as np


def synthetic_batch(config, seed=0):
  """Random views, 30% masked tokens and zero labels, as the host pipeline delivers a batch."""
  d, b = config.data, config.batch_size
  rng = np.random.default_rng(seed)
  tokens = (d.global_size // config.model.patch_size) ** 2
  return {
      "global": rng.normal(size=(b, 2, d.global_size, d.global_size, 3)).astype(np.float32),
      "local": rng.normal(size=(b, d.num_local, d.local_size, d.local_size, 3)).astype(np.float32),
      "mask": rng.random((b, 2, tokens)) < 0.3,
      "label": np.zeros((b,), np.int32),
  }
