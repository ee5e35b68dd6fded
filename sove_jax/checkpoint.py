"""Orbax checkpoints of the whole train state (banks included) and the input position.

Saves are asynchronous and atomic: Orbax writes into a temporary directory and renames it when
complete, so a process killed mid-save leaves the previous checkpoint as the latest one. The
run's config is written beside the checkpoints so that evaluation can rebuild the network.
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


class Checkpointer:
  """Save every `save_every` steps (and when forced), keep the last `keep`, restore the latest."""

  def __init__(self, workdir: str, *, save_every: int, keep: int, asynchronous: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(int(save_every), 1), create=True,
        enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def restore(self, target, step=None):
    """(state, data_state) from `step` (default: latest), or None when there is none.

    `target` is the abstract state with shardings: every leaf is restored directly into its
    sharded layout.
    """
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    got = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return got["state"], got["data"]

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Starts an asynchronous save when the policy (or `force`) says so; True if it did.

    On CPU devices the host "copy" of an array can alias its buffer, which the next step then
    donates and overwrites while the background write is still reading it; saving a fresh copy
    there keeps the checkpoint exactly the state of `step`.
    """
    if not self.manager.should_save(step) and not force:
      return False
    if next(iter(jax.tree.leaves(state)[0].devices())).platform == "cpu":
      state = jax.tree.map(lambda x: x.copy(), state)
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def reached_preemption(self, step: int) -> bool:
    """True when the JAX preemption service says every host should save now (TPU pods)."""
    return self.manager.reached_preemption(step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def write_config(config, workdir: str):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {CONFIG_FILE} in {workdir}: is it a sove_jax training workdir?")
  with open(path) as f:
    raw = json.load(f)

  def tuples(x):  # JSON turned config tuples into lists
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  return ml_collections.ConfigDict(tuples(raw))


def load_backbone(workdir: str, step=None, which: str = "teacher"):
  """(config, ViT) with the `which` ("teacher" | "student") backbone weights of a checkpoint."""
  from flax import nnx

  from sove_jax import optim, state as state_lib
  from sove_jax.models import network

  if which not in ("teacher", "student"):
    raise ValueError(f"which={which!r} must be 'teacher' or 'student'")
  config = read_config(workdir)
  image_size = config.data.global_size
  tx = optim.make_optimizer(config, optim.make_schedules(config, 1, 1))
  abstract = jax.eval_shape(state_lib.make_init(config, tx, image_size), jax.random.PRNGKey(0))
  ckpt = Checkpointer(workdir, save_every=1, keep=1)
  got = ckpt.restore(abstract, step=step)
  if got is None:
    raise FileNotFoundError(f"No checkpoint under {ckpt.directory}.")
  ckpt.close()
  graphdef, _ = network.abstract_network(config.model, image_size)
  net = nnx.merge(graphdef, getattr(got[0], which))
  return config, net.backbone
