"""The package's layers: what importing each module brings in, checked in fresh processes.

The step, the objective, the models, the state, the optimizer, the sharding, the trainer and the
benchmarks import without TensorFlow (GPU hosts have none; TensorFlow enters a training process
only through `sove_jax.data`, which hides the GPUs from it first). The checkpoint layer knows
arrays and files, not the network, the optimizer or the step.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules_after(imports: str, blocked=()) -> set:
  code = ("import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
          + imports + "\nprint(' '.join(sorted(sys.modules)))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return set(result.stdout.split())


def test_training_modules_import_without_tensorflow():
  modules = _modules_after(
      "from sove_jax import objective, memory, step, state, optim, sharding, train, reporting\n"
      "from sove_jax import checkpoint, configuration\n"
      "from sove_jax.models import network, vit, head\n"
      "from sove_jax.evaluate import backbone, features, knn, linear\n"
      "sys.path.insert(0, 'benchmarks')\n"
      "import train_step, objective as objective_benchmark, model_flops",
      blocked=("tensorflow", "tensorflow_datasets"))
  assert "sove_jax.data" not in modules and "clu.metric_writers" not in modules


def test_checkpoint_layer_does_not_import_the_step_or_the_network():
  modules = _modules_after("import sove_jax.checkpoint")
  assert not {"sove_jax.optim", "sove_jax.state", "sove_jax.step",
              "sove_jax.models.network"} & modules
