r"""Multi-crop views and masks on the device (sove_jax/views.py, sove_jax/masks.py): compiled
FLOPs per image next to the step's.

For each recipe and canvas: XLA's cost analysis of the compiled `views.make` (the crops alone and
the whole recipe, and the crops with whole-canvas resize matrices for comparison) and of the
image's two masks (`masks.draw`; its loops counted once per iteration body, so a lower bound),
divided by the batch; the ViT-S/16 SOVE train step's analytic FLOPs per image
(benchmarks/train_step.py) and the share of it of all the device's input work (views +
masks); the bytes per image that cross to the device (uint8 canvas + size) against the host
path's float32 views; and the time per image of the compiled views and masks on this backend
(on a CPU the process's CPU time over all its threads, on an accelerator wall time; best of
`--repeats`).

    python benchmarks/device_views.py
    python benchmarks/device_views.py --canvases 512,448 --batch 8
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sove_jax import masks, views  # noqa: E402
from sove_jax import step as step_lib  # noqa: E402


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def crops_only(recipe: views.Recipe) -> views.Recipe:
  """The recipe with every photometric op off: crops, flips and normalization only."""
  return dataclasses.replace(recipe, color_jitter_prob=0.0, grayscale_prob=0.0,
                             blur_prob=(0.0,) * 3, solarize_prob=(0.0,) * 3)


def _best_seconds(compiled, args, repeats: int, batch: int) -> float:
  """Best time per image of `compiled(*args, key)` over `repeats` keys (after a warm-up)."""
  jax.block_until_ready(compiled(*args, jax.random.key(0)))
  clock = time.process_time if jax.default_backend() == "cpu" else time.perf_counter
  best = float("inf")
  for i in range(repeats):
    start = clock()
    jax.block_until_ready(compiled(*args, jax.random.key(i + 1)))
    best = min(best, (clock() - start) / batch)
  return best


def measure(recipe: views.Recipe, canvas: tuple[int, int], channels: int = 3, batch: int = 8,
            repeats: int = 3, mask_recipe: masks.MaskRecipe | None = None) -> dict:
  """FLOPs and seconds per image of the device views from uint8 canvases of `canvas`, and of
  the two masks per image of `mask_recipe` (if given; "flops" and "seconds" hold both)."""
  rng = np.random.default_rng(0)
  canvases = jnp.asarray(rng.integers(0, 256, (batch, *canvas, channels), dtype=np.uint8))
  sizes = jnp.asarray(np.tile(np.array([canvas], np.int32), (batch, 1)))
  key = jax.random.key(0)
  make = lambda r: (lambda c, s, k: views.make(c, s, k, r))
  out = {"flops": _flops(make(recipe), canvases, sizes, key) / batch,
         "crop_flops": _flops(make(crops_only(recipe)), canvases, sizes, key) / batch,
         "mask_flops": 0.0, "mask_seconds": 0.0}

  def whole_canvas(c, s, k):  # the crops with resize matrices spanning the whole canvas
    params = views.draw(k, s, recipe)
    return [views.resized_crops(c, params[name].boxes, recipe.group(name)[1], params[name].flip)
            for name in recipe.groups]
  out["whole_canvas_crop_flops"] = _flops(whole_canvas, canvases, sizes, key) / batch
  compiled = jax.jit(make(recipe)).lower(canvases, sizes, key).compile()
  out["seconds"] = _best_seconds(compiled, (canvases, sizes), repeats, batch)
  if mask_recipe is not None:
    draw = lambda k: masks.draw(k, (batch, 2), mask_recipe)
    out["mask_flops"] = _flops(draw, key) / batch
    out["mask_seconds"] = _best_seconds(jax.jit(draw).lower(key).compile(), (), repeats, batch)
    out["flops"] += out["mask_flops"]
    out["seconds"] += out["mask_seconds"]
  out["bytes_device"] = canvas[0] * canvas[1] * channels + 2 * 4
  pixels = 2 * recipe.global_size ** 2 + recipe.num_local * recipe.local_size ** 2
  out["bytes_host"] = 4 * 3 * pixels  # float32 RGB views
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--canvases", default="512,448,384", help="square canvas sides, paper recipe")
  parser.add_argument("--batch", type=int, default=8, help="images per compiled call")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  from configs import default, vits  # ml_collections: only the benchmark's entry point needs it
  from train_step import step_flops_per_image
  paper = vits.get_config()
  step = step_flops_per_image(paper)
  rows = []
  for side in (int(s) for s in args.canvases.split(",")):
    rows.append((f"paper 2x224+10x96, canvas {side}x{side}x3", paper, (side, side), 3, step))
  small = default.get_config()
  rows.append(("default (Fashion-MNIST) 2x28+4x14, canvas 28x28x1", small, (28, 28), 1,
               step_flops_per_image(small)))

  clock = "CPU time" if jax.default_backend() == "cpu" else "wall time"
  print(f"\ndevice views, jax {jax.__version__} on {jax.devices()[0].device_kind} ({clock}), batch "
        f"{args.batch}; step: analytic SOVE train-step FLOPs per image (benchmarks/train_step.py) "
        f"of the config at its batch size ({paper.batch_size} for ViT-S/16)\n")
  print("| recipe | crops GFLOP/img (whole-canvas matrices) | masks GFLOP/img (ms/img here) | "
        "all GFLOP/img | step GFLOP/img | share of step | bytes/img to device (host path) | "
        "ms/img here |")
  print("|---|---|---|---|---|---|---|---|")
  for label, c, canvas, channels, step_flops in rows:
    r = measure(views.Recipe.from_config(c.data), canvas, channels, args.batch, args.repeats,
                step_lib.masks_for(c))
    print(f"| {label} | {r['crop_flops'] / 1e9:.3f} ({r['whole_canvas_crop_flops'] / 1e9:.3f}) | "
          f"{r['mask_flops'] / 1e9:.5f} ({r['mask_seconds'] * 1e3:.2f}) | "
          f"{r['flops'] / 1e9:.3f} | {step_flops / 1e9:.2f} | {r['flops'] / step_flops:.2%} | "
          f"{r['bytes_device'] / 1e3:.0f} kB ({r['bytes_host'] / 1e3:.0f} kB) | "
          f"{r['seconds'] * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
  main()
