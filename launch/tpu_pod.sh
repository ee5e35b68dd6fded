#!/usr/bin/env bash
# Every worker of a TPU pod slice, one command: this checkout is copied to every worker, installed
# into a Python the package supports, and the run started on all workers at once
# (jax.distributed finds the pod by itself on TPU VMs). Data and workdir live in GCS.
#
#   TPU=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh configs/vits.py gs://BUCKET/sove/vits \
#       --config.data.data_dir=gs://BUCKET/tensorflow_datasets
#
# Python: stock TPU VM images ship Python 3.10 and sove_jax needs >= 3.11, so each worker gets uv
# (installed with the worker's own pip) and uv a standalone CPython 3.11 with a virtualenv in
# ~/sove_jax_venv holding `.[tpu]` (JAX with libtpu). The checkout travels as a tarball of the
# files git tracks, as they are in this working tree, unpacked into ~/sove_jax on every worker.
# INSTALL=0 skips the copy and install (a restart: the same code is already there);
# DETACH=1 leaves the run going when this terminal closes (output in ~/sove_jax_run.log there).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?config file}"; WORKDIR="${2:?workdir (gs://...)}"; shift 2
: "${TPU:?set TPU to the pod slice name}" "${ZONE:?set ZONE}"
PROJECT_FLAG=()
if [ -n "${PROJECT:-}" ]; then PROJECT_FLAG=(--project="$PROJECT"); fi
# Expanded on the workers, not here.
# shellcheck disable=SC2016
REMOTE_DIR='$HOME/sove_jax' VENV='$HOME/sove_jax_venv'
ARGS=$(printf ' %q' --config="$CONFIG" --workdir="$WORKDIR" "$@")

if [ "${INSTALL:-1}" = 1 ]; then
  TARBALL="$(mktemp -d)/sove_jax.tar.gz"
  git ls-files -z | tar --null -czf "$TARBALL" -T -
  gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU":/tmp/sove_jax.tar.gz --worker=all \
    --zone="$ZONE" "${PROJECT_FLAG[@]}"
  gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --command="set -e; rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR &&
      tar -xzf /tmp/sove_jax.tar.gz -C $REMOTE_DIR &&
      python3 -m pip install -q --user --upgrade uv &&
      \$HOME/.local/bin/uv venv -q --allow-existing --python 3.11 $VENV &&
      \$HOME/.local/bin/uv pip install -q --python $VENV/bin/python -e \"${REMOTE_DIR}[tpu]\""
fi

RUN="cd $REMOTE_DIR && TF_CPP_MIN_LOG_LEVEL=2 $VENV/bin/python -m sove_jax.main$ARGS"
if [ "${DETACH:-0}" = 1 ]; then
  RUN="nohup sh -c '$RUN' > \$HOME/sove_jax_run.log 2>&1 < /dev/null &"
fi
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone="$ZONE" "${PROJECT_FLAG[@]}" \
  --command="$RUN"
