#!/usr/bin/env bash
# Runs the whole test suite (CI on 2 CPU cores: 23 minutes, install included). Extra arguments go
# to pytest.
# The run ends by naming every test that did not run and why (tests/conftest.py); the PyTorch
# parity tests need PyTorch, e.g. the CPU build:
#   pip install torch --index-url https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q tests "$@"
