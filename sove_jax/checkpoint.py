"""Orbax checkpoints of the whole train state (banks included) and the input position, and the
files beside them: the run's config and the record of its accepted changes.

Every path goes through etils `epath`, so a workdir may be local or in a bucket (gs://...); a
relative local path is made absolute (Orbax needs absolute paths), a bucket path is kept as is.

Saves are asynchronous and atomic: Orbax writes into a temporary directory and renames it when
complete (on buckets, marks it complete), so a process killed mid-save leaves the previous
checkpoint as the latest one. A save that fails is reported at the next step boundary as a
`CheckpointError` naming the directory and the cause (the trainer exits at once rather than wait
for Orbax's background threads, which can wait minutes for a signal a failed thread never
sends). Each checkpoint carries checksums of its arrays; a restore that finds a file missing,
unreadable or altered falls back to the previous checkpoint with a warning naming the corrupt
step, or says which file and why. Checkpoints that must not be resumed from (corrupt ones, or
those after a step the user chose to go back to) are moved to `checkpoints_set_aside/`, never
deleted.

The run's config is written beside the checkpoints once, when the run starts (`config.json`), so
that evaluation can rebuild the network (`sove_jax.evaluate.backbone`); a change accepted on a
restart is appended to `config_changes.jsonl` with the step it took effect at, and `read_config`
gives the config with every change applied. This layer knows arrays and files, not the model or
the step.
"""
import datetime
import fcntl
import json
import logging as python_logging
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from sove_jax import paths

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
CHECKPOINTS = "checkpoints"
SET_ASIDE = "checkpoints_set_aside"
_ITEMS = ("state", "data", "checksums")
_PROBE = ".sove_jax_write_probe"


