r"""Entry point: `python -m sove_jax.main --config=configs/default.py --workdir=runs/default`.

The same command on one CPU, a GPU node, a SLURM cluster or every worker of a TPU pod. Config
fields can be overridden on the command line (`--config.batch_size=256`). `--compile_only`
lowers and compiles the step for the configured mesh and prints its per-device memory.
"""
import os
import pathlib
import sys

from absl import app, flags
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


def _initialise_distributed():
  """jax.distributed on multi-process runs: flags, else SLURM or a TPU pod, else nothing."""
  import jax
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  elif len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from sove_jax import configuration, train
  config = _CONFIG.value
  _initialise_distributed()
  try:
    if _COMPILE_ONLY.value:
      _, report = train.compile_only(config)
      print(report)
      return
    if not _WORKDIR.value:
      raise app.UsageError("--workdir is required (where checkpoints and metrics go).")
    train.train_and_evaluate(config, _WORKDIR.value)
  except configuration.ConfigError as e:
    sys.exit(f"Config error: {e}")
  except train.NonFiniteLoss as e:
    sys.exit(str(e))


if __name__ == "__main__":
  app.run(main)
