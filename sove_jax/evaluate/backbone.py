"""A trained backbone from a run's workdir: the network rebuilt from the run's config, its
weights restored from a checkpoint. Evaluation and weight export start here."""
import jax
from flax import nnx

from sove_jax import checkpoint, optim
from sove_jax import state as state_lib
from sove_jax.evaluate import features
from sove_jax.models import network


def _abstract_state(config):
  """The run's state structure, placed whole on every local device."""
  # The optimizer only fixes the state's structure; its values are not used.
  tx = optim.make_optimizer(config, optim.make_schedules(config, 1, 1))
  init = state_lib.make_init(config, tx, config.data.global_size)
  replicated = jax.NamedSharding(features.batch_mesh(), jax.P())
  return init, replicated


def random_backbone(config, which: str = "teacher"):
  """The `which` backbone as the run with `config` starts: initialized from `config.seed`,
  before any step. Evaluated beside the trained one, it shows what training added."""
  init, replicated = _abstract_state(config)
  state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(config.seed))
  graphdef, _ = network.abstract_network(config.model, config.data.global_size,
                                         network.prototypes_of(config))
  return nnx.merge(graphdef, getattr(state, which)).backbone


class LoadedBackbone(tuple):
  """`(config, backbone)`, unpacked as before, with `.step`: the checkpoint step it came from
  (the latest readable one when none was asked for), for the records evaluations write."""

  def __new__(cls, config, backbone, step: int):
    loaded = super().__new__(cls, (config, backbone))
    loaded.step = int(step)
    return loaded


def loaded_step(loaded, asked):
  """The step an evaluation's record names: the checkpoint the backbone came from, where the
  loader says (`LoadedBackbone`), else the step that was asked for."""
  return getattr(loaded, "step", asked)


def load_backbone(workdir: str, step=None, which: str = "teacher") -> LoadedBackbone:
  """(config, backbone) with the `which` ("teacher" | "student") backbone weights of a
  checkpoint (`step`, default the latest readable one): the run's `model.arch`, a ViT or a Swin,
  built for the run's global crop size; nothing in the workdir is created or changed."""
  if which not in ("teacher", "student"):
    raise ValueError(f"which={which!r} must be 'teacher' or 'student'")
  config = checkpoint.read_config(workdir)
  image_size = config.data.global_size
  init, replicated = _abstract_state(config)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  # Restored whole on every device here, whatever devices and mesh the run was trained on.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          abstract)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    got = ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()
  if got is None:
    raise FileNotFoundError(f"No checkpoint in {ckpt.directory}: the run saved none yet.")
  graphdef, _ = network.abstract_network(config.model, image_size, network.prototypes_of(config))
  net = nnx.merge(graphdef, getattr(got.state, which))
  return LoadedBackbone(config, net.backbone, got.step)
