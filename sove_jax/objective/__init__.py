"""The SOVE objective (docs/method.md §3-§7): anchors, judges, concept log-probabilities, losses.

Importable alone (`from sove_jax import objective`); depends on JAX and Flax only. Everything is
a pure function of arrays. Configuration mistakes (sizes, ranks, option names) raise `ValueError`
naming the argument while tracing, before anything runs.

Memory is the design constraint at paper sizes (bank 65536 x 256, K = 8192 anchors, J = 9
judges, 4 tasks):
- the anchor-by-bank similarity (K x M, 2 GiB) is computed `chunk_size` anchors at a time and,
  with `anchor_sharding`, split over devices;
- the label matrix Y (K*J x K, docs/method.md §4) is never built: `P` is a sum over each
  concept's J judges (§5; why: §11);
- the embedding-by-judge logits are computed `chunk_size` concepts at a time, forward and in a
  custom backward pass that recomputes them, so no [N, K*J] array is ever stored, and the only
  [N, K] arrays are the log-probabilities and their cotangent.
"""
from sove_jax.objective.checks import check_masked_patch_inputs
from sove_jax.objective.concepts import concept_log_probs
from sove_jax.objective.judges import Judges, sample_anchors, select_judges
from sove_jax.objective.losses import (class_loss, class_loss_per_example, koleo_loss_per_example,
                                       patch_loss, patch_loss_per_example)

__all__ = [
    "Judges",
    "sample_anchors",
    "select_judges",
    "concept_log_probs",
    "class_loss",
    "class_loss_per_example",
    "patch_loss",
    "patch_loss_per_example",
    "koleo_loss_per_example",
    "check_masked_patch_inputs",
]
