"""Build deployable artifacts from an HF-format Qwen3-Next checkpoint.

    python -m export runs/tiny --out artifacts/tiny
    python -m export runs/tiny --out artifacts/tiny-cuda --device cuda --dtype float16 --target onnxruntime

ARTIFACT_DIR then holds manifest.json, the targets' files (torch: prefill.pt2 + decode.pt2 with the kernels as
nextdeploy:: custom ops; onnxruntime: model.onnx with ONNX Runtime's contrib kernels; compiled: compiled/, the step
compiled by Inductor for each decode batch bucket and prefill chunk length; tensorrt: tensorrt/, ONNX graphs with
the nextdeploy TensorRT plugins, and engines where TensorRT and a GPU are present) and tokenizer.json. Export
checks itself against the eager model (prefill, then teacher-forced decode) and records the figures in the
manifest; it fails, writing nothing, when they exceed the tolerance for the dtype.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from model import cli

TARGETS = ("torch", "onnxruntime", "compiled", "tensorrt")


def build_parser() -> argparse.ArgumentParser:
    from model.fusion import FUSED_LINEAR_MAX_ROWS
    from .build import DEFAULT_OPSET, OPSETS
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="HF-format directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, help="artifact directory to create; an earlier artifact there is replaced "
                   "whole, any other non-empty directory only with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an earlier artifact")
    p.add_argument("--target", nargs="+", choices=TARGETS, default=["torch", "onnxruntime"],
                   help="what to build (default: torch onnxruntime; compiled takes minutes: one compile per shape)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="device the artifact runs on (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="weights and activations; recurrent state is always float32 (default: %(default)s)")
    p.add_argument("--max-batch", type=cli.integer(1), default=8,
                   help="largest batch the artifact accepts (default: %(default)s)")
    p.add_argument("--max-seq-len", type=cli.integer(3), help="tokens per row the state holds, prompt plus "
                   "generation (default: 2048, or the model's max_position_embeddings if smaller)")
    p.add_argument("--opset", type=int, choices=OPSETS, default=DEFAULT_OPSET, metavar=f"{OPSETS[0]}..{OPSETS[-1]}",
                   help="ONNX opset of model.onnx (default: %(default)s)")
    p.add_argument("--onnx-gated-delta-op", choices=["LinearAttention", "GatedDeltaNet"],
                   help="ONNX Runtime node for the gated delta rule (default: LinearAttention, which runs on CPU "
                   "and CUDA; GatedDeltaNet fuses the q/k norm but runs on CUDA only)")
    p.add_argument("--decode-buckets", nargs="+", type=cli.integer(1, 1 << 16), metavar="B",
                   help="compiled and tensorrt targets: batch sizes decode is built for; "
                   "a batch runs in the smallest that holds "
                   "it (default: 1 2 4 ... below --max-batch, and --max-batch; 1 and --max-batch are always added)")
    p.add_argument("--prefill-chunks", nargs="+", type=cli.integer(2, 1 << 24), metavar="T",
                   help="compiled target: prompt lengths prefill is compiled for; a prompt runs as chunks, largest "
                   "first, then token by token (default: 2 4 8 ... 512, up to --max-seq-len)")
    p.add_argument("--autotune", action="store_true",
                   help="compiled target on CUDA: let Inductor time its own Triton matrix-product kernels against "
                   "cuBLAS for every product and keep the faster, fusing neighbouring work into them where it can "
                   "(max-autotune; compiling takes several times longer)")
    p.add_argument("--pdl", action="store_true",
                   help="compiled target on CUDA (compute capability 9.0 on): launch Inductor's kernels and the "
                   "project's with programmatic dependent launch, so each starts while the one before it finishes")
    p.add_argument("--fused-linear-rows", type=cli.integer(0, 1 << 16), metavar="N",
                   help="compiled target on CUDA: decode products of at most N rows run the project's fused linear "
                   "kernel, which also does the norm before and the residual add after them (fewer launches per "
                   f"step); larger ones run cuBLAS. 0: cuBLAS always (default: {FUSED_LINEAR_MAX_ROWS})")
    p.add_argument("--verify-tokens", type=cli.integer(2), default=48,
                   help="tokens per row in the parity check, below --max-seq-len (default: %(default)s)")
    return p


class Stages:
    """One line per stage, with its time: export is minutes of silence otherwise."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def __call__(self, what: str):
        self.n += 1
        print(f"[{self.n}/{self.total}] {what} ...", end="", flush=True)
        self.t0 = time.perf_counter()
        return self

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        print(f" {'failed' if exc_type else 'done'} ({time.perf_counter() - self.t0:.1f}s)", flush=True)


