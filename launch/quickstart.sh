#!/usr/bin/env bash
# The README's first command: install what is missing, get Fashion-MNIST if absent, train the
# default config (a small ViT, about 10 minutes on 2 CPU cores), then report k-NN accuracy.
#
#   bash launch/quickstart.sh [WORKDIR] [extra flags for sove_jax.main]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-runs/default}"; shift || true
FMNIST=/usr/share/datasets/fashion-mnist

python3 -c 'import sove_jax, jax, flax, optax, orbax.checkpoint, tensorflow, ml_collections' \
  2>/dev/null || python3 -m pip install -q -e '.[test]'

EXTRA=()
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  else
    echo "Fashion-MNIST IDX files not found in $FMNIST; using the TFDS copy (downloads once)."
    EXTRA=(--config.data.source=tfds --config.data.name=fashion_mnist)
  fi
fi

# tcmalloc: a fifth less CPU per training step here (sove_jax/allocator.py: the trainer uses it
# where it is installed; SOVE_JAX_ALLOCATOR=system opts out).
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq libtcmalloc-minimal4 || echo "tcmalloc not installed: glibc malloc."
fi

python3 -m sove_jax.main --config=configs/default.py --workdir="$WORKDIR" "${EXTRA[@]}" "$@"
python3 -m sove_jax.evaluate.knn --workdir="$WORKDIR"