def _probe(directory):
  """A write-probe file of this process alone: processes sharing a workdir probe it at once."""
  return directory / f"{_PROBE}.{jax.process_index()}.{os.getpid()}"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be saved or restored; the message names where and why."""


class Restored(NamedTuple):
  state: Any
  data: dict
  step: int


def workdir_path(workdir) -> epath.Path:
  """The workdir as an epath: a relative local path made absolute, a bucket path kept."""
  path = epath.Path(workdir)
  return path if path.is_absolute() else path.absolute()


def cause(error: BaseException, limit: int = 300) -> str:
  """An exception as one short line: the type and first message line of the innermost error
  it was raised from (Orbax wraps tensorstore's precise "OUT_OF_RANGE: Error reading ... at
  local file ..." in a generic one)."""
  seen = []
  while error is not None and error not in seen and len(seen) < 10:
    seen.append(error)
    error = error.__cause__ or error.__context__
  error = next((e for e in reversed(seen) if str(e).strip()), seen[0])
  text = str(error).strip().splitlines()
  first = text[0] if text else ""
  first = first if len(first) <= limit else first[:limit] + "..."
  return f"{type(error).__name__}: {first}" if first else type(error).__name__


LOCK_FILE = ".sove_jax_lock"
_held = {}   # {lock path: its open file}: a lock lasts as long as its file is open


def hold_workdir(directory) -> None:
  """Makes this process the only training run in a local `directory` until it exits; raises
  CheckpointError naming the holder when another process holds it.

  Why: two runs started on one workdir (a command run twice, two launch scripts) would both
  train, interleave metrics.jsonl and save checkpoints of two different runs under the same step
  numbers, and each would take the other's for its own on a restart. An advisory `flock` on
  LOCK_FILE: the kernel drops it when the process ends, however it ends, so a crashed or killed
  run never leaves a stale lock. A bucket (gs://) has no such lock: there, one run per workdir
  is the launcher's to ensure. Process 0 of a multi-process run holds it for all. The same
  process may train in the workdir again (a resume in-process, as the tests do): it holds it.
  """
  directory = epath.Path(directory)
  if not paths.is_local(directory):
    return
  path = os.path.join(str(directory), LOCK_FILE)
  if path in _held:
    return
  f = open(path, "a+", encoding="utf-8")  # noqa: SIM115  held open for the process's life
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "an unknown process"
    f.close()
    raise CheckpointError(f"{directory} is in use by another training run ({holder}): wait for "
                          "it to end, or give this run another --workdir.") from None
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on host {os.uname().nodename}, since "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
  f.flush()
  _held[path] = f


def check_writable(directory):
  """Creates `directory` if needed and writes a probe file in it; raises CheckpointError
  naming the path and the cause when it cannot (a read-only or full disk, a file in the way,
  no permission)."""
  directory = epath.Path(directory)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = _probe(directory)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # noqa: BLE001  any storage error is the user's to know, in one line
    raise CheckpointError(f"Cannot write to {directory}: {cause(e)}.") from e


# --- checksums --------------------------------------------------------------------------------


def _word_sum(x):
  """The sum of an array's bits as uint32 words (16- and 8-bit values widened), modulo 2^32:
  exact and the same in any reduction order, so on any sharding; one flipped bit changes it."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jnp.sum(jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32), dtype=jnp.uint32)


_word_sums = jax.jit(lambda tree: jax.tree.map(_word_sum, tree))


def checksums(state) -> dict:
  """{leaf path: uint32 word sum} of every array of `state`."""
  sums = _word_sums(state)
  return {jax.tree_util.keystr(path): int(np.asarray(x.addressable_data(0)))
          for path, x in jax.tree_util.tree_leaves_with_path(sums)}


def saved_notes(workdir, step: int) -> dict:
  """The notes saved with checkpoint `step` (see `Checkpointer.save`), read from its checksums
  file without restoring anything; {} when it has none."""
  path = workdir_path(workdir) / CHECKPOINTS / str(step) / "checksums" / "metadata"
  try:
    return dict(json.loads(path.read_text()).get("notes", {}))
  except Exception:  # noqa: BLE001
    return {}


class _Corrupt(Exception):
  """A checkpoint step that cannot be restored; the message names the file and the cause."""


# --- Orbax's background errors ----------------------------------------------------------------


class _OrbaxErrors(python_logging.Handler):
  """Keeps the first ERROR that Orbax logs. A failed background write is logged at once, while
  the thread that waits for it may sit out a 5-minute signal timeout before raising."""

  def __init__(self):
    super().__init__(level=python_logging.ERROR)
    self.first = None

  def emit(self, record):
    if self.first is None and "/orbax/" in record.pathname:
      message = record.getMessage()
      message = message.split("raised an exception: ", 1)[-1]
      self.first = message.strip().splitlines()[0][:300] if message.strip() else "error"


# --- the checkpointer -------------------------------------------------------------------------


class Checkpointer:
  """Saves when asked and keeps the last `keep`, and for good every checkpoint whose step is a
  multiple of `keep_period` (0: none; an 800-epoch run keeps its middle to evaluate later);
  restores the latest readable checkpoint.

  `read_only` (evaluation) neither creates nor changes anything in the workdir.
  """

  def __init__(self, workdir, *, keep: int = 1, keep_period: int = 0, asynchronous: bool = True,
               read_only: bool = False, save_every: int | None = None):
    del save_every  # the trainer decides when to save (`train.itstime`)
    self.workdir = workdir_path(workdir)
    self.directory = self.workdir / CHECKPOINTS
    if read_only and not self.directory.exists():
      raise FileNotFoundError(f"No checkpoints in {self.workdir}: {self.directory} does not "
                              "exist.")
    # Read-only use creates nothing and never saves (Orbax's own read_only mode would say so
    # in two warnings on every evaluation).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(keep), 1), keep_period=int(keep_period) or None,
        create=not read_only, save_root_metadata=not read_only,
        enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
    self._errors = _OrbaxErrors()
    python_logging.getLogger("absl").addHandler(self._errors)
    self._read_only = read_only
    self._saving = None   # the step of the save in flight (or last started)
    self._failed = None   # the CheckpointError of a failed save

  # -- listing ---------------------------------------------------------------------------------

  def all_steps(self) -> list:
    return sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def _complete_steps(self) -> list:
    """Finished steps, read again from storage (not Orbax's cached list); none when the
    directory is gone."""
    try:
      return sorted(ocp.path.step.checkpoint_steps(self.directory))
    except Exception:  # noqa: BLE001
      return []

  # -- restore ---------------------------------------------------------------------------------

  def restore(self, target, step=None):
    """`Restored(state, data, step)` from `step`, or by default from the latest readable
    checkpoint (a corrupt one is passed over with a warning naming it); None when there is
    none. `target` is the abstract state with shardings: every leaf is restored directly into
    its sharded layout."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        listed = ", ".join(map(str, sorted(steps))) or "none"
        raise CheckpointError(f"No checkpoint of step {step} in {self.directory} (steps there: "
                              f"{listed}).")
      try:
        return self._restore(target, step)
      except _Corrupt as e:
        raise CheckpointError(f"Checkpoint step {step} in {self.directory} cannot be restored: "
                              f"{e}.") from None
    failures = []
    for s in steps:
      try:
        restored = self._restore(target, s)
      except _Corrupt as e:
        failures.append(f"step {s}: {e}")
        logging.warning("Checkpoint step %d in %s is corrupt (%s); trying the one before.",
                        s, self.directory, e)
        continue
      return restored
    if failures:
      raise CheckpointError(f"No readable checkpoint in {self.directory}: "
                            + "; ".join(failures) + ".")
    return None

  def _restore(self, target, step: int) -> Restored:
    step_dir = self.directory / str(step)
    _check_files(step_dir)
    with_sums = (step_dir / "checksums").exists()
    args = dict(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    if with_sums:
      args["checksums"] = ocp.args.JsonRestore()
    try:
      got = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001  whatever Orbax or tensorstore raise, name it
      raise _Corrupt(f"{step_dir}: {cause(e)}") from e
    if with_sums:
      saved, found = got["checksums"]["arrays"], checksums(got["state"])
      altered = sorted(k for k in saved if k in found and found[k] != saved[k])
      if altered:
        raise _Corrupt(f"{len(altered)} array(s) differ from the checksums saved with them "
                       f"(e.g. {altered[0]}): the files under {step_dir / 'state'} were altered "
                       "after the save")
    return Restored(got["state"], got["data"], int(step))

  def set_aside(self, steps, reason: str) -> list:
    """Moves the step directories `steps` out of the way (to WORKDIR/checkpoints_set_aside/
    STEP.REASON), so that the run continues from an earlier one; nothing is deleted. Process 0
    moves; every process then sees the new list. Returns the new paths."""
    moved = []
    if jax.process_index() == 0:
      aside = self.workdir / SET_ASIDE
      aside.mkdir(parents=True, exist_ok=True)
      for s in sorted(steps):
        target = aside / f"{s}.{reason}"
        if target.exists():
          target = aside / f"{s}.{reason}.{int(time.time())}"
        (self.directory / str(s)).rename(target)
        moved.append(target)
    _sync_processes("sove_jax_checkpoints_set_aside")
    self.manager.reload()
    return moved

  # -- save ------------------------------------------------------------------------------------

  def save(self, step: int, state, data_state: dict, notes: dict | None = None):
    """Starts an asynchronous save of `step` (the trainer decides when; nothing is saved
    unasked), with the arrays' checksums and small JSON `notes` (read back by `saved_notes`).
    Raises CheckpointError when the directory cannot be written or an earlier save failed.

    On CPU devices the host "copy" of an array can alias its buffer, which the next step then
    donates and overwrites while the background write is still reading it; saving a fresh copy
    there keeps the checkpoint exactly the state of `step`.
    """
    if self._read_only:
      raise CheckpointError(f"{self.directory} was opened read-only.")
    self.check()
    self.wait()  # one save at a time, and a failure of the last one is known before the next
    if not self.directory.exists():
      self._fail(step, f"{self.directory} no longer exists")
    try:
      probe = _probe(self.directory)
      probe.write_text("ok")
      probe.unlink()
    except Exception as e:  # noqa: BLE001
      self._fail(step, f"cannot write to {self.directory}: {cause(e)}")
    if next(iter(jax.tree.leaves(state)[0].devices())).platform == "cpu":
      state = jax.tree.map(lambda x: x.copy(), state)
    summary = {"arrays": checksums(state), "notes": dict(notes or {})}
    self._saving, self._errors.first = step, None
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          checksums=ocp.args.JsonSave(summary)), force=True)
    except Exception as e:  # noqa: BLE001
      self._fail(step, f"{self.directory}: {cause(e)}")
    self.check()

  def _fail(self, step: int, why: str):
    last = [s for s in self._complete_steps() if s != step]
    kept = (f"the last complete checkpoint, step {last[-1]} ({self.directory / str(last[-1])}), "
            "is intact" if last else "no complete checkpoint is left")
    self._failed = CheckpointError(f"Saving checkpoint step {step} failed ({why}); {kept}.")
    raise self._failed

  def check(self):
    """Raises CheckpointError if a background save has failed (cheap: call every step)."""
    if self._failed is not None:
      raise self._failed
    if self._saving is not None and self._errors.first is not None:
      self._fail(self._saving, f"{self.directory}: {self._errors.first}")
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      self._fail(self._saving, f"{self.directory}: {cause(e)}")

  def wait(self):
    """Waits for the save in flight, polling so that a failure is reported in seconds."""
    while self.manager.is_saving_in_progress():
      self.check()
      time.sleep(0.05)
    self.manager.wait_until_finished()
    self.check()

  def close(self):
    """Waits for the save in flight and closes; after a failed save it only lets go (the
    process is expected to exit)."""
    try:
      if self._failed is None:
        self.wait()
        self.manager.close()
    finally:
      python_logging.getLogger("absl").removeHandler(self._errors)

  @property
  def failed(self) -> bool:
    return self._failed is not None


def _check_files(step_dir):
  """The files every restore reads first, each parsed or looked for: a corrupt step is named
  by its file before Orbax reports it in its own words."""
  for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "data/metadata", "checksums/metadata"):
    path = step_dir / name
    if name.startswith("checksums") and not (step_dir / "checksums").exists():
      continue
    if not path.exists():
      raise _Corrupt(f"{path} is missing")
    try:
      json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise _Corrupt(f"{path} is not valid JSON ({e})") from None
  state = step_dir / "state"
  if any(p.name.startswith("ocdbt.process_") for p in state.iterdir()):
    if not (state / "manifest.ocdbt").exists():
      raise _Corrupt(f"{state / 'manifest.ocdbt'} is missing")


