"""The train state: everything a checkpoint must hold to continue a run bit for bit.

Parameters are stored as pure nested dicts (`nnx.State.to_pure_dict()`), so optax, Orbax and the
sharding rules see plain pytrees; the step rebuilds the module with `nnx.merge(graphdef, params)`.
The state is created the big_vision way: `jax.eval_shape(init)` gives shapes, the sharding rules
give each leaf's layout, and `jax.jit(init, out_shardings=...)` materializes it in place.
"""
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from sove_jax import memory, sharding
from sove_jax.models import network


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  student: Any             # parameters (pure dict)
  teacher: Any             # EMA of the student (pure dict)
  opt_state: Any
  class_bank: memory.Bank  # E_C: teacher [CLS] embeddings
  patch_bank: memory.Bank  # E_P: teacher patch embeddings
  key: jax.Array           # uint32[2]; split once per step


class Layout(NamedTuple):
  """Static facts about the state: the module graph and every leaf's sharding."""
  graphdef: Any
  abstract: TrainState
  shardings: TrainState


def make_init(config, tx, image_size: int):
  """init(seed_key) -> TrainState; pure, so it can be traced by eval_shape and jit."""
  s = config.sove

  def init(key):
    k_params, k_cbank, k_pbank, k_state = jax.random.split(key, 4)
    params = network.init_params(config.model, image_size, k_params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        student=params,
        teacher=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        class_bank=memory.init_bank(k_cbank, s.class_bank_size, config.model.head_out),
        patch_bank=memory.init_bank(k_pbank, s.patch_bank_size, config.model.head_out),
        key=k_state,
    )

  return init


def layout(config, tx, mesh, image_size: int) -> Layout:
  """Shapes and shardings of the state, without allocating it."""
  graphdef, abstract_params = network.abstract_network(config.model, image_size)
  specs = nnx.get_partition_spec(abstract_params).to_pure_dict()
  abstract = jax.eval_shape(make_init(config, tx, image_size), jax.random.PRNGKey(0))
  rules = tuple(tuple(rule) for rule in config.mesh.rules) if config.mesh.shard_params else ()
  params_sh = sharding.param_shardings(specs, abstract.student, mesh, rules)
  if config.mesh.shard_params:
    sharding.check_param_shardings(params_sh, abstract.student,
                                   max_replicated=config.mesh.max_replicated)
  rep = sharding.replicated(mesh)
  shardings = TrainState(
      step=rep,
      student=params_sh,
      teacher=params_sh,
      opt_state=sharding.optimizer_shardings(tx, abstract.opt_state, params_sh, mesh),
      class_bank=jax.tree.map(lambda _: rep, abstract.class_bank),
      patch_bank=jax.tree.map(lambda _: rep, abstract.patch_bank),
      key=rep,
  )
  return Layout(graphdef, abstract, shardings)


def create(config, tx, layout: Layout, image_size: int) -> TrainState:
  """The initial state, sharded as `layout` says, from `config.seed`."""
  init = jax.jit(make_init(config, tx, image_size), out_shardings=layout.shardings)
  return init(jax.random.PRNGKey(config.seed))


def abstract_with_shardings(layout: Layout):
  """ShapeDtypeStructs carrying shardings: the target of a sharded checkpoint restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      layout.abstract, layout.shardings)
