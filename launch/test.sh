#!/usr/bin/env bash
# Runs the whole test suite (6-13 minutes on 2 shared CPU cores). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q tests "$@"
