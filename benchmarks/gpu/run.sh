#!/usr/bin/env bash
# The command for the device tool (see prepare.sh): installs the carried wheels, then
# runs bench.py, which writes one JSON file per step under $OUT as it goes.
set -uo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,mig.mode.current --format=csv > "${OUT:-.}/nvidia-smi.csv" 2>&1
timeout 540 python3 benchmarks/gpu/bench.py --model-config .gpu_carry/model --out "${OUT:-gpu-out}" "$@" 2>&1 | tee "${OUT:-.}/log.txt"
