r"""The search for the default Fashion-MNIST recipe: arms of config overrides, trained and scored.

    python benchmarks/tune_default.py run --arms=benchmarks/tune_arms.py --out=runs/tune
    python benchmarks/tune_default.py table --out=runs/tune > docs/tuning.md
    python benchmarks/tune_default.py speed --arms=benchmarks/tune_arms.py [--only=NAME,...]

`run` trains every arm (`python -m sove_jax.main --config=configs/default.py` with the arm's
overrides) into OUT/NAME, evaluates it with `python -m sove_jax.evaluate.knn` (whole test split),
and appends one JSON line to OUT/results.jsonl: overrides, steps, images/s, training wall time
and k-NN top-1. Finished arms are skipped, so a killed search continues where it stopped; an
interrupted arm resumes from its last checkpoint. `speed` times each arm's compiled step on a
synthetic batch in this process (wall ms/step, images/s, CPU ms per step and per image, compiled
FLOPs per image), one table, so recipes can be sized to a wall-time budget before they are
trained; CPU time is the steadier figure when other work shares the machine.

An arms file is a Python file defining `ARMS = [(name, {field: value, ...}), ...]` with dotted
config fields (`"optim.base_lr": 2e-3`), and optionally `BASE = {field: value}`, applied under
every arm's overrides and not shown in the table: the search's starting point, so that its arms
mean the same thing after `configs/default.py` adopts the result.
"""
import argparse
import json
import os
import runpy
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_arms(path, only=""):
  """[(name, overrides shown, overrides applied)]."""
  defs = runpy.run_path(path)
  base = defs.get("BASE", {})
  arms = [(n, ov, {**base, **ov}) for n, ov in defs["ARMS"]]
  names = [a[0] for a in arms]
  if len(set(names)) != len(names):
    raise SystemExit(f"{path}: arm names repeat")
  if only:
    keep = set(only.split(","))
    arms = [a for a in arms if a[0] in keep]
  return arms


def flag_value(v):
  if isinstance(v, (tuple, list)):
    return "(" + ",".join(repr(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  if isinstance(v, bool):
    return str(v)
  return str(v)


def read_jsonl(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_arm(name, overrides, applied, out, config, python):
  workdir = os.path.join(out, name)
  os.makedirs(workdir, exist_ok=True)
  args = [python, "-m", "sove_jax.main", f"--config={config}", f"--workdir={workdir}"]
  args += [f"--config.{k}={flag_value(v)}" for k, v in applied.items()]
  t0 = time.time()
  with open(os.path.join(workdir, "train.log"), "a") as log:
    rc = subprocess.call(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  train_s = time.time() - t0
  if rc != 0:
    return dict(arm=name, overrides=overrides, error=f"train rc {rc}", train_s=train_s)
  t0 = time.time()
  with open(os.path.join(workdir, "knn.log"), "w") as log:
    rc = subprocess.call([python, "-m", "sove_jax.evaluate.knn", f"--workdir={workdir}",
                          "--baselines=none"],   # the random init: once, not per arm
                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  eval_s = time.time() - t0
  if rc != 0:
    return dict(arm=name, overrides=overrides, error=f"knn rc {rc}", train_s=train_s)
  with open(os.path.join(workdir, "knn.json")) as f:
    knn = json.load(f)["top1"]["full"]
  metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  ips = sorted(m["perf/images_per_sec"] for m in metrics if "perf/images_per_sec" in m)
  last = metrics[-1] if metrics else {}
  return dict(arm=name, overrides=overrides, commit=_commit(), steps=last.get("step"), train_s=round(train_s, 1),
              eval_s=round(eval_s, 1), images_per_sec=round(ips[len(ips) // 2], 1) if ips else None,
              loss=last.get("train/loss"), knn={k: round(v, 2) for k, v in knn.items()})


def _commit():
  """The code an arm ran on (the search spans changes to the code as well as to the config)."""
  try:
    return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                   text=True).strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def cmd_run(a):
  os.makedirs(a.out, exist_ok=True)
  results = os.path.join(a.out, "results.jsonl")
  done = {r["arm"] for r in read_jsonl(results) if "error" not in r}
  for name, overrides, applied in load_arms(a.arms, a.only):
    if name in done:
      continue
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {overrides}", flush=True)
    r = run_arm(name, overrides, applied, a.out, a.config, sys.executable)
    r["finished"] = time.strftime("%Y-%m-%d %H:%M")
    with open(results, "a") as f:
      f.write(json.dumps(r) + "\n")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {r.get('knn', r.get('error'))}", flush=True)


def cmd_table(a):
  rows = read_jsonl(os.path.join(a.out, "results.jsonl"))
  print("| arm | overrides | steps | images/s | train s | k=10 | k=20 | k=100 | k=200 |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    ov = ", ".join(f"`{k}={flag_value(v)}`" for k, v in r["overrides"].items()) or "(default)"
    if "error" in r:
      print(f"| {r['arm']} | {ov} | {r['error']} | | | | | | |")
      continue
    k = r["knn"]
    print(f"| {r['arm']} | {ov} | {r['steps']} | {r['images_per_sec']:.0f} | {r['train_s']:.0f} "
          f"| {k['10']:.2f} | {k['20']:.2f} | {k['100']:.2f} | {k['200']:.2f} |")


def cmd_speed(a):
  sys.path.insert(0, ROOT)
  import jax

  from benchmarks import train_step as tsb
  from sove_jax import sharding, state as state_lib, train

  base = runpy.run_path(os.path.join(ROOT, a.config))["get_config"]
  print(f"# {jax.device_count()} x {jax.devices()[0].device_kind}; synthetic batch; "
        f"{a.steps} timed steps after {a.warmup}")
  print("| arm | ms/step | images/s | CPU ms/step | CPU ms/image | GFLOP/img compiled |")
  print("|---|---|---|---|---|---|")
  for name, _, overrides in load_arms(a.arms, a.only):
    c = base()
    for field, value in overrides.items():
      node = c
      *parents, leaf = field.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
    mesh = sharding.make_mesh(c.mesh)
    setup = train.build(c, mesh, steps_per_epoch=1000)
    st = state_lib.create(c, setup.tx, setup.layout, setup.image_size)
    batch = tsb.synthetic_batch(setup.batch, jax.random.PRNGKey(1))
    abstract = state_lib.abstract_with_shardings(setup.layout)
    compiled = setup.step.lower(abstract, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) / c.batch_size
    for _ in range(a.warmup):
      st, m = compiled(st, batch)
    jax.block_until_ready(m)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.steps):
      st, m = compiled(st, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / a.steps
    cpu = (time.process_time() - c0) / a.steps
    print(f"| {name} | {dt * 1e3:.1f} | {c.batch_size / dt:.0f} | {cpu * 1e3:.0f} | "
          f"{cpu * 1e3 / c.batch_size:.2f} | {flops / 1e9:.3f} |", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  for name in ("run", "table", "speed"):
    s = sub.add_parser(name)
    s.add_argument("--out", default="runs/tune")
    s.add_argument("--arms", default="benchmarks/tune_arms.py")
    s.add_argument("--only", default="")
    s.add_argument("--config", default="configs/default.py")
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--warmup", type=int, default=2)
  a = p.parse_args()
  {"run": cmd_run, "table": cmd_table, "speed": cmd_speed}[a.cmd](a)


if __name__ == "__main__":
  main()
