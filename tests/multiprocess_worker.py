"""One process of the two-process test: train the smoke config, restore, report local copies.

    python tests/multiprocess_worker.py PORT PROCESS_ID WORKDIR STEPS
"""
import json
import os
import sys

port, pid, workdir, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

logging.set_verbosity(logging.INFO)  # the trainer's lines (no absl app here to set it)

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)

from configs import smoke  # noqa: E402
from sove_jax import checkpoint, sharding, state as state_lib, train  # noqa: E402

config = smoke.get_config()
config.total_steps = steps
config.checkpoint_every = 2
# The second launch extends the run (total_steps 3 -> 5): a change the trainer is told of.
metrics = train.train_and_evaluate(config, workdir, allow_config_change=True)

mesh = sharding.make_mesh(config.mesh)
setup = train.build(config, mesh, steps_per_epoch=1)
ck = checkpoint.Checkpointer(workdir, save_every=1, keep=10)
got = ck.restore(state_lib.abstract_with_shardings(setup.layout))
restored, data_state = got.state, got.data
ck.close()


def local_sum(x):
  return float(sum(np.asarray(s.data, np.float64).sum() for s in x.addressable_shards[:1]))


print("RESULT " + json.dumps({
    "process": jax.process_index(), "devices": jax.device_count(),
    "loss": metrics["train/loss"],
    "step": int(np.asarray(restored.step.addressable_shards[0].data)),
    "class_bank": local_sum(restored.class_bank.embeddings),
    "patch_bank": local_sum(restored.patch_bank.embeddings),
    "teacher": sum(local_sum(x) for x in jax.tree.leaves(restored.teacher)),
    "data_state": data_state,
}), flush=True)
