#!/usr/bin/env bash
# The GPU benchmark run on a CUDA machine, from the repository root; each stage takes 3-9 minutes on an H100,
# so where one call is limited to 10 minutes, run them one call each (WORK keeps what earlier calls built):
#
#     bash bench/gpu_run.sh [TINY_CHECKPOINT_DIR]
#     STAGES=small bash bench/gpu_run.sh /tmp/nd-bench/runs/tiny
#
# Stages, in order of priority (STAGES="..." picks some; each builds what it needs if it is missing):
#   tiny      train the tiny preset briefly (or take TINY_CHECKPOINT_DIR), export a bfloat16 CUDA artifact with the
#             torch and compiled targets, bench eager / torch / compiled on it
#   hf-tiny   bench transformers (hf) beside eager on the tiny checkpoint in bfloat16: a run of its own, since hf
#             decodes at ~60 ms a step (one generate run, a shorter drift)
#   kernels   python -m bench.kernels over every shape (reference, fla, causal-conv1d)
#   small     a random-weight `small` checkpoint, a bfloat16 CUDA torch + compiled artifact, bench torch / eager /
#             compiled
#   hf-small  bench transformers (hf) beside eager on that `small` checkpoint (hf decodes it at ~85 ms a step)
#   ort-tiny  with onnxruntime-gpu: a float32 CUDA onnxruntime artifact of tiny, bench onnxruntime / eager / hf
#   ort-small with onnxruntime-gpu: a float16 CUDA onnxruntime artifact of small, bench onnxruntime / eager
#   tiny-autotune  tiny's compiled target again with --autotune (Inductor's Triton matmuls against cuBLAS), bench
#             compiled: compare its decode with the tiny stage's compiled row
#   tiny-pdl  the same with --pdl (programmatic dependent launch between the engine's kernels)
# A stage that would not finish inside BUDGET seconds (default 580) after the stages before it is skipped and named
# at the end, with the command that runs it (the first stage always runs: its export is kept for the next call).
# Logs, report.md / report.json and a chart or two per run go to $OUT (or $WORK/out); the Markdown tables are
# printed last. fla / causal-conv1d / onnxruntime-gpu are found on PYTHONPATH (the wheels README); .gpuwheels/*.whl,
# when present, are installed into /tmp/site first.
# A CPU smoke run of the script itself: DEVICE=cpu BENCH_ARGS="--drift-steps 8 ..." KERNEL_ARGS=--quick.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY_CKPT=${1:-}
STAGES=${STAGES:-"tiny hf-tiny kernels small hf-small ort-tiny ort-small tiny-pdl tiny-autotune"}
BUDGET=${BUDGET:-580}
WORK=${WORK:-/tmp/nd-bench}
DEVICE=${DEVICE:-cuda}
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"
read -r -a KERNEL_EXTRA <<< "${KERNEL_ARGS:-}"
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT/logs"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if ls .gpuwheels/*.whl >/dev/null 2>&1 && ! python3 -c "import fla" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuwheels/*.whl
fi
for dir in /tmp/site /tmp/ortg; do   # onnxruntime-gpu (/tmp/ortg) must come first to shadow the CPU build
    [ -d "$dir" ] && case ":${PYTHONPATH:-}:" in *":$dir:"*) ;; *) export PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}";; esac
done

python3 - <<'EOF' | tee "$OUT/logs/environment.txt"
import importlib, torch
print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA'}, torch {torch.__version__}")
for m in ("fla", "causal_conv1d", "transformers", "onnxruntime", "onnxscript", "matplotlib"):
    try:
        mod = importlib.import_module(m)
        extra = f" providers {mod.get_available_providers()}" if m == "onnxruntime" else ""
        print(f"  {m} {getattr(mod, '__version__', '?')}{extra}")
    except Exception as e:
        print(f"  {m}: not importable ({type(e).__name__})")
EOF
ORT_GPU=$(python3 -c "import onnxscript, onnxruntime as o; print(int('CUDAExecutionProvider' in o.get_available_providers()))" 2>/dev/null || echo 0)

