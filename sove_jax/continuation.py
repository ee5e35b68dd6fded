"""Whether a workdir's run may go on under a config, and what its checkpoints hold when it stops.

A restart compares its config with the run's `config.json` before anything is written
(`check`): fields added to the code since the run started take their defaults
(`with_new_fields`); fields of one launch (`PER_LAUNCH`) may change freely; a change the
checkpoints cannot be restored under (one that alters the train state's structure or shapes) is
refused; any other change needs `--allow_config_change`. `nonfinite_report` is the sentence a
non-finite step ends the run with: which checkpoints exist, how large their parameters are,
where a restart resumes.
"""
import pathlib

import jax
import ml_collections

from sove_jax import checkpoint, configuration
from sove_jax import state as state_lib

# Fields that belong to one launch, not to the run: a restart may change them freely.
# Fields of one launch, not of the run: a restart may change them without --allow_config_change
# (a field ending in "." names a whole block).
PER_LAUNCH = ("run_steps", "profile", "prefetch_to_device", "keep_period", "hosts.")


DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
# Fields whose default config value has since become a recipe choice other than the behaviour
# the code had before the field existed: a run started before them takes this value instead.
BEFORE_FIELD = {"sove.koleo_weight": 0.0}   # added off; the default took 0.8 later


def with_new_fields(stored, default=None):
  """`stored` (a run's config.json) with every field it lacks taken from the default config:
  fields added to the code since the run started. A new field's default keeps the behaviour
  the code had before it existed (the project's rule; BEFORE_FIELD where the default has
  moved on since), so a run started before it resumes unchanged instead of being refused as
  "configured otherwise"."""
  if default is None:
    if not DEFAULT_CONFIG.is_file():
      return stored
    default = configuration.load(str(DEFAULT_CONFIG))
  out = stored.copy_and_resolve_references()
  for field, value in configuration.flat_fields(default).items():
    try:
      configuration.get_field(out, field)
    except KeyError:
      value = BEFORE_FIELD.get(field, configuration.get_field(default, field))
      configuration.set_field(out, field, value, create=True)
  return out


def changed_fields(old, new, *, ignore=PER_LAUNCH) -> dict:
  """{dotted field: (old value, new value)} where two configs differ (None: absent)."""
  a, b = configuration.flat_fields(old), configuration.flat_fields(new)
  def ignored(k):
    return k in ignore or any(i.endswith(".") and k.startswith(i) for i in ignore)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if not ignored(k) and a.get(k) != b.get(k)}


def describe_changes(changes: dict) -> str:
  """`model.width 32 -> 64, batch_size 16 -> 32`."""
  return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())



def state_signature(config):
  """The train state's tree structure and every leaf's (shape, dtype): what a checkpoint must
  match to be restored under `config`."""
  leaves, treedef = jax.tree.flatten(state_lib.abstract(config))
  return treedef, [(x.shape, x.dtype) for x in leaves]


def unrestorable(stored, config, changes: dict) -> list:
  """The changed fields that alter the train state's structure or shapes (so the checkpoints
  cannot be restored), each tried on its own on the stored config."""
  reference = state_signature(stored)
  fields = []
  for field in changes:
    trial = ml_collections.ConfigDict(stored.to_dict())
    try:
      configuration.set_field(trial, field, configuration.get_field(config, field),
                              create=True, check_type=False)
      same = state_signature(trial) == reference
    except Exception:  # noqa: BLE001  a field that breaks the state on its own changes it
      same = False
    if not same:
      fields.append(field)
  if not fields and state_signature(config) != reference:
    fields = list(changes)
  return fields


def check(config, workdir, *, allow_config_change: bool):
  """Compares `config` with the run already in `workdir` (before anything is written) and
  returns the accepted changes ({} for a new run or the same config). Raises ConfigError for a
  change the checkpoints cannot be restored under, and for any other change unless
  `allow_config_change`."""
  wd = checkpoint.workdir_path(workdir)
  if not (wd / checkpoint.CONFIG_FILE).exists():
    return {}
  stored = with_new_fields(checkpoint.read_config(wd))
  changes = changed_fields(stored, config)
  if not changes:
    return {}
  steps = checkpoint.checkpoint_steps(wd)
  if not steps:
    if not allow_config_change:
      raise configuration.ConfigError(
          f"{wd} holds a run configured otherwise ({describe_changes(changes)}) "
          "but no checkpoint: pass --allow_config_change to start it anew with this config "
          "(the old config.json is kept), or use another --workdir.")
    return changes
  fixed = unrestorable(stored, config, changes)
  if fixed:
    shown = {k: changes[k] for k in fixed}
    raise configuration.ConfigError(
        f"The checkpoints in {wd} cannot be restored under this config: "
        f"{describe_changes(shown)} change the train state; use another "
        "--workdir, or drop those overrides.")
  if not allow_config_change:
    raise configuration.ConfigError(
        f"This config differs from the run's in {wd}: {describe_changes(changes)}"
        "; its checkpoints can continue under it: pass --allow_config_change to do so (the "
        f"change is recorded in {checkpoint.CHANGES_FILE}), or use another --workdir.")
  return changes


def nonfinite_report(step: int, ckpt) -> str:
  """What a non-finite step leaves: which checkpoints exist and how large their parameters
  are, where a restart resumes, and how to resume from an earlier step."""
  try:
    ckpt.wait()
    steps = ckpt.all_steps()
  except checkpoint.CheckpointError:
    steps = checkpoint.checkpoint_steps(ckpt.workdir)
  line = f"Non-finite loss or gradient at step {step}: the run stops. "
  if not steps:
    return line + "No checkpoint was saved before it: a restart begins a new run."

  def described(s):
    largest = checkpoint.saved_notes(ckpt.workdir, s).get("largest_parameter")
    return f"step {s}" + ("" if largest is None else f" (parameters up to {largest:.3g})")

  line += (f"Checkpoints in {ckpt.directory}: {', '.join(map(described, reversed(steps)))}; "
           f"a restart resumes from step {steps[-1]}")
  if len(steps) > 1:
    line += (f"; to resume from an earlier one, restart with --restore_step={steps[-2]} (later "
             "ones are set aside, not deleted)")
  return line + "."
