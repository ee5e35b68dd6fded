r"""The default recipe at half the length it had when the studies began (750 steps, 4 local
crops): the budget of every arm of the paper's comparisons.

    python -m sove_jax.study --arms=studies/table7.py --out=studies/results/table7
    python -m sove_jax.study --arms=studies/ablations.py --out=studies/results/ablations

(the study files' base config when `--config` names none; results committed under
studies/results).

The length and local crops are pinned (the default has since dropped its local crops for
more steps, docs/tuning.md m8) so that a study that outlives a session trains every arm at one
budget. The studies train 30 + 26 runs; at the default's full length (about 10 minutes each
on 2 CPU cores, plus evaluation) they would take more than 11 hours of this machine, at half of
it about 6. Every schedule given in epochs is halved with the run, so warm-ups, the frozen
prototype layer and the teacher-temperature ramps keep their share of it; the EMA, learning-rate and
weight-decay schedules follow the steps by themselves. docs/study.md has the results.
"""
from sove_jax import configuration

# The default without the KoLeo term it took later (studies/ten_minutes.py): the recipe these
# studies began with, so that their remaining runs train what the finished ones trained.
default = configuration.sibling("default_without_koleo", of=__file__)

SCALE = 0.5   # of the default's schedules (and of its length when the study began)


def get_config():
  c = default.get_config()
  c.num_epochs = 1.6 * SCALE  # the default's length when the study began (1499 steps)...
  c.data.num_local = 4        # ...and its local crops (the default now has none, more steps)
  c.optim.warmup_epochs *= SCALE
  c.sove.teacher_temp_warmup_epochs *= SCALE
  c.baseline.teacher_temp_warmup_epochs *= SCALE
  c.baseline.freeze_last_layer_epochs *= SCALE
  c.knn_every = 0     # each run is evaluated once, at its end, on the whole test split
  return c