skipped=()
ran=0
# Seconds seen on an H100 (tiny-autotune, tiny-pdl, hf-small: guessed; small: its export alone took 389 s from a cold
# compile cache, so a run under 10 minutes per call exports in one call and benches in the next, the artifact kept).
declare -A ESTIMATE=([tiny]=420 [hf-tiny]=300 [kernels]=150 [small]=900 [hf-small]=420 [ort-tiny]=350
                    [ort-small]=450 [tiny-autotune]=450 [tiny-pdl]=300)
reports=()

step() {  # step NAME LOG CMD...: run, log, print one line
    local name=$1 log=$2; shift 2
    local t0=$SECONDS
    if "$@" >"$OUT/logs/$log.log" 2>&1; then
        echo "  $name: ok ($((SECONDS - t0))s)"
    else
        echo "  $name: FAILED ($((SECONDS - t0))s); last lines of $OUT/logs/$log.log:"; tail -5 "$OUT/logs/$log.log" | sed 's/^/    /'
        return 1
    fi
}

keep() {  # keep NAME REPORT_DIR: copy the report and two charts into $OUT/NAME
    mkdir -p "$OUT/$1" && cp "$2"/report.md "$2"/report.json "$OUT/$1/" && \
        for png in decode.png speedup.png kernel-gated_delta_rule-decode.png kernel-gated_delta_rule-prefill.png; do
            [ -f "$2/$png" ] && cp "$2/$png" "$OUT/$1/"; done
    reports+=("$OUT/$1/report.md")
}

tiny_checkpoint() {
    [ -n "$TINY_CKPT" ] && [ -f "$TINY_CKPT/config.json" ] && return 0
    [ -n "$TINY_CKPT" ] && echo "  $TINY_CKPT holds no checkpoint; training one"
    TINY_CKPT=$WORK/runs/tiny
    [ -f "$TINY_CKPT/model.safetensors" ] && return 0
    local data; data=$(python3 -c "import asyncio, os; print(os.path.dirname(asyncio.__file__))")
    step "train tiny (200 steps on the stdlib's asyncio sources)" train \
        python3 -m train --out "$TINY_CKPT" --data "$data" --steps 200 --batch-size 16 --seq-len 256 \
        --eval-every 1000 --save-every 1000 --sample-tokens 0 --cache-dir "$WORK/cache" --no-compile
}

small_checkpoint() {
    [ -f "$WORK/runs/small/model.safetensors" ] && return 0
    tiny_checkpoint || return 1
    step "random-weight small checkpoint (bfloat16, tiny's tokenizer)" small-ckpt python3 - "$WORK/runs/small" "$TINY_CKPT" <<'EOF'
import shutil, sys, torch
from model import Qwen3NextForCausalLM, preset
torch.manual_seed(0)
Qwen3NextForCausalLM(preset("small")).to(torch.bfloat16).save_pretrained(sys.argv[1])
shutil.copy(f"{sys.argv[2]}/tokenizer.json", sys.argv[1])
EOF
}

export_art() {  # export_art NAME CKPT ARGS...
    local name=$1 ckpt=$2; shift 2
    [ -f "$WORK/art/$name/manifest.json" ] && return 0
    step "export $name" "export-$name" python3 -m export "$ckpt" --out "$WORK/art/$name" --device "$DEVICE" "$@"
}

bench_run() {  # bench_run NAME ARTIFACT ARGS...
    local name=$1 art=$2; shift 2
    step "bench $name" "bench-$name" python3 -m bench "$art" --out "$WORK/reports/$name" --device "$DEVICE" \
        --overwrite --profile-steps 20 --profile-prefill 2048 "$@" "${BENCH_EXTRA[@]}" && \
        keep "$name" "$WORK/reports/$name"
}

