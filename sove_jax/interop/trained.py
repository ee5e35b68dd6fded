"""A trained backbone from a run's workdir: the network rebuilt from the run's config, its
weights restored from a checkpoint. Evaluation (`sove_jax.evaluate`) and weight export
(`torch_weights export`) start here; released PyTorch weights (`released`) give the same
`LoadedBackbone`."""
import jax
import numpy as np
from flax import nnx

from sove_jax import checkpoint, sharding
from sove_jax import state as state_lib
from sove_jax.models import network


def abstract_state(config):
  """(init function, replicated sharding): the run's state structure, placed whole on every
  local device."""
  init = state_lib.init_for(config)
  replicated = jax.NamedSharding(sharding.batch_mesh(), jax.P())
  return init, replicated


class LoadedBackbone(tuple):
  """`(config, backbone)`, unpacked as a pair, with what the records of an evaluation name:
  `.step` (the checkpoint step, None for released weights), `.source` (the workdir or the
  weights file) and `.head_layer`, the first layer of the projection head as NumPy {"kernel":
  [D, hidden], "bias": [hidden]} (None when the weights hold no head), where semi-supervised
  fine-tuning starts its classifier."""

  def __new__(cls, config, backbone, step, *, source: str = "", head_layer=None):
    loaded = super().__new__(cls, (config, backbone))
    loaded.step = None if step is None else int(step)
    loaded.source = str(source)
    loaded.head_layer = head_layer
    return loaded

  @property
  def config(self):
    return self[0]

  @property
  def backbone(self):
    return self[1]


def loaded_step(loaded, asked=None):
  """The step an evaluation's record names: the checkpoint the backbone came from, where the
  loader says (`LoadedBackbone`), else the step that was asked for."""
  return getattr(loaded, "step", asked)


def first_head_layer(head) -> dict:
  """The first Linear of a network's head (SOVE's projection head, or the MLP of DINO's and
  iBOT's prototype head) as NumPy {"kernel", "bias"}."""
  fc1 = head.fc1 if hasattr(head, "fc1") else head.mlp.fc1
  return {"kernel": np.asarray(fc1.kernel[...]), "bias": np.asarray(fc1.bias[...])}


def load_backbone(workdir: str, step=None, which: str = "teacher") -> LoadedBackbone:
  """(config, backbone) with the `which` ("teacher" | "student") backbone weights of a
  checkpoint (`step`, default the latest readable one): the run's `model.arch`, a ViT or a Swin,
  built for the run's global crop size; nothing in the workdir is created or changed."""
  if which not in ("teacher", "student"):
    raise ValueError(f"which={which!r} must be 'teacher' or 'student'")
  config = checkpoint.read_config(workdir)
  image_size = config.data.global_size
  init, replicated = abstract_state(config)
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
  return LoadedBackbone(config, net.backbone, got.step, source=workdir,
                        head_layer=first_head_layer(net.head))
