#!/usr/bin/env bash
# Which ONNX opsets export, pass onnx's checker and match the eager model on this machine's torch / onnx /
# ONNX Runtime (export.build.OPSETS was found with torch 2.13, onnx 1.23, ONNX Runtime 1.32 on CPU).
# Tries 17..27 with a tiny random checkpoint, on CUDA when ONNX Runtime has its CUDA provider, else on CPU.
#   bash bench/gpu_check_opsets.sh            # details (each export's stderr) under $OUT when it is set
set -euo pipefail
cd "$(dirname "$0")/.."
python3 - <<'EOF'
import contextlib, io, json, os, sys, tempfile
from pathlib import Path

import onnx, onnxruntime, torch

import export.build as build
from export.__main__ import main as export_main
from model import Qwen3NextConfig, Qwen3NextForCausalLM

out = Path(os.environ.get("OUT") or tempfile.mkdtemp())
ckpt = out / "ckpt"
torch.manual_seed(0)
Qwen3NextForCausalLM(Qwen3NextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                     linear_value_head_dim=8, max_position_embeddings=64)).save_pretrained(ckpt)
cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
accepted = build.OPSETS
build.OPSETS = tuple(range(17, 28))   # try beyond what the CLI accepts
rows = []
for opset in build.OPSETS:
    art, err = out / f"opset-{opset}", io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = export_main([str(ckpt), "--out", str(art), "--target", "onnxruntime", "--device", device,
                                "--opset", str(opset), "--max-seq-len", "24", "--verify-tokens", "6", "--overwrite"])
        except Exception as e:  # noqa: BLE001  (a probe: any failure means the opset does not work)
            print(repr(e), file=err)
            code = 1
    (out / f"opset-{opset}.stderr.txt").write_text(err.getvalue())
    written = manifest = "-"
    if code == 0:
        written = {o.domain: o.version for o in onnx.load(str(art / "model.onnx")).opset_import}[""]
        manifest = json.loads((art / "manifest.json").read_text())["targets"]["onnxruntime"]["opset"]
    rows.append((opset, "works" if code == 0 else "fails", written, manifest, opset in accepted))
print(f"\ntorch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, device {device}")
print(f"{'opset':>5}  {'result':6}  {'file':>4}  {'manifest':>8}  accepted by --opset")
for opset, result, written, manifest, ok in rows:
    print(f"{opset:>5}  {result:6}  {written!s:>4}  {manifest!s:>8}  {'yes' if ok else 'no'}")
works = tuple(o for o, r, *_ in rows if r == "works")
print("export.build.OPSETS matches this machine" if works == accepted else
      f"MISMATCH: works here {works}, OPSETS {accepted}")
EOF
