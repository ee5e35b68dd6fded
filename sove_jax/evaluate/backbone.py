"""A trained backbone from a run's workdir: the network rebuilt from the run's config, its
weights restored from a checkpoint. Evaluation and weight export start here."""
import jax
from flax import nnx

from sove_jax import checkpoint, optim
from sove_jax import state as state_lib
from sove_jax.evaluate import features
from sove_jax.models import network


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
  """(config, ViT) with the `which` ("teacher" | "student") backbone weights of a checkpoint
  (`step`, default the latest readable one); nothing in the workdir is created or changed."""
  if which not in ("teacher", "student"):
    raise ValueError(f"which={which!r} must be 'teacher' or 'student'")
  config = checkpoint.read_config(workdir)
  image_size = config.data.global_size
  # The optimizer only fixes the state's structure for the restore; its values are not used.
  tx = optim.make_optimizer(config, optim.make_schedules(config, 1, 1))
  abstract = jax.eval_shape(state_lib.make_init(config, tx, image_size), jax.random.PRNGKey(0))
  # Restored whole on every device here, whatever devices and mesh the run was trained on.
  replicated = jax.NamedSharding(features.batch_mesh(), jax.P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          abstract)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    got = ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()
  if got is None:
    raise FileNotFoundError(f"No checkpoint in {ckpt.directory}: the run saved none yet.")
  graphdef, _ = network.abstract_network(config.model, image_size)
  net = nnx.merge(graphdef, getattr(got.state, which))
  return LoadedBackbone(config, net.backbone, got.step)
