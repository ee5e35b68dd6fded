r"""Entry point: `python -m sove_jax.main --config=configs/default.py --workdir=runs/default`.

The same command on one CPU, a GPU node, a SLURM cluster or every worker of a TPU pod. Config
fields can be overridden on the command line (`--config.batch_size=256`). `--compile_only`
lowers and compiles the step for the configured mesh and reports its per-device memory.
`--verbose` shows the libraries' INFO lines as well as ours.
"""
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# The repository's default config, found from this file, so the default works from any folder.
_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
_CONFIG = config_flags.DEFINE_config_file("config", str(_DEFAULT_CONFIG), "Run config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard events.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Compile the train step, print its memory, and exit.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process GPU/CPU runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show the libraries' INFO lines too (Orbax saves and restores, CLU, "
                             "optax, TensorFlow); by default the console shows sove_jax's lines "
                             "and every warning.")


def _initialize_distributed():
  """jax.distributed for multi-process runs. With the flags: that job (on CPU, collectives over
  gloo). Without: JAX's own cluster detection (SLURM, Cloud TPU pods, Open MPI, Kubernetes);
  where it finds no cluster, this is a single-process run."""
  import jax
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if "coordinator_address" not in str(e):  # a cluster was found but could not be joined
      raise
    logging.info("No cluster detected: a single-process run.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _VERBOSE.value:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO and WARNING lines
  from sove_jax import configuration, reporting, train
  reporting.configure_console(verbose=_VERBOSE.value)
  config = _CONFIG.value
  _initialize_distributed()
  try:
    if _COMPILE_ONLY.value:
      _, report = train.compile_only(config)
      logging.info("%s", report)
      return
    if not _WORKDIR.value:
      raise app.UsageError("--workdir is required (where checkpoints and metrics go).")
    train.train_and_evaluate(config, _WORKDIR.value)
  except configuration.ConfigError as e:
    logging.error("Config error: %s", e)
    sys.exit(1)
  except train.NonFiniteLoss as e:
    logging.error("%s", e)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
