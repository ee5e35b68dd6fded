r"""A study's recipes timed side by side: each arm's compiled step on a synthetic batch.

    python benchmarks/recipe_speed.py --arms=studies/tune_speed.py [--only=NAME,...]

For each arm of the study file (its base config with its overrides, parsed as the trainer's
command line parses them): wall ms per step, images/s, CPU ms per step and per image, and the
compiled FLOPs per image, one table, so recipes can be sized to a wall-time budget before they
are trained. CPU time is the steadier figure when other work shares the machine.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("arms", "studies/tune_speed.py", "Study file whose arms are timed.")
flags.DEFINE_list("only", [], "Time only these arms (names).")
flags.DEFINE_string("config", "", "Base config (default: the study's).")
flags.DEFINE_integer("steps", 8, "Timed steps per arm.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per arm after compilation.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  from benchmarks import train_step as tsb
  from sove_jax import configuration, sharding, state as state_lib, study, train

  spec = study.load_study(FLAGS.arms, config=FLAGS.config or None)
  base = configuration.load(FLAGS.config or spec.config)
  print(f"# {jax.device_count()} x {jax.devices()[0].device_kind}; synthetic batch; "
        f"{FLAGS.steps} timed steps after {FLAGS.warmup}")
  print("| arm | ms/step | images/s | CPU ms/step | CPU ms/image | GFLOP/img compiled |")
  print("|---|---|---|---|---|---|")
  for arm in spec.arms:
    if arm.same_as or (FLAGS.only and arm.name not in FLAGS.only):
      continue
    c = configuration.apply_overrides(base, [*spec.overrides, *arm.overrides])
    mesh = sharding.make_mesh(c.mesh)
    setup = train.build(c, mesh, steps_per_epoch=1000)
    st = state_lib.create(c, setup.tx, setup.layout, setup.image_size)
    batch = tsb.synthetic_batch(setup.batch, jax.random.PRNGKey(1))
    compiled = setup.step.lower(state_lib.abstract_with_shardings(setup.layout), batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) / c.batch_size
    for _ in range(FLAGS.warmup):
      st, m = compiled(st, batch)
    jax.block_until_ready(m)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(FLAGS.steps):
      st, m = compiled(st, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / FLAGS.steps
    cpu = (time.process_time() - c0) / FLAGS.steps
    print(f"| {arm.name} | {dt * 1e3:.1f} | {c.batch_size / dt:.0f} | {cpu * 1e3:.0f} | "
          f"{cpu * 1e3 / c.batch_size:.2f} | {flops / 1e9:.3f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
