#!/usr/bin/env bash
# One GPU node, all its GPUs in one process (JAX sees every local GPU).
#
#   bash launch/gpu.sh configs/vits.py /data/runs/vits [--config.batch_size=512 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?config file}"; WORKDIR="${2:?workdir}"; shift 2
# Let XLA overlap collectives with compute and keep TensorFlow (tf.data) off the GPUs.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL=2
exec python3 -m sove_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
