r"""What feeding the devices from a thread buys, and what the hosts' in-band agreement costs.

    python benchmarks/feeding.py [--rounds=3] [--steps=120] [--config=configs/default.py]

1. The training loop (`python -m sove_jax.main`, the config's recipe, no k-NN monitor, one save
   at the end) with `prefetch_to_device` 0 (batches built and put on the devices between steps,
   on the main thread) and 2 (built on a thread while the step runs, `sove_jax/feed.py`), the two
   alternating round by round; each round's figure is the median of its logged windows'
   steps/s after the first window (compilation and warm-up left out).
2. The jitted step alone, with and without the hosts' flags (`sove_jax/hosts.py`: an int32 per
   example in, three reduced scalars out), the same state and batch, alternating, the median
   of `--step_repeats` timed calls each.

Both print tables; ratios are within one run on one machine.
"""
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds per setting.")
_STEPS = flags.DEFINE_integer("steps", 120, "Training steps per round.")
_CONFIG = flags.DEFINE_string("config", str(ROOT / "configs" / "default.py"), "Config file.")
_STEP_REPEATS = flags.DEFINE_integer("step_repeats", 30, "Timed calls of the bare step.")
_DEPTHS = flags.DEFINE_list("depths", ["0", "2"], "prefetch_to_device settings compared.")


def loop_round(depth: int, steps: int, config: str) -> float:
  """ms per step of one training run (median of its logged windows after the first)."""
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, "-m", "sove_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.total_steps={steps}", "--config.knn_every=0",
           "--config.checkpoint_every=0", "--config.log_every=10",
           f"--config.prefetch_to_device={depth}",
           # Short runs: the schedules' warm-ups made to fit (the step costs the same).
           "--config.optim.warmup_epochs=0.0", "--config.sove.teacher_temp_warmup_epochs=0.0"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    lines = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
             .splitlines()]
  rates = [x["perf/steps_per_sec"] for x in lines if "perf/steps_per_sec" in x][1:]
  return 1000.0 / statistics.median(rates)


def bare_step_ms(config_path: str, repeats: int, rounds: int) -> dict:
  """{with flags: [ms], without: [ms]}: the compiled step alone, alternating."""
  import jax
  import numpy as np

  from sove_jax import configuration, hosts, sharding, state as state_lib, train
  config = configuration.load(config_path)
  mesh = sharding.make_mesh(config.mesh)
  out = {True: [], False: []}
  setups = {f: train.build(config, mesh, steps_per_epoch=1000, host_flags=f) for f in out}
  rng = np.random.default_rng(0)
  base = {k: v for k, v in setups[True].batch.items() if k != "host_flags"}

  def host_array(spec):
    if np.issubdtype(spec.dtype, np.floating):
      return rng.standard_normal(spec.shape).astype(spec.dtype)
    if spec.dtype == np.bool_:
      return rng.random(spec.shape) < 0.3
    return rng.integers(0, 10, spec.shape).astype(spec.dtype)

  batch = {k: jax.device_put(host_array(v), v.sharding) for k, v in base.items()}
  flagged = dict(batch, host_flags=jax.device_put(
      hosts.flag_rows(0, 0, config.batch_size), setups[True].batch["host_flags"].sharding))
  compiled = {f: s.step.lower(state_lib.abstract_with_shardings(s.layout), s.batch).compile()
              for f, s in setups.items()}
  for _ in range(rounds):
    for f in (False, True):
      state = state_lib.create(config, setups[f].tx, setups[f].layout, setups[f].image_size)
      args = flagged if f else batch
      state, metrics = compiled[f](state, args)  # warm
      jax.block_until_ready(metrics)
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled[f](state, args)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
      out[f].append(1000 * statistics.median(times))
  return out


def main(argv):
  del argv
  depths = [int(d) for d in _DEPTHS.value]
  loop = {d: [] for d in depths}
  for r in range(_ROUNDS.value):
    for d in depths:
      loop[d].append(loop_round(d, _STEPS.value, _CONFIG.value))
      print(f"round {r + 1}: prefetch_to_device={d}: {loop[d][-1]:.1f} ms/step", flush=True)
  print(f"\n1. Training loop, {pathlib.Path(_CONFIG.value).name}, {_STEPS.value} steps a round, "
        f"{os.cpu_count()} CPUs\n")
  print("| prefetch_to_device | ms/step per round | best | median |\n|---|---|---|---|")
  for d in depths:
    print(f"| {d} | {', '.join(f'{x:.1f}' for x in loop[d])} | {min(loop[d]):.1f} | "
          f"{statistics.median(loop[d]):.1f} |")
  if len(depths) == 2:
    a, b = depths
    print(f"\nmedian ratio {a}/{b}: {statistics.median(loop[a]) / statistics.median(loop[b]):.3f}")
  step = bare_step_ms(_CONFIG.value, _STEP_REPEATS.value, _ROUNDS.value)
  print(f"\n2. The step alone, median of {_STEP_REPEATS.value} calls a round\n")
  print("| step | ms per round | median |\n|---|---|---|")
  for f, name in ((False, "without host flags"), (True, "with host flags (hosts.agreeing)")):
    print(f"| {name} | {', '.join(f'{x:.1f}' for x in step[f])} | "
          f"{statistics.median(step[f]):.1f} |")
  print(f"\nmedian ratio with/without: "
        f"{statistics.median(step[True]) / statistics.median(step[False]):.3f}")


if __name__ == "__main__":
  app.run(main)