def validate(args, config):
    from .errors import ExportError
    from runtime.compiled_backend import (default_decode_buckets, default_prefill_chunks, missing_toolchain,
                                          pdl_support)
    if args.max_seq_len > config.max_position_embeddings:
        raise ExportError(f"--max-seq-len must be at most {config.max_position_embeddings} (the model's "
                          f"max_position_embeddings), got {args.max_seq_len}")
    if args.verify_tokens + 1 > args.max_seq_len:
        raise ExportError(f"--verify-tokens ({args.verify_tokens}) must be below --max-seq-len ({args.max_seq_len})")
    if "onnxruntime" in args.target:
        if args.device == "cpu" and args.dtype != "float32":
            raise ExportError("ONNX Runtime's CPU kernels for this model run float32 only; use --dtype float32 "
                              "with --device cpu, or --device cuda for float16")
        if args.onnx_gated_delta_op == "GatedDeltaNet" and args.device == "cpu":
            raise ExportError("GatedDeltaNet has only a CUDA kernel in ONNX Runtime; use --device cuda or "
                              "--onnx-gated-delta-op LinearAttention")
        if args.dtype == "bfloat16":
            raise ExportError("the onnxruntime target takes --dtype float32 or float16 (state is fed as NumPy, "
                              "which has no bfloat16); use the torch target for bfloat16")
        for module, package in (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime")):
            try:
                __import__(module)
            except ImportError as e:
                raise ExportError(f"--target onnxruntime needs {package}: pip install 'next-deploy[onnx]'") from e
    from model.device import torch_device
    torch_device(args.device)
    if "compiled" in args.target or "tensorrt" in args.target:
        if any(b > args.max_batch for b in args.decode_buckets or []):
            raise ExportError(f"--decode-buckets {max(args.decode_buckets)} exceeds --max-batch {args.max_batch}; "
                              "give buckets up to --max-batch")
        buckets = args.decode_buckets or default_decode_buckets(args.max_batch)
        args.decode_buckets = sorted({1, args.max_batch, *buckets})
    if "tensorrt" in args.target:
        from .tensorrt import check_options
        check_options(args, config)
    # Inductor options of the compiled target on CUDA.
    for flag, given, why in (("--autotune", args.autotune, " (on the CPU, Inductor's templates fold the weights "
                              "into code that the artifact keeps apart from them)"), ("--pdl", args.pdl, "")):
        if given and ("compiled" not in args.target or args.device != "cuda"):
            raise ExportError(f"{flag} applies to the compiled target on CUDA{why}; use --target compiled --device "
                              f"cuda, or drop {flag}")
    if args.fused_linear_rows is not None and "compiled" not in args.target:
        raise ExportError("--fused-linear-rows applies to the compiled target; use --target compiled, or drop it")
    if args.fused_linear_rows is None:
        from model.fusion import FUSED_LINEAR_MAX_ROWS
        args.fused_linear_rows = FUSED_LINEAR_MAX_ROWS
    problem = args.pdl and pdl_support(args.device)
    if problem:
        raise ExportError(f"--pdl cannot be used here: {problem}; drop --pdl")
    if "compiled" in args.target:
        if any(c > args.max_seq_len for c in args.prefill_chunks or []):
            raise ExportError(f"--prefill-chunks {max(args.prefill_chunks)} exceeds --max-seq-len "
                              f"{args.max_seq_len}; give chunks up to --max-seq-len")
        args.prefill_chunks = sorted(set(args.prefill_chunks or default_prefill_chunks(args.max_seq_len)))
        problem = missing_toolchain(args.device)
        if problem:
            raise ExportError(f"--target compiled cannot compile for {args.device} here: {problem}")


def check_tokenizer(checkpoint: Path, vocab_size: int) -> bool:
    """Refuse a tokenizer with ids the model has no logits for; warn (and return False) when there is none."""
    from model.tokenizer import TOKENIZER_FILE, Tokenizer
    if not (checkpoint / TOKENIZER_FILE).is_file():
        print(f"warning: {checkpoint} has no {TOKENIZER_FILE}; the artifact will take token ids only "
              "(engine.generate and python -m runtime need a tokenizer)", file=sys.stderr)
        return False
    Tokenizer.load(checkpoint).check_fits(vocab_size)
    return True


def export(args) -> Path:
    import torch
    import runtime
    from model import Qwen3NextForCausalLM
    from model.io import atomic_directory
    from runtime.manifest import MANIFEST, Manifest, checkpoint_hash
    from . import build, compiled, tensorrt, verify
    from .onnx_lowering import DEFAULT_OP
    from .graph import example_batch, tensor_specs
    from model import Qwen3NextConfig
    from model.checkpoint import checkpoint_directory

    from model.io import check_output_dir
    from runtime.manifest import is_artifact

    config = Qwen3NextConfig.load(checkpoint_directory(args.checkpoint))
    out = check_output_dir(args.out, what="artifact", ours=is_artifact, overwrite=args.overwrite,
                           sources=[args.checkpoint])
    if args.max_seq_len is None:
        args.max_seq_len = min(2048, config.max_position_embeddings)
    validate(args, config)
    checkpoint = Path(args.checkpoint).resolve()
    has_tokenizer = check_tokenizer(checkpoint, config.vocab_size)
    # The compiled target shows one line per graph it compiles.
    graphs = len(args.decode_buckets) + len(args.prefill_chunks) if "compiled" in args.target else 0
    stage = Stages(2 + sum(tensorrt.stages(args) if t == "tensorrt" else 2 for t in args.target) + graphs)
    with stage("loading the checkpoint"):
        model = Qwen3NextForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype),
                                                     device=args.device)
    inputs, outputs, state = tensor_specs(model, args.max_seq_len, "sequence")
    manifest = Manifest(model_config=model.config.to_dict(), dtype=args.dtype, device=args.device,
                        max_batch=args.max_batch, max_seq_len=args.max_seq_len, targets={}, inputs=inputs,
                        outputs=outputs, state=state, source={"path": str(checkpoint),
                                                              "sha256": checkpoint_hash(checkpoint)},
                        tokenizer="tokenizer.json" if has_tokenizer else None)
    with atomic_directory(out) as tmp:
        if manifest.tokenizer:
            shutil.copy(checkpoint / "tokenizer.json", tmp / "tokenizer.json")
        for target in args.target:
            if target == "compiled":
                manifest.targets[target] = compiled.build(
                    model, tmp, args.device, args.max_seq_len, args.decode_buckets, args.prefill_chunks,
                    manifest.state, stage, args.autotune, args.pdl, args.fused_linear_rows)
                continue
            if target == "tensorrt":
                manifest.targets[target] = tensorrt.build(model, args, tmp, stage)
                continue
            with stage(f"building the {target} target"):
                if target == "torch":
                    manifest.targets[target] = build.export_torch(model, tmp, args.max_batch, args.max_seq_len)
                else:
                    op = args.onnx_gated_delta_op or DEFAULT_OP[args.device]
                    # ONNX graphs are device-independent, and torch.onnx.ops.symbolic traces its outputs on
                    # the CPU, so the graph is always traced from a CPU copy of the model.
                    cpu_model = model if args.device == "cpu" else Qwen3NextForCausalLM.from_pretrained(
                        args.checkpoint, dtype=getattr(torch, args.dtype))
                    manifest.targets[target] = build.export_onnx(cpu_model, tmp, op, args.max_batch,
                                                                 args.max_seq_len, args.opset)
        (tmp / MANIFEST).write_text(manifest.to_json())
        tokens = verify.fixed_tokens(model.config.vocab_size, args.verify_tokens + 1)[:example_batch(args.max_batch)]
        with stage("computing eager reference logits"):
            reference = verify.reference_logits(model, tokens)
            eager_error = verify.dtype_error(model, tokens, reference)
            expected = reference[:, args.verify_tokens // 2 - 1:-1]
        for target in args.target:
            runs = tensorrt.verification_runs(tmp, manifest) if target == "tensorrt" else \
                [(target, lambda: runtime.load(tmp, backend=target, device=args.device))]
            for name, open_engine in runs:
                with stage(f"verifying the {name} target against the eager model"):
                    figures = verify.parity(open_engine(), tokens, expected, args.verify_tokens // 2)
                    if eager_error is not None:
                        figures["eager_rel_error"] = eager_error
                    manifest.parity[name] = figures
                    verify.check(figures, args.dtype, name, eager_error)
        (tmp / MANIFEST).write_text(manifest.to_json())
    for target, f in manifest.parity.items():
        print(f"{target}: relative logit error {f['rel_error']:.2e}, max abs {f['max_abs_error']:.2e}, "
              f"top-1 agreement {f['top1_agreement']:.3f}")
    if "tensorrt" in manifest.targets:
        tensorrt.report(out, manifest)
    if "compiled" in manifest.targets:
        c = manifest.targets["compiled"]
        print(f"compiled: {len(c['decode_buckets']) + len(c['prefill_chunks'])} graphs ({' + '.join(c['forms'])}) "
              f"compiled in {c['compile_seconds']:.0f}s")
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from model.errors import NextDeployError
    try:
        out = export(args)
    except NextDeployError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    print(f"artifact written to {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
