"""Orbax checkpoints of the whole train state (banks included) and the input position.

Saves are asynchronous and atomic: Orbax writes into a temporary directory and renames it when
complete, so a process killed mid-save leaves the previous checkpoint as the latest one. The
run's config is written beside the checkpoints so that evaluation can rebuild the network
(`sove_jax.evaluate.backbone`). This layer knows arrays and files, not the model or the step.
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

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
  """The run's config as JSON beside the checkpoints (process 0)."""
  if jax.process_index() == 0:
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"No {CONFIG_FILE} in {workdir}: is it a sove_jax training workdir?")
  raw = json.loads(path.read_text())

  def tuples(x):  # JSON turned config tuples into lists
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  return ml_collections.ConfigDict(tuples(raw))
