#!/usr/bin/env bash
# GPU check for issue 11 (TensorRT plugins), one call on the H100 (49 tests; set TEST_TIMEOUT, default 400 s):
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

# Spread the tests over workers where pytest-xdist is installed, each with its share of the cores for torch's CPU
# threads (the float64 references): in the last run, 8 workers of 16 threads each on 16 cores took about 80 s per
# test, the likeliest cause being the threads' oversubscription, and the run was cut short.
WORKERS=""
if $PY -c "import xdist" 2>/dev/null; then
    WORKERS="-n 8"
    export OMP_NUM_THREADS=$(( $(nproc) / 8 > 0 ? $(nproc) / 8 : 1 ))
fi
export PLUGIN_ERRORS_FILE="$OUT/errors.txt"
: > "$PLUGIN_ERRORS_FILE"
timeout "${TEST_TIMEOUT:-400}" $PY -m pytest -v -rs --durations=10 $WORKERS tests/test_plugin_kernels.py -k ptx \
    > "$OUT/tests.txt" 2>&1
echo "== tests (tolerance: float32 2e-5, bfloat16 2e-2)"
grep -E "passed|failed|error" "$OUT/tests.txt" | tail -2
grep -E "^FAILED|^ERROR|SKIPPED" "$OUT/tests.txt" | cut -c1-250 | head -20
if ! grep -qE "[0-9]+ (passed|failed)" "$OUT/tests.txt"; then
    echo "cut by TEST_TIMEOUT (${TEST_TIMEOUT:-400} s); tests that did not finish:"
    $PY -m pytest -q --collect-only -p no:cacheprovider tests/test_plugin_kernels.py -k ptx 2>/dev/null \
        | grep "::" | while read -r id; do grep -qF "${id#tests/test_plugin_kernels.py::}" <(grep -E "PASSED|FAILED" "$OUT/tests.txt") || echo "  $id"; done
fi
echo "== relative errors of the PTX launches against float64"
sort "$PLUGIN_ERRORS_FILE" | sed 's/^/  /'
