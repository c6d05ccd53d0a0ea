#!/usr/bin/env bash
# Create/reuse .venv at the repo root and install laion-dask (+ extras given as $1, comma list).
# torch is pinned: a bare "torch" pulls a multi-GB CUDA build; 2.13.0 is the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras=${1:-}
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q "torch==2.13.0" -e "$spec"
