r"""Where a config's views should be made, data.augment "host" or "device": its training loop in
both modes, side by side on this machine.

The loop is the trainer's: the next host batch -> global arrays (in device mode joined by the
device-resident images of an in-memory source) -> the compiled step, the previous step's
metrics read after each step. "host": the tf.data pipeline crops, colors and normalizes on the
CPU cores while the step runs; "device": Fashion-MNIST lives in device memory, the host sends
indices, and the step cuts the views and draws the masks (sove_jax/views.py, sove_jax/masks.py).
On a CPU backend the same cores do both, so this says which is faster for a CPU run, e.g. the
default config's.

Rounds alternate host, device, host, device, ... so that load from other work on a shared
machine falls on both alike. Each round restarts the input at the same position (no batches
prepared by the previous round), takes `--warmup` untimed steps, then times `--steps`; the best
round of each mode counts, and the table shows the median too. CPU time is the process's, all
threads: on a machine shared with other work the wall clock measures the contention as much as
the loop, and the CPU time per step (input and step together, on a CPU backend) is the steadier
figure; the verdict names the faster mode by both.

    python benchmarks/augment_modes.py                        # the default config
    python benchmarks/augment_modes.py --config configs/smoke.py --rounds 2 --steps 4

Measured (`--rounds 3 --steps 20`, the default config, batch 64, no local crops, on the quiet
2-core CPU): 253 ms per step "host", 252 "device" (best rounds; medians equal); CPU per step
484 vs 474 ms (medians, "device" 2% less). Again with the masks drawn in the step, on a busier
machine: 294 vs 288 ms (best), CPU 578 vs 595 ms (medians). A tie: the default config keeps
"host", with which its figures were measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sove_jax import configuration, sharding, state as state_lib, train  # noqa: E402
from sove_jax.data import pipeline  # noqa: E402

MODES = ("host", "device")


class Loop:
  """One mode's input, compiled step and state, run a round at a time."""

  def __init__(self, config, mode: str, mesh):
    self.config = config = config.copy_and_resolve_references()
    config.data.augment = mode
    configuration.validate(config, num_devices=mesh.devices.size)
    self.input = pipeline.train_input(config.data, patch_size=config.model.patch_size,
                                      global_batch_size=config.batch_size, seed=config.seed,
                                      process_index=0, process_count=1)
    self.resident = pipeline.device_resident(self.input, sharding.replicated(mesh))
    setup = train.build(config, mesh, self.input.steps_per_epoch, resident=self.resident)
    self.state = state_lib.create(config, setup.tx, setup.layout, setup.image_size)
    t0 = time.perf_counter()
    self.step = setup.step.lower(state_lib.abstract_with_shardings(setup.layout),
                                 setup.batch).compile()
    self.compile_seconds = time.perf_counter() - t0
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.start = self.input.get_state()

  def run(self, steps: int) -> float:
    pending = None
    for _ in range(steps):
      batch = pipeline.to_global(next(self.input), self.batch_sharding) | self.resident
      self.state, metrics = self.step(self.state, batch)
      if pending is not None:
        jax.device_get(pending)
      pending = metrics
    return float(jax.device_get(pending)["loss"])

  def round(self, warmup: int, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step over `steps` after `warmup`, from the first position."""
    self.input.set_state(self.start)  # drops the running pipeline and what it prepared
    self.run(warmup)
    wall, cpu = time.perf_counter(), time.process_time()
    loss = self.run(steps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not np.isfinite(loss):
      raise FloatingPointError(f"data.augment={self.config.data.augment!r}: loss {loss}")
    return wall / steps, cpu / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs", "default.py"))
  parser.add_argument("--rounds", type=int, default=3, help="rounds per mode, alternating")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
  args = parser.parse_args()

  config = configuration.load(args.config)
  mesh = train.validated_mesh(config)
  loops = {mode: Loop(config, mode, mesh) for mode in MODES}
  times = {mode: [] for mode in MODES}
  for r in range(args.rounds):
    for mode in MODES:
      times[mode].append(loops[mode].round(args.warmup, args.steps))
      wall, cpu = times[mode][-1]
      print(f"round {r + 1} {mode}: {wall * 1e3:.0f} ms/step, CPU {cpu * 1e3:.0f} ms/step",
            flush=True)

  b = config.batch_size
  best = {mode: min(t[0] for t in times[mode]) for mode in MODES}
  cpu = {mode: float(np.median([t[1] for t in times[mode]])) for mode in MODES}
  print(f"\n{os.path.basename(args.config)}: batch {b}, {config.data.num_local} local views, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs); "
        f"{args.rounds} alternating rounds of {args.steps} steps per mode\n")
  print("| data.augment | ms/step (best) | ms/step (median) | images/s (best) | CPU ms/step "
        "(median) | compile s | speed vs host (best wall) | CPU vs host (median) |")
  print("|---|---|---|---|---|---|---|---|")
  for mode in MODES:
    wall = np.array([t[0] for t in times[mode]])
    print(f"| {mode} | {best[mode] * 1e3:.0f} | {np.median(wall) * 1e3:.0f} | "
          f"{b / best[mode]:.0f} | {cpu[mode] * 1e3:.0f} | "
          f"{loops[mode].compile_seconds:.0f} | {best['host'] / best[mode]:.2f}x | "
          f"{cpu[mode] / cpu['host']:.2f}x |")
  for figure, values in (("wall time per step (best round)", best),
                         ("CPU time per step (median round)", cpu)):
    faster = min(MODES, key=values.get)
    print(f"faster by {figure}: data.augment={faster!r} "
          f"({max(values.values()) / min(values.values()):.2f}x)")


if __name__ == "__main__":
  main()
