#!/bin/bash
# The GPU check on a fresh H100/H200 machine (<= 8 minutes): install, then bench.device_check.
#   bash bench/device_check.sh [OUT_DIR]     # default bench/results
set -euo pipefail
out=${1:-bench/results}
python -m venv .venv-gpu
. .venv-gpu/bin/activate
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
timeout 480 python -m bench.device_check --out "$out/device_check.json"
