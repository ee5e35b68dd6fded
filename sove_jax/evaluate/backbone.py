"""The backbones evaluations read: a run's (`sove_jax.interop.trained`, named here as well for the
callers of `evaluate.backbone.load_backbone`), and the random-init baseline, the run's network
before its first step."""
import jax
from flax import nnx

from sove_jax.interop.trained import (LoadedBackbone, abstract_state, first_head_layer,
                                      load_backbone, loaded_step)
from sove_jax.models import network

__all__ = ("LoadedBackbone", "first_head_layer", "load_backbone", "loaded_step",
           "random_backbone")


def random_backbone(config, which: str = "teacher"):
  """The `which` backbone as the run with `config` starts: initialized from `config.seed`,
  before any step. Evaluated beside the trained one, it shows what training added."""
  init, replicated = abstract_state(config)
  state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(config.get("seed", 0)))
  graphdef, _ = network.abstract_network(config.model, config.data.global_size,
                                         network.prototypes_of(config))
  return nnx.merge(graphdef, getattr(state, which)).backbone
