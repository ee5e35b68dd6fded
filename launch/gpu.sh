#!/usr/bin/env bash
# One GPU node, all its GPUs in one process (JAX sees every local GPU). Installs what is missing
# into the Python on PATH (activate a virtualenv first): the package with JAX's CUDA 12 runtime
# (`pip install -e '.[gpu]'`), when JAX is absent or sees no GPU.
#
#   bash launch/gpu.sh configs/vits.py /data/runs/vits [--config.batch_size=512 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?config file}"; WORKDIR="${2:?workdir}"; shift 2
if ! python3 -c 'import sove_jax, jax, sys; sys.exit(jax.default_backend() != "gpu")' \
    2>/dev/null; then
  echo "Installing sove_jax with JAX's CUDA 12 runtime (pip install -e '.[gpu]')."
  python3 -m pip install -q -e '.[gpu]'
fi
# Let XLA overlap collectives with compute and keep TensorFlow (tf.data) off the GPUs.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL=2
exec python3 -m sove_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
