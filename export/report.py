"""Parity and decode latency of an artifact against the eager model it was exported from.

    python -m export.report artifacts/tiny-cuda --device cuda --steps 256 --batch 1 8

Parity: prefill, then teacher-forced decode for --steps tokens (batch of 2), against one float32 forward of the
eager model. Latency: median milliseconds per decode step after warm-up, for each --batch, for the artifact
and for the eager backend (the source checkpoint with whatever kernels are installed) in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def decode_ms(engine, batch: int, prefill: int, warmup: int, steps: int) -> float:
    state = engine.new_state(batch)
    rng = np.random.default_rng(0)
    engine.prefill(rng.integers(0, engine.vocab_size, (batch, prefill)), state)
    times = []
    for i in range(warmup + steps):
        ids = rng.integers(0, engine.vocab_size, batch)
        t0 = time.perf_counter()
        engine.decode(ids, state)   # returns host logits, so the step has finished when it returns
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    import runtime
    from model import Qwen3NextForCausalLM
    from . import verify

    p = argparse.ArgumentParser(prog="python -m export.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "compiled"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=256, help="teacher-forced decode steps in the parity check")
    p.add_argument("--prefill", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to time decode at")
    p.add_argument("--timed-steps", type=int, default=100)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    engine = runtime.load(args.artifact, backend=args.backend, device=args.device)
    eager = runtime.load(args.artifact, backend="eager", device=args.device)
    model = Qwen3NextForCausalLM.from_pretrained(engine.manifest.source["path"])
    tokens = verify.fixed_tokens(engine.vocab_size, args.prefill + args.steps + 1)
    expected = verify.reference_logits(model, tokens)[:, args.prefill - 1:-1]
    report = {"artifact": args.artifact, "backend": args.backend, "device": args.device,
              "dtype": engine.manifest.dtype, "targets": engine.manifest.targets.get(args.backend, {}),
              "parity": verify.compare(verify.run_engine_teacher_forced(engine, tokens, args.prefill), expected),
              "decode_ms": {}}
    report["parity"]["decode_steps"] = args.steps
    for b in args.batch:
        ours = decode_ms(engine, b, args.prefill, 10, args.timed_steps)
        base = decode_ms(eager, b, args.prefill, 10, args.timed_steps)
        report["decode_ms"][b] = {"artifact": ours, "eager": base, "speedup": base / ours}
    par = report["parity"]
    print(f"{args.artifact} [{args.backend} {args.device} {report['dtype']}] over {args.steps} teacher-forced "
          f"steps: rel logit error {par['rel_error']:.2e}, max abs {par['max_abs_error']:.2e}, "
          f"top-1 agreement {par['top1_agreement']:.4f}")
    for b, d in report["decode_ms"].items():
        print(f"  decode batch {b}: {d['artifact']:.3f} ms/token vs eager {d['eager']:.3f} ms ({d['speedup']:.1f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
