r"""Input pipeline: host CPU per image and bytes per image to the device, views made on the host
(data.augment = "host") or on the device ("device"), side by side on the same images.

Recipes:
- paper: 2 x 224 + 10 x 96 views, block masks on 14 x 14 patches, from JPEG photographs of
  ImageNet size (made here: smooth shapes, edges, texture and sensor noise at JPEG quality 90,
  about the byte size of ImageNet's; one size in seven, 480 x 640, is larger than the canvas),
  read from an image folder; device mode fits them into 512 x 512 uint8 canvases;
- large (only when asked): the paper recipe from 1536 x 2048 JPEGs, where device mode decodes
  at 1/4 scale in the DCT domain;
- fashion_mnist: the default config (2 x 28 px views, no local ones; 4 x 4 patches) on the real
  Fashion-MNIST train split in memory; device mode keeps the images on the device and sends
  indices.

Host side, "per core": tf.data runs on a private pool of one thread, each op single-threaded,
and the cost is the process's CPU time per image (so other load on a shared machine does not
count). A stage's share is the growth in CPU time per image when the pipeline is cut after it
instead of before it; each cut is timed `--repeats` times and the best run counts. Bytes per
image: the arrays of one host batch (what `pipeline.to_global` sends), over its images.
Device side (device mode): XLA's compiled FLOPs per image of the views and masks
(benchmarks/device_views.py), their share of the config's analytic train-step FLOPs
(benchmarks/train_step.py; ViT-S/16 for the paper recipe), and their time per image on this
backend (on a CPU, CPU time). In device mode the host draws no masks: the step does.

    python benchmarks/input_pipeline.py                   # paper and fashion_mnist
    python benchmarks/input_pipeline.py --recipe paper,large --images 128
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default, vits  # noqa: E402
from sove_jax import allocator, views  # noqa: E402
from sove_jax import step as step_lib  # noqa: E402
from sove_jax.data import pipeline, sources  # noqa: E402

IMAGENET_SIZES = [(375, 500), (500, 375), (333, 500), (500, 500), (480, 640), (400, 500),
                  (500, 333)]
LARGE_SIZES = [(1536, 2048), (2048, 1536)]
PAPER_CANVAS = 512


def photograph(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A synthetic photo: smooth gradients and blobs, a few hard-edged shapes, fine texture, noise."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.zeros((h, w, 3), np.float32)
  for _ in range(6):  # low-frequency light and color
    fy, fx = rng.uniform(0.5, 4, 2) * np.pi / np.array([h, w])
    img += rng.uniform(20, 60, 3) * np.sin(fy * y + fx * x + rng.uniform(0, 6.3))[..., None]
  for _ in range(8):  # objects with edges
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, min(h, w) / 3)
    inside = (y - cy) ** 2 + ((x - cx) * rng.uniform(0.5, 2)) ** 2 < r ** 2
    img[inside] = img[inside] * 0.3 + rng.uniform(0, 255, 3) * 0.7
  texture = rng.normal(0, 1, (h // 2 + 1, w // 2 + 1, 1)).repeat(2, 0).repeat(2, 1)[:h, :w]
  img += 20 * texture + rng.normal(0, 10, (h, w, 3))
  return np.clip(img + 128, 0, 255).astype(np.uint8)


def paper_recipe(root: str, n: int, sizes=IMAGENET_SIZES):
  """The ViT-S/16 config's data block on `n` JPEGs written to `root`: (config, patch size)."""
  rng = np.random.default_rng(0)
  photos = [photograph(rng, *sizes[i % len(sizes)]) for i in range(n)]
  sources.write_image_folder(root, "train", photos, [i % 10 for i in range(n)],
                             image_format="jpeg", quality=90)
  c = vits.get_config()
  c.data.update(source="folder", data_dir=root, canvas_size=PAPER_CANVAS)
  return c, c.model.patch_size


def fashion_mnist_recipe():
  c = default.get_config()
  return c, c.model.patch_size


def measure(d, patch: int, batch: int, images: int, threads: int,
            repeats: int) -> tuple[list[tuple[str, float]], float]:
  """(CPU seconds per image with the pipeline cut after each stage, in stage order; bytes per
  image of a whole host batch).

  CPU time of this process (all its threads), not wall time: other work on a shared machine
  slows the clock but not the count of cycles spent. The best of `repeats` runs counts.
  """
  d.threads, d.prefetch = threads, 2
  train = pipeline.train_input(d, patch_size=patch, global_batch_size=batch, seed=0,
                               process_index=0, process_count=1)
  out, nbytes = [], float("nan")
  for stage in train.stages():
    best = float("inf")
    for _ in range(repeats):
      it = train.dataset(0, 0, stop_after=stage).as_numpy_iterator()
      seen = 0
      while seen < batch:  # warm-up: one batch worth of images
        element = next(it)
        seen += np.size(element["position"])
      seen, start = 0, time.process_time()
      while seen < images:
        seen += np.size(next(it)["position"])
      best = min(best, (time.process_time() - start) / seen)
      del it
    out.append((stage, best))
  sent = {k: v for k, v in element.items() if k not in ("epoch", "position")}  # whole pipeline
  nbytes = sum(v.nbytes for v in sent.values()) / batch
  return out, nbytes


