#!/usr/bin/env bash
# One H100, about 8 minutes: how fast `python -m train` trains (issue 12).
#   bash bench/gpu_check_train.sh        # details under $OUT when it is set, else under a temporary directory
# Table: tiny's tokens/s compiled and eager at the GPU defaults (goal: >= 1,000,000 compiled), small's MFU
# (goal: >= 40%), today's 16 x 512 eager setting if time is left; then tests/test_train_gpu.py (the compiled
# step against the eager one, a real out-of-memory error).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0            # never NVLink multicast on these machines
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
python -m bench.train_speed one-gpu --out "$OUT/train_speed" --budget-s 370
timeout 110 python -m pytest -q -rs tests/test_train_gpu.py 2>&1 | tail -n 6 | tee "$OUT/test_train_gpu.txt"
