r"""A study's recipes timed side by side: each arm's compiled step on a synthetic batch.

    python benchmarks/recipe_speed.py --arms=studies/tune_speed.py [--only=NAME,...]
    python benchmarks/recipe_speed.py --arms=studies/ten_minutes.py --rounds=3 --steps=10 \
        --budget_of=default --budget_steps=2160

For each arm of the study file (its base config with its overrides, parsed as the trainer's
command line parses them): wall ms per step, images/s, CPU ms per step and per image, and the
compiled FLOPs per image, one table, so recipes can be sized to a wall-time budget before they
are trained. CPU time is the steadier figure when other work shares the machine. With
`--rounds` > 1 every arm is compiled first, then timed in rounds that alternate between the
arms (so other work on a shared machine falls on all of them alike), and the table gives the
medians over rounds. `--budget_of` adds the steps each arm may take for that arm's CPU time at
`--budget_steps` (how the 10-minute arms of studies/ten_minutes.py got their steps).
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("arms", "studies/tune_speed.py", "Study file whose arms are timed.")
flags.DEFINE_list("only", [], "Time only these arms (names).")
flags.DEFINE_string("config", "", "Base config (default: the study's).")
flags.DEFINE_integer("steps", 8, "Timed steps per arm and round.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per arm and round.")
flags.DEFINE_integer("rounds", 1, "Rounds alternating between the arms (medians reported).")
flags.DEFINE_string("budget_of", "", "An arm whose CPU time per step sets the budget column.")
flags.DEFINE_integer("budget_steps", 2160, "That arm's steps (the budget column's reference).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  from benchmarks.train_step import Timed
  from sove_jax import configuration, study

  spec = study.load_study(FLAGS.arms, config=FLAGS.config or None)
  base = configuration.load(FLAGS.config or spec.config)
  arms = [a for a in spec.arms if not a.same_as and (not FLAGS.only or a.name in FLAGS.only)]
  unknown = sorted(set(FLAGS.only) - {a.name for a in arms})
  if unknown or (FLAGS.budget_of and FLAGS.budget_of not in {a.name for a in arms}):
    sys.exit(f"--only / --budget_of name no timed arm of {FLAGS.arms}: "
             f"{unknown or [FLAGS.budget_of]}; arms: {[a.name for a in spec.arms]}.")
  print(f"# {jax.device_count()} x {jax.devices()[0].device_kind}; synthetic batch; "
        f"{FLAGS.steps} timed steps after {FLAGS.warmup}, {FLAGS.rounds} round(s)", flush=True)
  timed = {}
  for arm in arms:
    timed[arm.name] = Timed(configuration.apply_overrides(base, [*spec.overrides,
                                                                 *arm.overrides]))
  for r in range(FLAGS.rounds):
    for t in timed.values():
      t.round(FLAGS.steps, FLAGS.warmup)
    if FLAGS.rounds > 1:
      print(f"# round {r + 1}/{FLAGS.rounds} done", flush=True)
  budget = (statistics.median(timed[FLAGS.budget_of].cpu) * FLAGS.budget_steps
            if FLAGS.budget_of else None)
  head = "| arm | ms/step | images/s | CPU ms/step | CPU ms/image | GFLOP/img compiled |"
  extra = f" steps at {FLAGS.budget_of}'s CPU for {FLAGS.budget_steps} |" if budget else ""
  print(head + extra + "\n|---|---|---|---|---|---|" + ("---|" if budget else ""))
  for name, t in timed.items():
    dt, cpu = statistics.median(t.wall), statistics.median(t.cpu)
    line = (f"| {name} | {dt * 1e3:.1f} | {t.batch_size / dt:.0f} | {cpu * 1e3:.0f} | "
            f"{cpu * 1e3 / t.batch_size:.2f} | {t.flops_per_image / 1e9:.3f} |")
    print(line + (f" {round(budget / cpu)} |" if budget else ""), flush=True)


if __name__ == "__main__":
  app.run(main)
