r"""Entry point: `python -m sove_jax.main --config=configs/default.py --workdir=runs/default`.

The same command on one CPU, a GPU node, a SLURM cluster or every worker of a TPU pod. Config
fields can be overridden on the command line (`--config.batch_size=256`). `--compile_only`
lowers and compiles the step for the configured mesh and reports its per-device memory.

A restart in the same workdir resumes from its latest readable checkpoint; the config is first
compared with the run's: `--allow_config_change` continues under a changed config (recorded in
the workdir) where the checkpoints allow it, `--restore_step=N` resumes from an earlier
checkpoint (later ones are set aside, not deleted).

Where tcmalloc is installed the command re-executes itself once under it, for a fifth less CPU
per step on CPU hosts (`sove_jax/allocator.py`; `SOVE_JAX_ALLOCATOR=system` keeps glibc's malloc).

Expected failures (a config mistake, missing data, an unwritable workdir, a failed save, a
non-finite loss) end in one line and exit code 1; `--verbose` adds their tracebacks and the
libraries' INFO lines.
"""
import ast
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# The repository's default config, found from this file, so the default works from any folder.
_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
_CONFIG = config_flags.DEFINE_config_file("config", str(_DEFAULT_CONFIG), "Run config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard events "
                               "(a local path or a bucket, gs://...).")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Compile the train step, print its memory, and exit.")
_RESTORE_STEP = flags.DEFINE_integer("restore_step", None,
                                     "Resume from this checkpoint step, not the latest; later "
                                     "checkpoints are moved to checkpoints_set_aside/.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Continue a run under a config that differs from the one in "
    "its workdir (steps, cadences, batch size, recipe; not the state's shapes); the change is "
    "recorded in config_changes.jsonl.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process GPU/CPU runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show the libraries' INFO lines too (Orbax saves and restores, CLU, "
                             "optax, TensorFlow) and the tracebacks of failures; by default the "
                             "console shows sove_jax's lines and every warning.")


def _parse_flags(argv):
  """absl's flag parsing, with a config override that names no field (a typo) reported as one
  line that keeps ml_collections' "did you mean" hint."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see "
                     "help on flags.\n")
    sys.exit(1)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    if "--verbose" in argv:
      raise
    text = str(e.args[0]) if e.args else str(e)
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      try:  # KeyError's message, quoted again when wrapped in an AttributeError
        text = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        break
    first, _, hint = text.partition("\n")
    if hint:
      text = f"no field {first}; {hint[0].lower()}{hint[1:]}"
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    where = f" in {', '.join(overrides)}" if overrides else ""
    sys.stderr.write(f"Config error{where}: {' '.join(text.split())}\n")
    sys.exit(1)


def _initialize_distributed(hosts_config):
  """jax.distributed for multi-process runs. With the flags: that job (on CPU, collectives over
  gloo). Without: JAX's own cluster detection (SLURM, Cloud TPU pods, Open MPI, Kubernetes);
  where it finds no cluster, this is a single-process run. The config's `hosts` block sets how
  long a silent process is waited for (heartbeat) and how long an ending one waits for the
  others."""
  import jax
  timeouts = dict(heartbeat_timeout_seconds=int(hosts_config.heartbeat_timeout_s),
                  shutdown_timeout_seconds=int(hosts_config.shutdown_timeout_s))
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value, **timeouts)
    return
  try:
    jax.distributed.initialize(**timeouts)
  except ValueError as e:
    if "coordinator_address" not in str(e):  # a cluster was found but could not be joined
      raise
    logging.info("No cluster detected: a single-process run.")


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from sove_jax import allocator, train
  logging.info("Host memory allocator: %s.", allocator.in_use())
  config = _CONFIG.value
  _initialize_distributed(config.hosts)
  if _COMPILE_ONLY.value:
    _, report = train.compile_only(config)
    logging.info("%s", report)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where checkpoints and metrics go).")
  train.train_and_evaluate(config, _WORKDIR.value, restore_step=_RESTORE_STEP.value,
                           allow_config_change=_ALLOW_CONFIG_CHANGE.value)


def main(argv):
  from sove_jax import reporting
  reporting.command(_main)(argv)


if __name__ == "__main__":
  from sove_jax import allocator
  allocator.reexec_with_tcmalloc()
  app.run(main, flags_parser=_parse_flags)
