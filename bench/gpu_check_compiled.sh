#!/usr/bin/env bash
# GPU check for issue 10 (the compiled target, its CUDA graphs, ONNX Runtime CUDA graphs), one call on the H100:
#
#     bash bench/gpu_check_compiled.sh                 # about 8 minutes; details under $OUT when it is set
#     PRESETS=tiny bash bench/gpu_check_compiled.sh; PRESETS=small TESTS=0 bash ...   # in two calls
#
# 1. tests/test_compiled_gpu.py: parity with the float32 eager model, CUDA graph replay, padding rows, snapshots,
#    device sampling, warm start from the artifact's compile cache, ONNX Runtime CUDA graphs vs its plain path.
# 2. For each preset (random weights): export --target compiled --device cuda --dtype bfloat16 (compile time),
#    load it in a fresh process with empty Inductor and Triton caches (warm-load time from the artifact's cache),
#    then decode ms/token at batch 1, 8, 32 and prefill of 2048 tokens, timed with CUDA events (medians of
#    repeats after warm-up), against the eager model (with fla / causal-conv1d when installed) in the same run.
# 3. tiny, float32, onnxruntime target: decode ms/token with and without CUDA graphs (host-clock medians of engine.decode).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d /tmp/gpu_check_compiled.XXXXXX)}"
PY="${PYTHON:-$(command -v python || command -v python3)}"     # the GPU machine has python3 only
PRESETS="${PRESETS:-tiny small}"
mkdir -p "$OUT"
echo "details: $OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [ "${TESTS:-1}" = 1 ]; then
    echo "== GPU tests"
    timeout "${TEST_TIMEOUT:-420}" $PY -m pytest -q -s -rs tests/test_compiled_gpu.py > "$OUT/gpu_tests.txt" 2>&1
    grep -E "^compiled cuda|CUDA graph replay|warm load|^onnxruntime cuda|passed|failed|error|SKIPPED|^FAILED" \
        "$OUT/gpu_tests.txt" | cut -c1-300
fi

for preset in $PRESETS; do
    echo "== $preset"
    ckpt="$OUT/$preset-ckpt" art="$OUT/$preset-compiled"
    $PY - "$preset" "$ckpt" <<'EOF'
import sys, torch
from model import Qwen3NextForCausalLM, preset
torch.manual_seed(0)
Qwen3NextForCausalLM(preset(sys.argv[1])).to(torch.bfloat16).save_pretrained(sys.argv[2])
EOF
    # Shapes: decode buckets 1, 8, 32; prefill chunks 16 (the export's own check) and 2048 (the timed prefill).
    timeout "${EXPORT_TIMEOUT:-360}" $PY -m export "$ckpt" --out "$art" --target compiled --device cuda --dtype bfloat16 \
        --max-batch 32 --max-seq-len 4096 --decode-buckets 1 8 32 --prefill-chunks 16 2048 \
        > "$OUT/$preset-export.txt" 2>&1 || { echo "export failed:"; tail -5 "$OUT/$preset-export.txt"; continue; }
    tail -2 "$OUT/$preset-export.txt"
    TORCHINDUCTOR_CACHE_DIR="$OUT/$preset-fresh-inductor" TRITON_CACHE_DIR="$OUT/$preset-fresh-triton" \
        timeout 300 $PY - "$preset" "$ckpt" "$art" "$OUT/$preset-timing.json" <<'EOF'
import json, statistics, sys, time
import numpy as np, torch
import runtime
from model import Qwen3NextForCausalLM

name, ckpt, art, report = sys.argv[1:]
t0 = time.perf_counter()
engine = runtime.load(art, backend="compiled", device="cuda")
load_s = time.perf_counter() - t0
from torch._dynamo.utils import counters
manifest = json.load(open(f"{art}/manifest.json"))
rng = np.random.default_rng(0)
V = engine.vocab_size