def _sync_processes(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def checkpoint_steps(workdir) -> list:
  """The steps of the finished checkpoints in `workdir` (none when it has none), as Orbax
  tells them, without creating anything."""
  return sorted(ocp.path.step.checkpoint_steps(workdir_path(workdir) / CHECKPOINTS))


# --- the run's config ---------------------------------------------------------------------------


def write_config(config, workdir):
  """The run's config as JSON beside the checkpoints (process 0), when the run starts."""
  if jax.process_index() == 0:
    directory = workdir_path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def _tuples(x):  # JSON turned config tuples into lists
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def read_config(workdir, *, with_changes: bool = True) -> ml_collections.ConfigDict:
  """The config a run in `workdir` is trained with: config.json, and (`with_changes`) every
  change accepted since, from config_changes.jsonl."""
  directory = workdir_path(workdir)
  path = directory / CONFIG_FILE
  if not path.exists():
    what = "does not exist" if not directory.exists() else f"has no {CONFIG_FILE}"
    raise FileNotFoundError(f"{directory} {what}: it is not a sove_jax training workdir.")
  try:
    raw = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}).") from None
  config = ml_collections.ConfigDict(_tuples(raw))
  if with_changes:
    for record in config_changes(directory):
      for field, (_, new) in record["changes"].items():
        _set_field(config, field, _tuples(new))
  return config


def config_changes(workdir) -> list:
  """The changes accepted on restarts, oldest first: [{"step", "time", "changes": {field:
  [old, new]}}]."""
  path = workdir_path(workdir) / CHANGES_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_config_change(workdir, step: int, changes: dict):
  """Appends one accepted change (process 0): {field: (old, new)} taking effect after `step`."""
  if jax.process_index() != 0:
    return
  path = workdir_path(workdir) / CHANGES_FILE
  record = {"step": int(step), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"), "changes": {k: [_jsonable(a), _jsonable(b)]
                                       for k, (a, b) in changes.items()}}
  old = path.read_text() if path.exists() else ""
  path.write_text(old + json.dumps(record) + "\n")


def _jsonable(value):
  return list(value) if isinstance(value, tuple) else value


def _set_field(config, field: str, value):
  """One accepted change: the field set, or removed when its new value is None."""
  from sove_jax import configuration
  if value is not None:
    configuration.set_field(config, field, value, create=True, check_type=False)
    return
  *sections, name = field.split(".")
  try:
    parent = configuration.get_field(config, ".".join(sections)) if sections else config
  except KeyError:
    return
  if name in parent:
    del parent[name]
