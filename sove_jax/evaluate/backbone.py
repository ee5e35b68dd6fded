"""A trained backbone from a run's workdir: the network rebuilt from the run's config, its
weights restored from a checkpoint. Evaluation and weight export start here."""
import jax
from flax import nnx

from sove_jax import checkpoint, optim
from sove_jax import state as state_lib
from sove_jax.evaluate import features
from sove_jax.models import network


def load_backbone(workdir: str, step=None, which: str = "teacher"):
  """(config, backbone) with the `which` ("teacher" | "student") backbone weights of a
  checkpoint (`step`, default the latest): the run's `model.arch`, a ViT or a Swin, built for
  the run's global crop size."""
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
  ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=1)
  try:
    got = ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()
  if got is None:
    raise FileNotFoundError(f"No checkpoint under {ckpt.directory}.")
  graphdef, _ = network.abstract_network(config.model, image_size, network.prototypes_of(config))
  net = nnx.merge(graphdef, getattr(got[0], which))
  return config, net.backbone
