r"""Does SOVE learn? k-NN top-1 on Fashion-MNIST along a default-config run, against baselines.

    pip install -e '.[plot]'
    python benchmarks/learning_curve.py --workdir=runs/curve --knn_every=100

Measures k-NN top-1 (k = 20, and the other ks) of raw pixels and of the randomly initialized
network, trains `configs/default.py` with the k-NN monitor every `--knn_every` steps, then prints
a table and draws `docs/fashion_mnist_knn.png`. Every figure uses the same train-memory and
evaluation subsets (config `knn_train_examples`, `knn_eval_examples`; -1 = whole splits).
"""
import argparse
import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import default  # noqa: E402
from sove_jax import sharding, state as state_lib, train  # noqa: E402
from sove_jax.evaluate import features  # noqa: E402


def _by_k(metrics):
  return {int(k.rsplit("_k", 1)[1]): v for k, v in metrics.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/curve")
  p.add_argument("--knn_every", type=int, default=100)
  p.add_argument("--png", default="docs/fashion_mnist_knn.png")
  p.add_argument("--set", action="append", default=[],
                 help="config override FIELD=VALUE (python literal), repeatable")
  a = p.parse_args()

  config = default.get_config()
  for item in a.set:
    field, value = item.split("=", 1)
    node = config
    *parents, leaf = field.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value if isinstance(node[leaf], str) else ast.literal_eval(value)
  config.knn_every = a.knn_every

  from sove_jax.data import pipeline
  mesh = train.validated_mesh(config)
  setup = train.build(config, mesh, steps_per_epoch=1)
  graphdef = setup.layout.graphdef
  pixels = jax.jit(lambda x: features.l2_normalize(x.reshape(x.shape[0], -1)))
  monitor = train.knn_monitor(config, mesh, pipeline, graphdef)
  raw = _by_k(monitor(apply_fn=pixels))
  random_init = _by_k(monitor(state_lib.create(config, setup.tx, setup.layout,
                                               setup.image_size)))

  t0 = time.time()
  train.train_and_evaluate(config, a.workdir)
  wall = time.time() - t0
  curve = []
  with open(os.path.join(a.workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "knn/top1_k20" in row:
        curve.append(row)

  ks = tuple(config.knn_k)
  print(f"# Fashion-MNIST k-NN top-1 (%), train memory {config.knn_train_examples}, "
        f"eval {config.knn_eval_examples}; training wall time {wall / 60:.1f} min "
        f"(k-NN monitor included) on {sharding.devices_summary(mesh)}")
  print("| features | step | " + " | ".join(f"k={k}" for k in ks) + " |")
  print("|---|---|" + "---|" * len(ks))
  print("| raw pixels | - | " + " | ".join(f"{raw[k]:.2f}" for k in ks) + " |")
  print("| random init | 0 | " + " | ".join(f"{random_init[k]:.2f}" for k in ks) + " |")
  for row in curve:
    print(f"| SOVE teacher | {row['step']} | "
          + " | ".join(f"{row[f'knn/top1_k{k}']:.2f}" for k in ks) + " |")
  with open(os.path.join(a.workdir, "learning_curve.json"), "w") as f:
    json.dump({"raw_pixels": raw, "random_init": random_init, "curve": curve,
               "wall_seconds": wall}, f, indent=1)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
  ax.plot([0] + [r["step"] for r in curve], [random_init[20]] + [r["knn/top1_k20"] for r in curve],
          marker="o", label="SOVE teacher [CLS]")
  ax.axhline(raw[20], color="gray", linestyle="--", label="raw pixels")
  ax.axhline(random_init[20], color="tab:red", linestyle=":", label="random init")
  ax.set_xlabel("training step")
  ax.set_ylabel("k-NN top-1 (k=20), %")
  ax.set_title(f"Fashion-MNIST, configs/default.py, {wall / 60:.1f} min on CPU")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(a.png) or ".", exist_ok=True)
  fig.savefig(a.png)
  print(f"wrote {a.png}")


if __name__ == "__main__":
  main()
