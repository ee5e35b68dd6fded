r"""Input resume: time from restoring the input state to the first batch, early and late in an
epoch, for the three ways an ImageNet-shaped set can be read.

- tfrecord: TFDS TFRecord files, read as a stream; a resume at position k reads the k records
  before it again (`sources.TfdsSource`);
- array_record: TFDS ArrayRecord files, read by index inside tf.data; a resume at position k
  reads from k on (`indexed.ArrayRecordSource`);
- folder: the same JPEGs as an image folder, read by index (`sources.FileSource`).

The set is the synthetic ImageNet-shaped one (sove_jax/data/synthetic.py: ImageNet's size mix,
~116 kB JPEGs), written once (or given with --data). The recipe is the paper's (configs/vits.py:
2 x 224 + 10 x 96 views, block masks), with data.augment "device" (the host decodes and fits
each image into a 512 canvas) and "host" (the host makes the views). One process; for each
(source, mode) one warm input is made, then each repeat restores the state at the position
(`TrainInput.set_state`, which drops the running pipeline) and times until `next()` returns the
first batch. Files are in the page cache after the first repeat (a bucket would make the stream's
re-read cost more, not less); the min and median of the repeats are reported. The stream's
shuffle buffer is scaled to the set (default images // 16, as the configs' 10,000 records are to
ImageNet's 160,000 a host on 8 hosts): a buffer as large as the split is filled, the whole split
read, before the first batch at any position, which would hide the cost of the position.

    python benchmarks/input_resume.py                          # 3000 images, positions 0 and 90%
    python benchmarks/input_resume.py --images 5000 --repeats 7 --data /tmp/synthetic
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import vits  # noqa: E402
from sove_jax import allocator  # noqa: E402
from sove_jax.data import pipeline, sources, synthetic  # noqa: E402

SOURCES = ("tfrecord", "array_record", "folder")
CANVAS = 512


def data_config(kind: str, dirs: dict, mode: str, shuffle_buffer: int):
  d = vits.get_config().data
  if kind == "folder":
    d.update(source="folder", data_dir=dirs["folder"])
  else:
    d.update(source="tfds", name=synthetic.NAME, data_dir=dirs[kind])
  d.update(augment=mode, canvas_size=CANVAS if mode == "device" else 0, threads=0,
           shuffle_buffer=shuffle_buffer)
  return d


def measure(d, *, batch: int, positions: list[float], repeats: int) -> dict:
  """{fraction: (seconds of each repeat, records before the position)}."""
  source = sources.open_source(d, "train")
  train = pipeline.TrainInput(source, d, patch_size=16, global_batch_size=batch, seed=0,
                              process_index=0, process_count=1)
  per_epoch = train.steps_per_epoch * batch
  next(train)  # warm: traced stages, opened files
  out = {}
  for fraction in positions:
    position = int(fraction * per_epoch) // batch * batch
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      train.set_state({"process_count": 1, "processes": [{"epoch": 0, "position": position}]})
      next(train)
      times.append(time.perf_counter() - start)
    out[fraction] = (times, position)
  train.set_state({"epoch": 0, "position": 0, "process_count": 1})  # drops the last pipeline
  return out


def main():
  allocator.reexec_with_tcmalloc()  # the trainer's allocator
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=3000, help="JPEGs in the training split")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--data", default="", help="write (or reuse) the set here; default a "
                      "temporary folder, deleted at the end")
  parser.add_argument("--sources", default=",".join(SOURCES), help=f"some of {SOURCES}")
  parser.add_argument("--modes", default="device,host", help="data.augment values")
  parser.add_argument("--positions", default="0,0.9", help="fractions of the epoch")
  parser.add_argument("--batch", type=int, default=16, help="the (one process's) batch")
  parser.add_argument("--shuffle_buffer", type=int, default=0,
                      help="the TFRecord stream's shuffle buffer (default images // 16: the "
                      "ratio of the configs' 10,000 to ImageNet's 160,000 records per host on 8 "
                      "hosts; a buffer as large as the split would be filled, read whole, "
                      "before the first batch at any position)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  kinds, modes = args.sources.split(","), args.modes.split(",")
  if set(kinds) - set(SOURCES) or set(modes) - {"host", "device"}:
    parser.error(f"--sources must be some of {SOURCES}, --modes some of host, device")
  positions = [float(p) for p in args.positions.split(",")]

  with tempfile.TemporaryDirectory() as tmp:
    root = args.data or tmp
    dirs = {"folder": os.path.join(root, "folder"),
            "tfrecord": os.path.join(root, "tfds_tfrecord"),
            "array_record": os.path.join(root, "tfds_array_record")}
    if not all(os.path.isdir(p) for p in dirs.values()):
      synthetic.write(root, images=args.images, classes=args.classes,
                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    train_dir = os.path.join(dirs["folder"], "train")
    count = sum(len(files) for _, _, files in os.walk(train_dir))
    nbytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(train_dir)
                 for f in fs)
    rows = []
    for kind in kinds:
      for mode in modes:
        buffer = args.shuffle_buffer or max(args.images // 16, 1)
        result = measure(data_config(kind, dirs, mode, buffer), batch=args.batch,
                         positions=positions, repeats=args.repeats)
        for fraction, (times, position) in result.items():
          rows.append((kind, mode, fraction, position, times))
        print(f"measured {kind}, {mode}", file=sys.stderr, flush=True)

  print(f"\ninput resume, paper recipe (2 x 224 + 10 x 96, canvas {CANVAS} in device mode), one "
        f"process, batch {args.batch}, {count} training JPEGs ({nbytes / count / 1e3:.0f} kB "
        f"each), {os.cpu_count()} CPUs, host allocator {allocator.in_use()}; seconds from "
        f"set_state to the first batch, {args.repeats} repeats; TFRecord shuffle buffer "
        f"{args.shuffle_buffer or max(args.images // 16, 1)}\n")
  print("| source | data.augment | position in the epoch | records read again | min s | "
        "median s |")
  print("|---|---|---|---|---|---|")
  for kind, mode, fraction, position, times in rows:
    again = position if kind == "tfrecord" else 0
    print(f"| {kind} | {mode} | {fraction:.0%} ({position}) | {again} | {min(times):.2f} | "
          f"{statistics.median(times):.2f} |")


if __name__ == "__main__":
  main()
