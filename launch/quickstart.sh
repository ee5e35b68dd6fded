#!/usr/bin/env bash
# The README's first command: install what is missing (launch/install.sh: the package with its
# test tools, Fashion-MNIST and tcmalloc), train the default config (a small ViT, about 10
# minutes on 2 CPU cores), then report k-NN accuracy.
#
#   bash launch/quickstart.sh [WORKDIR] [extra flags for sove_jax.main]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-runs/default}"; shift || true
FMNIST=/usr/share/datasets/fashion-mnist

if ! python3 -c 'import sove_jax, jax, flax, optax, orbax.checkpoint, tensorflow, torch' \
    2>/dev/null || [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] ||
    ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal; then
  bash launch/install.sh
fi

EXTRA=()
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST IDX files not found in $FMNIST; using the TFDS copy (downloads once)."
  EXTRA=(--config.data.source=tfds --config.data.name=fashion_mnist)
fi

python3 -m sove_jax.main --config=configs/default.py --workdir="$WORKDIR" "${EXTRA[@]}" "$@"
python3 -m sove_jax.evaluate.knn --workdir="$WORKDIR"
