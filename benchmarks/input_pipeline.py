r"""Input pipeline throughput: images per second per CPU core, and the share of time per stage.

Two recipes:
- paper: 2 x 224 + 10 x 96 crops, block masks on 14 x 14 patches, from JPEG photographs of
  ImageNet size (made here: smooth shapes, edges, texture and sensor noise at JPEG quality 90,
  about the byte size of ImageNet's), read from an image folder;
- fashion_mnist: the default config (2 x 28 + 6 x 14 crops, 4 x 4 patches) on the real
  Fashion-MNIST train split, in memory.

"Per core": tf.data runs on a private pool of one thread, each op single-threaded, and the cost
is the process's CPU time per image (so other load on a shared machine does not count). A
stage's share is the growth in CPU time per image when the pipeline is cut after it instead of
before it; each cut is timed `--repeats` times and the best run counts.

    python benchmarks/input_pipeline.py                   # both recipes
    python benchmarks/input_pipeline.py --recipe paper --images 256
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402
from sove_jax.data import pipeline, sources  # noqa: E402

IMAGENET_SIZES = [(375, 500), (500, 375), (333, 500), (500, 500), (480, 640), (400, 500),
                  (500, 333)]


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


def paper_recipe(root: str, n: int):
  rng = np.random.default_rng(0)
  photos = [photograph(rng, *IMAGENET_SIZES[i % len(IMAGENET_SIZES)]) for i in range(n)]
  sources.write_image_folder(root, "train", photos, [i % 10 for i in range(n)],
                             image_format="jpeg", quality=90)
  d = default.get_config().data
  d.update(source="folder", data_dir=root, global_size=224, local_size=96, num_local=10,
           global_scale=(0.14, 1.0), local_scale=(0.05, 0.4), eval_resize=256, eval_crop=224,
           mask_type="block", mask_ratio=0.3)
  return d, 16  # patch size


def fashion_mnist_recipe():
  c = default.get_config()
  return c.data, c.model.patch_size


def measure(d, patch: int, batch: int, images: int, threads: int,
            repeats: int) -> list[tuple[str, float]]:
  """CPU seconds per image with the pipeline cut after each stage, in stage order.

  CPU time of this process (all its threads), not wall time: other work on a shared machine
  slows the clock but not the count of cycles spent. The best of `repeats` runs counts.
  """
  d.threads, d.prefetch = threads, 2
  train = pipeline.train_input(d, patch_size=patch, global_batch_size=batch, seed=0,
                               process_index=0, process_count=1)
  out = []
  for stage in train.stages():
    best = float("inf")
    for _ in range(repeats):
      it = train.dataset(0, 0, stop_after=stage).as_numpy_iterator()
      seen = 0
      while seen < batch:  # warm-up: one batch worth of images
        seen += np.size(next(it)["position"])
      seen, start = 0, time.process_time()
      while seen < images:
        seen += np.size(next(it)["position"])
      best = min(best, (time.process_time() - start) / seen)
      del it
    out.append((stage, best))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipe", choices=["all", "paper", "fashion_mnist"], default="all")
  parser.add_argument("--images", type=int, default=160, help="JPEGs made for the paper recipe")
  parser.add_argument("--threads", type=int, default=1, help="tf.data threads (1 = per core)")
  parser.add_argument("--repeats", type=int, default=3, help="runs per stage; the best counts")
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if args.recipe in ("all", "paper"):
      d, patch = paper_recipe(tmp, args.images)
      sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp) for f in fs]
      label = f"paper 2x224+10x96, JPEG {np.mean(sizes) / 1024:.0f} KB"
      rows.append((label, measure(d, patch, batch=16, images=args.images - 32,
                                  threads=args.threads, repeats=args.repeats)))
    if args.recipe in ("all", "fashion_mnist"):
      d, patch = fashion_mnist_recipe()
      rows.append(("fashion_mnist 2x28+6x14", measure(d, patch, batch=128, images=128 * 20,
                                                       threads=args.threads, repeats=args.repeats)))
  cores = f"{args.threads} thread(s)" if args.threads else "all cores"
  print(f"\ninput pipeline, tf.data on {cores} ({os.cpu_count()} CPUs on this machine)\n")
  print("| recipe | stage | CPU ms/image (cut after) | share | images/s per core |")
  print("|---|---|---|---|---|")
  for label, stages in rows:
    total, prev = stages[-1][1], 0.0
    for stage, t in stages:
      share = max(t - prev, 0.0) / total
      print(f"| {label} | {stage} | {t * 1e3:.3f} | {share:.0%} | |")
      prev = t
    print(f"| {label} | **all** | {total * 1e3:.3f} | 100% | **{1 / total:.0f}** |")


if __name__ == "__main__":
  main()
