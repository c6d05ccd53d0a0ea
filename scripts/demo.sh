#!/usr/bin/env bash
# Create/reuse .venv, install laion-dask, run the offline demo (no network after the install).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/laion-dask demo "$@"
