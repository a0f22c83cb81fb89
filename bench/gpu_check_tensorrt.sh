#!/usr/bin/env bash
# GPU check for issue 11 (TensorRT plugins), one call on the H100, about 2 minutes:
#
#     bash bench/gpu_check_tensorrt.sh            # details under $OUT when it is set
#
# tests/test_plugin_kernels.py -k ptx: the exact PTX that the plugins' aot_impl hands TensorRT (plugins/kernels.py
# aot_kernel: kernel name, grid, block, shared memory and int32 arguments from plugins/spec.py's launch), loaded with
# CuPy and launched outside TensorRT with TensorRT's calling convention (inputs, int32 arguments, outputs, null for
# Triton's scratch pointers), on odd shapes, float32 and bfloat16, K = V = 64 and 128 (and 48/80), past and present
# state as one buffer and as two; each case's relative error against a float64 reference. No TensorRT needed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d /tmp/gpu_check_tensorrt.XXXXXX)}"
PY="${PYTHON:-$(command -v python || command -v python3)}"     # the GPU machine has python3 only
mkdir -p "$OUT"
echo "details: $OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
$PY -c "import cupy; print('cupy', cupy.__version__)" 2>/dev/null || echo "cupy is missing: the PTX tests skip"
$PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null || echo "tensorrt: not installed"

# The PTX compiles (about 25 kernels) dominate: spread them over workers where pytest-xdist is installed.
WORKERS=""
$PY -c "import xdist" 2>/dev/null && WORKERS="-n 8"
export PLUGIN_ERRORS_FILE="$OUT/errors.txt"
: > "$PLUGIN_ERRORS_FILE"
timeout "${TEST_TIMEOUT:-170}" $PY -m pytest -q -rs $WORKERS tests/test_plugin_kernels.py -k ptx \
    > "$OUT/tests.txt" 2>&1
echo "== tests (tolerance: float32 2e-5, bfloat16 2e-2)"
grep -E "passed|failed|error" "$OUT/tests.txt" | tail -2
grep -E "^FAILED|^ERROR|SKIPPED" "$OUT/tests.txt" | cut -c1-250 | head -20
echo "== relative errors of the PTX launches against float64"
sort "$PLUGIN_ERRORS_FILE" | sed 's/^/  /'
