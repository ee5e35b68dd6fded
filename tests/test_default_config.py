"""The default config is what its docstring says: the README's first command trains that many
steps of that many images, and the compiled step costs the stated FLOPs per image. A change to
the recipe that changes its cost (model shape, crops, banks) fails here until the docstring, and
the figures measured with it, are brought up to date."""
import functools
import re

import jax
import pytest

from configs import default
from sove_jax import continuation, sharding, state as state_lib, train

FASHION_MNIST_TRAIN = 60_000


def _stated(pattern):
  found = re.search(pattern, default.__doc__)
  assert found, f"configs/default.py's docstring no longer states {pattern!r}"
  return found.groups()


def test_default_steps_are_the_docstrings():
  steps, batch = map(int, _stated(r"(\d+) steps of (\d+) images"))
  config = default.get_config()
  assert config.batch_size == batch
  assert train.total_steps(config, FASHION_MNIST_TRAIN // config.batch_size) == steps


@pytest.mark.slow
def test_default_step_flops_per_image_are_the_docstrings():
  (gflop,) = _stated(r"([\d.]+) GFLOP per image")
  config = default.get_config()
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])  # whole-step FLOPs
  setup = train.build(config, mesh, steps_per_epoch=FASHION_MNIST_TRAIN // config.batch_size)
  compiled = setup.step.lower(state_lib.abstract_with_shardings(setup.layout),
                              train.batch_shapes(config, mesh)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  per_image = float(cost["flops"]) / config.batch_size / 1e9
  # The docstring rounds to the digits it prints.
  digits = len(gflop.split(".")[1]) if "." in gflop else 0
  assert abs(per_image - float(gflop)) <= 0.5 * 10 ** -digits, (
      f"the compiled default step costs {per_image:.4f} GFLOP per image; the docstring says "
      f"{gflop}")


def test_study_config_is_the_default_at_the_studys_budget():
  """configs/study.py, the paper studies' budget, is the default recipe with each schedule given
  in epochs halved, at the length and local crops the study began with (750 steps, 4 local
  crops; the default has since dropped its local crops for more steps) and without the KoLeo term
  the default took later, so that every arm of a study that outlives a session trains at one
  budget and one recipe."""
  from configs import study
  full, half = default.get_config(), study.get_config()
  per_epoch = FASHION_MNIST_TRAIN // full.batch_size
  assert train.total_steps(half, per_epoch) == 750
  assert half.data.num_local == 4
  schedules = ("optim.warmup_epochs", "sove.teacher_temp_warmup_epochs",
               "baseline.teacher_temp_warmup_epochs", "baseline.freeze_last_layer_epochs")
  value = lambda c, field: functools.reduce(getattr, field.split("."), c)
  for field in schedules:
    assert value(half, field) == value(full, field) / 2, field
  changed = continuation.changed_fields(full, half, ignore=())
  assert half.sove.koleo_weight == 0.0 and full.sove.koleo_weight > 0
  assert set(changed) <= set(schedules) | {"knn_every", "num_epochs", "data.num_local",
                                           "sove.koleo_weight"}, changed


def test_the_studies_base_is_the_default_without_koleo():
  """configs/default_without_koleo.py, the base of the studies that began before the default took
  the KoLeo term (studies/ten_minutes.py and those built on it), differs from the default in that
  term alone: a later change to the default reaches those studies' remaining runs only through a
  field the study runner's base-config check then names."""
  from configs import default_without_koleo
  full, plain = default.get_config(), default_without_koleo.get_config()
  assert continuation.changed_fields(full, plain, ignore=()) == {"sove.koleo_weight": (0.8, 0.0)}


def test_the_reference_config_trains_what_the_reference_study_trained():
  """configs/fashion_mnist.py is the longest run studies/reference.py recorded (its base config
  with its overrides), so that the figures its docstring quotes are that config's; only the seed
  (each recorded run has its own) may differ."""
  import pathlib
  from configs import fashion_mnist
  from sove_jax import configuration
  from sove_jax.study import records as rec
  root = pathlib.Path(__file__).resolve().parent.parent
  records = rec.read_jsonl(str(root / "studies/results/reference/results.jsonl"))
  assert records, "studies/results/reference has no finished run"
  longest = max(record["steps"] for record in records)
  config = fashion_mnist.get_config()
  assert train.total_steps(config, FASHION_MNIST_TRAIN // config.batch_size) == longest
  for record in (r for r in records if r["steps"] == longest):
    recorded = configuration.apply_overrides(configuration.load(root / record["config"]),
                                             record["overrides"])
    changed = continuation.changed_fields(recorded, config, ignore=())
    assert set(changed) <= {"seed"}, (record["arm"], record["seed"], changed)
