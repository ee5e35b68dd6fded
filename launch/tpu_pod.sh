#!/usr/bin/env bash
# Every worker of a TPU pod slice, one command. jax.distributed initializes itself on TPU VMs.
# The repository must be checked out at the same path on every worker; data and workdir on GCS.
#
#   TPU=my-v4-64 ZONE=us-central2-b bash launch/tpu_pod.sh configs/vitl.py gs://BUCKET/sove/vitl
set -euo pipefail
CONFIG="${1:?config file}"; WORKDIR="${2:?workdir (gs://...)}"; shift 2
: "${TPU:?set TPU to the pod slice name}" "${ZONE:?set ZONE}"
REPO="${REPO:-\$HOME/sove_jax}"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd $REPO && python3 -m pip install -q -e . 'jax[tpu]' &&
  TF_CPP_MIN_LOG_LEVEL=2 python3 -m sove_jax.main --config=$CONFIG --workdir=$WORKDIR $*"
