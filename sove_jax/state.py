"""The train state: everything a checkpoint must hold to continue a run bit for bit.

SOVE's state holds its two banks (`TrainState`); DINO's and iBOT's hold their teacher centers
instead (`PrototypeTrainState`), so each checkpoint holds exactly what its method needs and a
SOVE checkpoint is the same whatever other methods exist. `make_init` picks by `config.method`.

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


@flax.struct.dataclass
class PrototypeTrainState:
  """The state of DINO and iBOT: parameters, optimizer and the teacher's running centers."""
  step: jax.Array
  student: Any
  teacher: Any
  opt_state: Any
  centers: dict            # float32 [K] each: "cls" (DINO, iBOT), "patch" (iBOT)
  key: jax.Array


def center_names(config) -> tuple[str, ...]:
  """The centers a prototype method keeps: the [CLS] logits' and, for iBOT, the patches'."""
  return ("cls", "patch") if network.method(config) == "ibot" else ("cls",)


class Layout(NamedTuple):
  """Static facts about the state: the module graph and every leaf's sharding."""
  graphdef: Any
  abstract: TrainState | PrototypeTrainState
  shardings: TrainState | PrototypeTrainState


def make_init(config, tx, image_size: int):
  """init(seed_key) -> the method's state; pure, so it can be traced by eval_shape and jit."""
  s = config.sove
  baseline = network.prototypes_of(config)

  def init(key):
    k_params, k_cbank, k_pbank, k_state = jax.random.split(key, 4)
    params = network.init_params(config.model, image_size, k_params, baseline)
    if baseline is not None:  # DINO, iBOT: centers start at zero, as in the references
      return PrototypeTrainState(
          step=jnp.zeros((), jnp.int32), student=params,
          teacher=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
          centers={name: jnp.zeros((baseline.num_prototypes,), jnp.float32)
                   for name in center_names(config)},
          key=k_state)
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


def init_for(config, image_size: int | None = None):
  """`make_init` without a training's schedules: the initial state as a run with `config`
  starts it (what the random-init baseline evaluates), its structure what every checkpoint of
  such a run holds. The optimizer state's shapes and initial values do not depend on the
  schedules, so any will do."""
  from sove_jax import optim
  tx = optim.make_optimizer(config, optim.make_schedules(config, 1, 1))
  return make_init(config, tx, image_size or config.data.global_size)


def abstract(config, image_size: int | None = None):
  """The state's shapes and dtypes under `config`, nothing allocated (evaluation restores into
  it, a restart compares configs by it)."""
  return jax.eval_shape(init_for(config, image_size), jax.random.PRNGKey(0))


def layout(config, tx, mesh, image_size: int) -> Layout:
  """Shapes and shardings of the state, without allocating it."""
  graphdef, abstract_params = network.abstract_network(config.model, image_size,
                                                       network.prototypes_of(config))
  specs = nnx.get_partition_spec(abstract_params).to_pure_dict()
  abstract = jax.eval_shape(make_init(config, tx, image_size), jax.random.PRNGKey(0))
  rules = tuple(tuple(rule) for rule in config.mesh.rules) if config.mesh.shard_params else ()
  params_sh = sharding.param_shardings(specs, abstract.student, mesh, rules)
  if config.mesh.shard_params:
    sharding.check_param_shardings(params_sh, abstract.student,
                                   max_replicated=config.mesh.max_replicated)
  rep = sharding.replicated(mesh)
  # Banks and centers are whole on every device; parameters and their moments follow the rules.
  shardings = jax.tree.map(lambda _: rep, abstract).replace(
      student=params_sh,
      teacher=params_sh,
      opt_state=sharding.optimizer_shardings(tx, abstract.opt_state, params_sh, mesh),
  )
  return Layout(graphdef, abstract, shardings)


def create(config, tx, layout: Layout, image_size: int) -> TrainState | PrototypeTrainState:
  """The initial state, sharded as `layout` says, from `config.seed`."""
  init = jax.jit(make_init(config, tx, image_size), out_shardings=layout.shardings)
  return init(jax.random.PRNGKey(config.seed))


def abstract_with_shardings(layout: Layout):
  """ShapeDtypeStructs carrying shardings: the target of a sharded checkpoint restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      layout.abstract, layout.shardings)
