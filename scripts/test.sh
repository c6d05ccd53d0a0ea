#!/usr/bin/env bash
# Create/reuse .venv, install laion-dask with its test extras, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
exec .venv/bin/python -m pytest "$@"
