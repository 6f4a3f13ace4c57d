#!/usr/bin/env bash
# Fetch, on this machine, the wheels bench/gpu.sh installs on the GPU machine (which cannot reach
# PyPI): torchao, pure Python plus optional kernels, no dependencies. Carry bench/.wheels with the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p bench/.wheels
$PY -m pip download --quiet --no-deps --only-binary=:all: --dest bench/.wheels "torchao==0.18.0"
ls -l bench/.wheels