# The compiled target compiles one graph per decode bucket and prefill chunk: a few, to keep the run short (16 for
# the generate run's prompt, which no larger chunk covers).
SHAPES=(--decode-buckets 1 8 32 --prefill-chunks 16 128 2048)
read -r -a COMPILED <<< "${COMPILED_ARGS:---target torch compiled ${SHAPES[*]}}"
stage_tiny() {
    tiny_checkpoint && export_art tiny-bf16 "$TINY_CKPT" "${COMPILED[@]}" --dtype bfloat16 --max-batch 32 \
        --max-seq-len 4096 && bench_run tiny-bf16 "$WORK/art/tiny-bf16" --repeats 5 --drift-steps 1024 \
        --backends torch eager compiled
}
stage_hf-tiny() {
    tiny_checkpoint && bench_run hf-tiny "$TINY_CKPT" --dtype bfloat16 --backends eager hf --repeats 3 \
        --generate-repeats 1 --drift-steps 256
}
tiny_variant() {  # tiny_variant NAME EXPORT_FLAG: tiny's compiled target again with one export option
    local name=tiny-bf16-$1; shift
    tiny_checkpoint && export_art "$name" "$TINY_CKPT" --target compiled "${SHAPES[@]}" "$@" --dtype bfloat16 \
        --max-batch 32 --max-seq-len 4096 && bench_run "$name" "$WORK/art/$name" --repeats 5 --drift-steps 1024 \
        --backends compiled eager
}
stage_tiny-autotune() { tiny_variant autotune --autotune; }
stage_tiny-pdl() { tiny_variant pdl --pdl; }
stage_kernels() {
    step "bench.kernels" kernels python3 -m bench.kernels --out "$WORK/reports/kernels" --device "$DEVICE" --repeats 10 \
        --overwrite "${KERNEL_EXTRA[@]}" && keep kernels "$WORK/reports/kernels"
}
stage_small() {
    small_checkpoint && export_art small-bf16 "$WORK/runs/small" "${COMPILED[@]}" --dtype bfloat16 --max-batch 32 \
        --max-seq-len 8448 && bench_run small-bf16 "$WORK/art/small-bf16" --repeats 3 --drift-steps 512 \
        --backends torch eager compiled
}
stage_hf-small() {
    small_checkpoint && bench_run hf-small "$WORK/runs/small" --dtype bfloat16 --backends eager hf --repeats 3 \
        --generate-repeats 1 --drift-steps 128 --accuracy-steps 128
}
stage_ort-tiny() {
    tiny_checkpoint && export_art tiny-ort-fp32 "$TINY_CKPT" --target onnxruntime --dtype float32 --max-batch 32 \
        --max-seq-len 4096 && bench_run tiny-ort-fp32 "$WORK/art/tiny-ort-fp32" --repeats 5 --drift-steps 1024 \
        --backends onnxruntime eager hf
}
stage_ort-small() {
    small_checkpoint && export_art small-ort-fp16 "$WORK/runs/small" --target onnxruntime --dtype float16 \
        --max-batch 32 --max-seq-len 8448 && bench_run small-ort-fp16 "$WORK/art/small-ort-fp16" --repeats 3 \
        --drift-steps 256 --backends onnxruntime eager
}

echo "stages: $STAGES (budget ${BUDGET}s; logs in $OUT/logs)"
for s in $STAGES; do
    if [[ $s == ort-* && $ORT_GPU != 1 ]]; then
        skipped+=("$s (needs onnxruntime-gpu with CUDAExecutionProvider, and onnxscript)"); continue
    fi
    if [[ ($s == *-autotune || $s == *-pdl) && $DEVICE != cuda ]]; then
        skipped+=("$s (--${s#tiny-} compiles for CUDA only)"); continue
    fi
    # The first stage to run always starts (STAGES=small alone would otherwise never fit a 10-minute call).
    if (( ran && SECONDS + ${ESTIMATE[$s]:-120} > BUDGET )); then
        skipped+=("$s (about ${ESTIMATE[$s]:-120}s, ${SECONDS}s of ${BUDGET}s used)"); continue
    fi
    echo "[$s] at ${SECONDS}s"
    ran=1
    "stage_$s" || echo "  stage $s did not complete"
done

if ((${#skipped[@]})); then
    echo; echo "skipped: ${skipped[*]}"
    names=$(printf '%s\n' "${skipped[@]}" | awk '{print $1}' | tr '\n' ' ')
    echo "run them with: STAGES=\"${names% }\" bash bench/gpu_run.sh ${TINY_CKPT}"
fi
echo; echo "done in ${SECONDS}s; reports under $OUT"
for r in "${reports[@]}"; do   # the kernel tables first, so that the model tables end the output
    case $r in */kernels/*) echo; echo "==== $r (fla / causal-conv1d rows)"; grep -v '| reference |' "$r";; esac
done
for r in "${reports[@]}"; do
    case $r in */kernels/*) ;; *) echo; echo "==== $r"; sed '/^!\[/d' "$r";; esac
done