def device_side(c, channels: int, canvas: tuple[int, int], repeats: int) -> dict:
  """The device views' and masks' compiled FLOPs and time per image, and the step's analytic
  FLOPs."""
  import device_views  # noqa: E402  (beside this file; imports JAX only now)
  from train_step import step_flops_per_image  # noqa: E402
  r = device_views.measure(views.Recipe.from_config(c.data), canvas, channels, batch=8,
                           repeats=repeats, mask_recipe=step_lib.masks_for(c))
  return dict(flops=r["flops"], seconds=r["seconds"], step_flops=step_flops_per_image(c))


def main():
  allocator.reexec_with_tcmalloc()  # the trainer's allocator: batches are big allocations
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipe", default="paper,fashion_mnist",
                      help="comma-separated: paper, large, fashion_mnist")
  parser.add_argument("--images", type=int, default=160, help="JPEGs made for the paper recipe")
  parser.add_argument("--threads", type=int, default=1, help="tf.data threads (1 = per core)")
  parser.add_argument("--repeats", type=int, default=3, help="runs per stage; the best counts")
  parser.add_argument("--modes", default="host,device", help="comma-separated: host, device")
  parser.add_argument("--batch", type=int, default=16,
                      help="per-host batch of the JPEG recipes (2 batches of images warm up)")
  args = parser.parse_args()
  recipes = args.recipe.split(",")
  unknown = set(recipes) - {"paper", "large", "fashion_mnist"}
  if unknown:
    parser.error(f"unknown recipe(s) {sorted(unknown)}")
  modes = args.modes.split(",")
  if set(modes) - {"host", "device"}:
    parser.error(f"unknown mode(s) {sorted(set(modes) - {'host', 'device'})}")

  rows = []  # (label, mode, stages, bytes, device figures or None)
  for name in recipes:
    with tempfile.TemporaryDirectory() as tmp:
      if name in ("paper", "large"):
        n = args.images if name == "paper" else max(args.images // 4, 40)
        c, patch = paper_recipe(tmp, n, IMAGENET_SIZES if name == "paper" else LARGE_SIZES)
        sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp) for f in fs]
        label = (f"{name} 2x224+10x96, JPEG {np.mean(sizes) / 1024:.0f} KB "
                 f"({'ImageNet sizes' if name == 'paper' else '1536 x 2048'})")
        batch, count = args.batch, n - 2 * args.batch
        if count < 1:
          parser.error(f"--images {n} leave no image to measure after 2 batches of {batch}")
        canvas, channels = (PAPER_CANVAS, PAPER_CANVAS), 3
      else:
        c, patch = fashion_mnist_recipe()
        fm = c.data
        crops = f"2x{fm.global_size}" + (f"+{fm.num_local}x{fm.local_size}" if fm.num_local else "")
        label, batch, count = f"fashion_mnist {crops}", 128, 128 * 20
        canvas, channels = (28, 28), 1
      for mode in modes:
        d = c.data.copy_and_resolve_references()
        d.augment = mode
        if mode == "device" and d.source == "fashion_mnist":
          d.canvas_size = 0
        stages, nbytes = measure(d, patch, batch, count, args.threads, args.repeats)
        device = device_side(c, channels, canvas, args.repeats) if mode == "device" else None
        rows.append((label, mode, stages, nbytes, device))
        print(f"measured {label}, {mode}", file=sys.stderr, flush=True)

  cores = f"{args.threads} thread(s)" if args.threads else "all cores"
  print(f"\ninput pipeline, tf.data on {cores} ({os.cpu_count()} CPUs on this machine), "
        f"host allocator {allocator.in_use()}\n")
  print("| recipe | data.augment | host CPU ms/image | images/s per core | bytes/image to "
        "device | device views + masks GFLOP/image | share of the step | device views + masks "
        "ms/image here |")
  print("|---|---|---|---|---|---|---|---|")
  for label, mode, stages, nbytes, device in rows:
    total = stages[-1][1]
    dev = ("| - | - | -" if device is None else
           f"| {device['flops'] / 1e9:.3f} | {device['flops'] / device['step_flops']:.2%} "
           f"(of {device['step_flops'] / 1e9:.1f}) | {device['seconds'] * 1e3:.1f}")
    print(f"| {label} | {mode} | {total * 1e3:.3f} | {1 / total:.0f} | {nbytes / 1e3:.1f} kB "
          f"{dev} |")
  print("\n| recipe | data.augment | stage | CPU ms/image (cut after) | share |")
  print("|---|---|---|---|---|")
  for label, mode, stages, _, _ in rows:
    total, prev = stages[-1][1], 0.0
    for stage, t in stages:
      print(f"| {label} | {mode} | {stage} | {t * 1e3:.3f} | {max(t - prev, 0.0) / total:.0%} |")
      prev = t


if __name__ == "__main__":
  main()
