r"""Benchmark: judge selection + concept probabilities + class loss, forward and backward.

Measures the jitted value-and-gradient (w.r.t. the student embeddings) of the class loss
averaged over T tasks (each task: draw anchors, select judges, student and teacher log-probs):
- compiled peak temporary memory, `compiled.memory_analysis().temp_size_in_bytes`. On CPU it is
  given twice: under XLA's default CPU scheduler, which trades memory for concurrency between
  independent ops (the T tasks, student and teacher), and under its memory-minimizing scheduler
  (`--xla_cpu_enable_concurrency_optimized_scheduler=false`, compiled in a subprocess), which is
  closer to how GPU and TPU compilers schedule;
- wall time per call (median of --repeats runs after one warm-up), default scheduler.

Table 1: paper sizes (bank 65536 x 256, K = 8192, J = 9, 1536 student embeddings, 4 tasks) with
this package's formulation, against a 1 GiB budget; the dense formulation that builds the
K*J x K label matrix is compiled at that size for its memory only (not run).
Table 2: both formulations side by side at a size where the dense one fits (K = 2048).

    python benchmarks/objective.py            # several minutes on 2 CPU cores
    python benchmarks/objective.py --small    # a smoke run at reduced sizes
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from sove_jax import memory
from sove_jax import objective

GIB = 1024**3
MIN_MEMORY_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def dense_log_probs(u, judges, tau):
  """The formulation this package avoids: materialize Y (K*J x K), then log(softmax(z) @ Y)."""
  num_c, num_j, dim = judges.vectors.shape
  w = judges.weights.reshape(num_c * num_j, 1)
  r = (1.0 - w) / (num_c - 1)
  own = jax.nn.one_hot(jnp.repeat(jnp.arange(num_c), num_j), num_c, dtype=jnp.float32)
  labels = r + (w - r) * own                                   # [K*J, K]
  z = u @ judges.vectors.reshape(num_c * num_j, dim).T / tau
  return jnp.log(jax.nn.softmax(z, axis=-1) @ labels)


def make_loss(args, num_anchors, dense):
  log_probs = (dense_log_probs if dense else
               functools.partial(objective.concept_log_probs, chunk_size=args.concept_chunk))

  def loss(student, bank, key):
    total = 0.0
    for task in range(args.tasks):
      idx = objective.sample_anchors(jax.random.fold_in(key, task), args.bank, num_anchors)
      judges = objective.select_judges(bank, idx, args.neighbors, chunk_size=args.judge_chunk)
      student_lp = log_probs(student, judges, 0.1)
      teacher_p = jnp.exp(log_probs(jax.lax.stop_gradient(student[:2]), judges, 0.04))
      total = total + objective.class_loss(student_lp, teacher_p)
    return total / args.tasks

  return jax.jit(jax.value_and_grad(loss))


def inputs(args):
  key = jax.random.key(0)
  bank = memory.init_bank(jax.random.fold_in(key, 1), args.bank, args.dim).embeddings
  student = jax.random.normal(jax.random.fold_in(key, 2), (args.views, args.batch, args.dim))
  student = student / jnp.linalg.norm(student, axis=-1, keepdims=True)
  return student, bank, jax.random.fold_in(key, 3)


def configs(args):
  """(name, K, dense, run) for every measured configuration, in table order."""
  return [("ours", args.anchors, False, True), ("dense", args.anchors, True, False),
          ("ours_small", args.dense_anchors, False, True),
          ("dense_small", args.dense_anchors, True, True)]


def temp_bytes(args, num_anchors, dense, example):
  compiled = make_loss(args, num_anchors, dense).lower(*example).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes


def seconds(compiled, example, repeats):
  jax.block_until_ready(compiled(*example))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*example))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def min_memory_temps(argv):
  """Temp bytes per configuration under the memory-minimizing CPU scheduler (a subprocess:
  XLA reads its flags once per process)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + MIN_MEMORY_FLAG).strip()
  out = subprocess.run([sys.executable, __file__, "--memory_only", *argv], env=env,
                       check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bank", type=int, default=65536)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--anchors", type=int, default=8192)
  parser.add_argument("--dense_anchors", type=int, default=2048)
  parser.add_argument("--neighbors", type=int, default=8)
  parser.add_argument("--views", type=int, default=12)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--tasks", type=int, default=4)
  parser.add_argument("--judge_chunk", type=int, default=1024, help="anchors per search chunk")
  parser.add_argument("--concept_chunk", type=int, default=512, help="concepts per logit chunk")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--small", action="store_true", help="reduced sizes, a smoke run")
  parser.add_argument("--memory_only", action="store_true", help=argparse.SUPPRESS)
  argv = sys.argv[1:]
  args = parser.parse_args(argv)
  if args.small:
    args.bank, args.anchors, args.dense_anchors, args.batch, args.repeats = 4096, 512, 256, 16, 1
  example = jax.eval_shape(lambda: inputs(args)) if args.memory_only else inputs(args)

  if args.memory_only:
    print(json.dumps({name: temp_bytes(args, k, dense, example)[1]
                      for name, k, dense, _ in configs(args)}))
    return

  on_cpu = jax.default_backend() == "cpu"
  min_mem = min_memory_temps([a for a in argv if a != "--memory_only"]) if on_cpu else {}
  num_emb = args.views * args.batch
  print(f"device: {jax.devices()[0].device_kind} x1 ({jax.default_backend()}), "
        f"jax {jax.__version__}; bank {args.bank} x {args.dim}, J = {args.neighbors + 1}, "
        f"{num_emb} student embeddings ({args.views} views x {args.batch}), {args.tasks} tasks, "
        f"chunks: {args.judge_chunk} anchors / {args.concept_chunk} concepts; value_and_grad "
        f"of the class loss\n")

  results = {}
  for name, k, dense, run in configs(args):
    compiled, temp = temp_bytes(args, k, dense, example)
    results[name] = (temp, seconds(compiled, example, args.repeats) if run else None)
    del compiled

  def row(label, name, k):
    temp, secs = results[name]
    other = f"{min_mem[name] / GIB:.3f}" if name in min_mem else "-"
    time_s = "- (not run)" if secs is None else f"{secs:.2f}"
    return f"| {label} | {k} | {temp / GIB:.3f} | {other} | {time_s} |"

  header = ("| formulation | K | peak temp GiB (default CPU schedule) | "
            "peak temp GiB (memory-min schedule) | time (s) |\n|---|---|---|---|---|")
  ours_temp = results["ours"][0]
  print(f"Table 1: K = {args.anchors} (paper: 8192); budget 1 GiB: "
        f"{'met' if ours_temp <= GIB else 'NOT met'} ({ours_temp / GIB:.3f} GiB)\n")
  print(header)
  print(row("chunked, no label matrix (sove_jax)", "ours", args.anchors))
  print(row("dense label matrix (compiled only)", "dense", args.anchors))
  print(f"\nTable 2: side by side at K = {args.dense_anchors}\n")
  print(header)
  print(row("chunked, no label matrix (sove_jax)", "ours_small", args.dense_anchors))
  print(row("dense label matrix", "dense_small", args.dense_anchors))
  (t_o, s_o), (t_d, s_d) = results["ours_small"], results["dense_small"]
  min_ratio = (f"{min_mem['dense_small'] / min_mem['ours_small']:.2f}x" if min_mem else "-")
  print(f"| ratio dense / sove_jax | | {t_d / t_o:.2f}x | {min_ratio} | {s_d / s_o:.2f}x |")


if __name__ == "__main__":
  main()
