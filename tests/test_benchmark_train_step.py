"""The train-step benchmark's GPU mode, here on the smoke model: with data.augment = "device" it
times the whole step, views and masks included, on synthetic uint8 canvases made on the
devices; so does its backbone-only step."""
import os
import sys

import jax
import numpy as np
import pytest

from configs import smoke
from sove_jax import sharding, train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import train_step  # noqa: E402  (benchmarks/train_step.py)


@pytest.mark.slow
def test_gpu_mode_runs_the_step_with_device_views_on_synthetic_canvases():
  c = smoke.get_config()
  # A decoded source (as ImageNet's): the benchmark reads no data, only the batch's shapes.
  c.data.update(source="folder", data_dir="/nonexistent", augment="device", canvas_size=32)
  mesh = sharding.make_mesh(c.mesh)
  shapes = train.batch_shapes(c, mesh)
  batch = train_step.synthetic_batch(shapes, jax.random.PRNGKey(1))
  assert set(batch) == {"canvas", "size", "label"}  # the step draws the masks
  assert batch["canvas"].shape == (16, 32, 32, 3) and batch["canvas"].dtype == np.uint8
  assert batch["canvas"].sharding.is_equivalent_to(shapes["canvas"].sharding, 4)
  canvas = np.asarray(batch["canvas"])
  assert canvas.min() < 20 and canvas.max() > 235  # filled whole, not zeros
  np.testing.assert_array_equal(np.asarray(batch["size"]), np.full((16, 2), 32))
  r = train_step.bench(c, "full", steps=1, warmup=1)
  assert np.isfinite(r["loss"]) and r["ips"] > 0
  # The compiled step holds the views: more FLOPs than the networks and objective alone.
  assert r["flops_img_compiled"] > r["flops_img_analytic"]
  backbone = train_step.bench(c, "backbone", steps=1, warmup=1)
  assert np.isfinite(backbone["loss"])
