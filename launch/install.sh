#!/usr/bin/env bash
# What the README's first command installs, and what CI installs into its fresh virtualenv: the
# package with everything its tests import (`.[test]`: pytest, xdist, timeout, chex, matplotlib and
# a CPU PyTorch), and, where apt is at hand as root, Fashion-MNIST (Debian's
# dataset-fashion-mnist) and tcmalloc (the trainer runs under it where installed: a fifth less CPU
# per step on CPU hosts).
# Into the Python on PATH: activate a virtualenv first to keep it there.
#
#   bash launch/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=()
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] ||
    missing+=(dataset-fashion-mnist)
  ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal || missing+=(libtcmalloc-minimal4)
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" ||
      echo "apt-get could not install ${missing[*]}: continuing without them."
  fi
fi
python3 -m pip install -q -e '.[test]'