def cuda_ms(fn, repeats, inner):
    """Median over `repeats` of the mean time of `inner` calls, by CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def engine_decode(batch):
    state = engine.new_state(batch)
    engine.prefill(rng.integers(0, V, (batch, 64)), state)
    ids, rows = rng.integers(0, V, (batch, 1)), np.arange(batch)
    step = lambda: engine.backend.step_on_device(ids, state.tensors, rows, batch)
    for _ in range(5):
        step()                                   # captures the graph
    ms = cuda_ms(step, 7, 40)
    api = []                                     # the engine API: ids in, host logits out
    for _ in range(30):
        t = time.perf_counter()
        engine.decode(ids[:, 0], state)
        api.append((time.perf_counter() - t) * 1e3)
    return ms, statistics.median(api)


def engine_prefill(tokens):
    ids = rng.integers(0, V, (1, tokens))
    states = [engine.new_state(1) for _ in range(4)]
    it = iter(states)
    fn = lambda: engine.backend.step_on_device(ids, next(it).tensors, np.zeros(1, np.int64), 1)
    fn()
    return cuda_ms(fn, 3, 1)


compiled = {b: engine_decode(b) for b in (1, 8, 32)}
compiled_prefill = engine_prefill(2048)
memory_gib = torch.cuda.max_memory_allocated() / 2**30      # the engine, its states and scratch, nothing else
model = Qwen3NextForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device="cuda").eval()


@torch.inference_mode()
def eager_decode(batch):
    state = model.new_state(batch, 4096)
    model(torch.as_tensor(rng.integers(0, V, (batch, 64)), device="cuda"), state, logits_to_keep=1)
    x = torch.as_tensor(rng.integers(0, V, (batch, 1)), device="cuda")
    return cuda_ms(lambda: model(x, state, logits_to_keep=1), 3, 5)


@torch.inference_mode()
def eager_prefill(tokens):
    x = torch.as_tensor(rng.integers(0, V, (1, tokens)), device="cuda")
    model(x, model.new_state(1, 4096), logits_to_keep=1)
    return cuda_ms(lambda: model(x, model.new_state(1, 4096), logits_to_keep=1), 3, 1)


result = {"preset": name, "compile_s": manifest["targets"]["compiled"]["compile_seconds"], "warm_load_s": load_s,
          "cache": {k: v for k, v in {**counters["inductor"], **counters["aot_autograd"]}.items() if "cache" in k},
          "parity": manifest["parity"]["compiled"], "decode": {}, "prefill": {}, "engine_memory_gib": memory_gib}
for b, (ms, api) in compiled.items():
    result["decode"][b] = {"compiled_ms": ms, "engine_api_ms": api, "eager_ms": eager_decode(b),
                           "tokens_per_s": b / ms * 1e3}
result["prefill"][2048] = {"compiled_ms": compiled_prefill, "eager_ms": eager_prefill(2048)}
json.dump(result, open(report, "w"), indent=2)
print(f"{name}: compile {result['compile_s']:.0f}s at export, warm load {load_s:.1f}s (cache {result['cache']}), "
      f"parity rel {result['parity']['rel_error']:.1e} top-1 {result['parity']['top1_agreement']:.3f}, "
      f"engine peak memory {memory_gib:.2f} GiB")
print(f"{'':8}{'compiled ms':>12}{'engine.decode':>15}{'eager ms':>10}{'speedup':>9}{'tokens/s':>10}")
for b, d in result["decode"].items():
    print(f"decode b{b:<3}{d['compiled_ms']:12.3f}{d['engine_api_ms']:15.3f}{d['eager_ms']:10.2f}"
          f"{d['eager_ms'] / d['compiled_ms']:8.1f}x{d['tokens_per_s']:10.0f}")
p = result["prefill"][2048]
print(f"prefill 2048: compiled {p['compiled_ms']:.2f} ms, eager {p['eager_ms']:.2f} ms "
      f"({p['eager_ms'] / p['compiled_ms']:.1f}x)")
EOF
done

echo "== onnxruntime CUDA graphs (tiny, float32)"
if [ -d "$OUT/tiny-ckpt" ] && $PY -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" 2>/dev/null; then
    timeout 240 $PY -m export "$OUT/tiny-ckpt" --out "$OUT/tiny-ort" --target onnxruntime --device cuda \
        --dtype float32 --max-batch 8 --max-seq-len 512 > "$OUT/tiny-ort-export.txt" 2>&1 &&
    timeout 120 $PY - "$OUT/tiny-ort" <<'EOF'
import statistics, sys, time
import numpy as np
import runtime

def decode_ms(engine, batch, prefill, warmup, steps):
    state = engine.new_state(batch)
    rng = np.random.default_rng(0)
    engine.prefill(rng.integers(0, engine.vocab_size, (batch, prefill)), state)
    times = []
    for i in range(warmup + steps):
        ids = rng.integers(0, engine.vocab_size, batch)
        t0 = time.perf_counter()
        engine.decode(ids, state)   # returns host logits: the step has finished
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
for graphs in (False, True):
    engine = runtime.load(sys.argv[1], device="cuda", cuda_graphs=graphs)
    ms = [decode_ms(engine, b, 32, 10, 100) for b in (1, 8)]
    print(f"cuda_graphs={graphs!s:5} (active: {engine.backend.cuda_graphs!s:5}): decode b1 {ms[0]:.3f} ms, "
          f"b8 {ms[1]:.3f} ms per token")
EOF
else
    echo "skipped: needs the tiny checkpoint above and onnxruntime-gpu"
fi
