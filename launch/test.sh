#!/usr/bin/env bash
# Runs the whole test suite, both tiers (`pytest` alone runs the fast one), one pytest worker per
# core (pytest-xdist, set in pytest.ini: at most 4, as each worker holds JAX, TensorFlow and 8
# fake devices). Extra arguments go to pytest. The run ends by naming every test that did not run
# and why (tests/conftest.py); launch/install.sh installs everything the tests import.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q -m "slow or not slow" tests "$@"
