#!/usr/bin/env bash
# Runs the whole test suite, one pytest worker per core (pytest-xdist; at most 4: each worker
# holds JAX, TensorFlow and 8 fake devices). Extra arguments go to pytest.
# The run ends by naming every test that did not run and why (tests/conftest.py); the PyTorch
# parity tests need PyTorch, e.g. the CPU build:
#   pip install torch --index-url https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
workers=$(python3 -c 'import os; print(min(len(os.sched_getaffinity(0)), 4))')
exec python3 -m pytest -q -n "$workers" tests "$@"
