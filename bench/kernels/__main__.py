"""Time every implementation of the model's kernels over shapes from tiny to Qwen3-Next's, and check each
against a float64 token-by-token loop.

    python -m bench.kernels --out reports/kernels --device cuda
    python -m bench.kernels --out reports/kernels-cpu --quick          # CPU-sized shapes, for a smoke run

Kernels: the gated delta rule (prefill: long sequences, decode: one token at batch 1..64) and causal conv1d
(prefill, and the one-token state update), plus any registered in bench/kernels/__init__.py. Implementations:
`reference` (model/kernels, plain PyTorch), `fla` and `causal-conv1d` (CUDA, when installed), and any registered;
one that cannot run here is listed with the reason. Per shape: min / median / max ms (on CUDA each call's device
time inside CUDA graph replays, as an engine's graphs run them; see --timing), GB/s moved, TFLOP/s (the
recurrence's work) for the gated delta rule, relative error of output and state, and speedup over the reference.
REPORT_DIR receives report.json (schema: bench/schema.py), report.md and one chart per kernel and mode; stopped by
Ctrl-C or SIGTERM after a shape was measured, the run still writes the report of what it measured, saying so.
"""

from __future__ import annotations

import argparse

from model import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="directory to write the report into")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an earlier report")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="q/k/v/x dtype (default: bfloat16 on cuda, float32 on cpu); states are float32")
    p.add_argument("--kernels", nargs="+", metavar="NAME", help="kernels to run (default: all registered)")
    p.add_argument("--impls", nargs="+", metavar="NAME", help="implementations to run (default: all registered; "
                   "those that cannot run here are listed with the reason)")
    p.add_argument("--quick", action="store_true", help="two small shapes per kernel, sized for a CPU")
    p.add_argument("--warmup", type=cli.integer(0, 1000), default=3,
                   help="untimed calls per shape before the timed ones, with --timing calls (0: none; default: "
                   "%(default)s)")
    p.add_argument("--repeats", type=cli.integer(1, 10000), default=20,
                   help="timed calls per shape, with --timing calls; graph timing takes 10 replays (default: "
                   "%(default)s)")
    p.add_argument("--timing", choices=["graph", "calls"],
                   help="graph: each call's device time from CUDA graph replays of several calls back to back, "
                   "as a decode step's graph runs the kernels (no host launch in the figure; an implementation "
                   "that cannot be captured is timed per call, and its row says so); calls: each call between "
                   "CUDA events, the host's launch included, as an eager model runs them (default: graph on cuda, "
                   "calls on cpu)")
    p.add_argument("--seed", type=cli.integer(0), default=0,
                   help="seed of the random inputs, >= 0 (default: %(default)s)")
    return p


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def measure(kernel, impl, shape, dtype, device, args) -> dict:
    import torch
    from bench.kernels import label
    from bench.run import failure
    from bench.timing import time_calls, time_in_graph
    gen = torch.Generator(device=device).manual_seed(args.seed)
    inputs = kernel.make_inputs(shape, dtype, device, gen)
    row = {"kernel": kernel.name, "mode": kernel.mode, "shape": shape, "label": label(shape), "impl": impl.name,
           "status": "ok", "reason": None, "timing": args.timing}
    try:
        with torch.no_grad():
            # The exact answer first: an in-place kernel changes its inputs.
            want_out, want_state = kernel.loop64(*[x.double() if x.is_floating_point() else x.clone()
                                                   for x in inputs])
            out, state = impl.run(*inputs)
            row.update(rel_error=rel(out, want_out),
                       state_rel_error=None if want_state is None else rel(state, want_state))
            del out, state, want_out, want_state
            stats = None
            if args.timing == "graph":
                try:
                    stats = time_in_graph(lambda: impl.run(*inputs))
                except Exception as e:
                    row["timing"] = f"calls (no CUDA graph: {failure(e)})"
                    torch.cuda.synchronize()
            if stats is None:
                stats = time_calls(lambda _: impl.run(*inputs), device, args.warmup, args.repeats, cuda_events=True)
    except Exception as e:  # a shape an implementation refuses (or runs out of memory on) is recorded, not fatal
        return {**row, "status": "failed", "reason": failure(e), "median_ms": None,
                "gb_per_s": None, "tflop_per_s": None, "rel_error": None, "speedup_vs_reference": None}
    seconds = stats["median_ms"] * 1e-3
    moved = kernel.bytes(shape, inputs[0].element_size())
    flops = kernel.flops(shape) if kernel.flops else None
    return {**row, **stats, "bytes": moved, "flops": flops, "gb_per_s": moved / seconds / 1e9,
            "tflop_per_s": flops / seconds / 1e12 if flops else None, "speedup_vs_reference": None}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from tqdm import tqdm

    from bench import plots, report, schema
    from bench.backends import BenchError
    from bench.kernels import IMPLS, KERNELS
    from bench.run import STOPS, header, pick, publish, stopped_by
    from model.device import torch_device
    from model.io import check_output_dir

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_device(device)
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    if args.timing == "graph" and device != "cuda":
        raise BenchError("--timing graph replays CUDA graphs; use --device cuda, or --timing calls")
    args.timing = args.timing or ("graph" if device == "cuda" else "calls")
    kernel_names = pick(args.kernels, list(dict.fromkeys(k.name for k in KERNELS)), "kernel")
    impl_names = pick(args.impls, list(dict.fromkeys(i.name for i in IMPLS)), "implementation")
    impls = [i for i in IMPLS if i.name in impl_names and i.kernel in kernel_names]
    if args.impls:
        for impl in impls:
            reason = impl.needs(device)
            if reason:
                raise BenchError(f"implementation {impl.name} of {impl.kernel} cannot run: {reason}")
    out = check_output_dir(args.out, what="bench report", ours=schema.is_report, overwrite=args.overwrite)

    results = []
    kernels = [k for k in KERNELS if k.name in kernel_names]
    tasks = [(k, i, s) for k in kernels for s in (k.quick if args.quick else k.shapes)
             for i in impls if i.kernel == k.name]
    for kernel in kernels:
        for impl in (i for i in impls if i.kernel == kernel.name):
            reason = impl.needs(device)
            if reason:
                results.append({"kernel": kernel.name, "mode": kernel.mode, "shape": {}, "label": "all shapes",
                                "impl": impl.name, "status": "unavailable", "reason": reason, "timing": None,
                                "median_ms": None, "gb_per_s": None, "tflop_per_s": None, "rel_error": None,
                                "speedup_vs_reference": None})
    def publish_results(notes: list[str]) -> None:
        reference = {(r["kernel"], r["mode"], r["label"]): r for r in results
                     if r["impl"] == "reference" and r["status"] == "ok"}
        for r in results:
            base = reference.get((r["kernel"], r["mode"], r["label"]))
            if base and r["status"] == "ok":
                r["speedup_vs_reference"] = base["median_ms"] / r["median_ms"]
        rep = {**header("kernels", "bench.kernels", argv, device),
               "settings": {"device": device, "quick": args.quick, "timing": args.timing, "warmup": args.warmup,
                            "repeats": args.repeats, "seed": args.seed, "kernels": kernel_names,
                            "impls": impl_names, "notes": notes},
               "dtype": dtype_name, "results": results}
        publish(out, rep, report.kernels_markdown, plots.kernel_plots)

    measured = 0
    try:
        for kernel, impl, shape in tqdm(tasks, desc="kernels", unit="shape", disable=None):
            if impl.needs(device):
                continue
            results.append(measure(kernel, impl, shape, dtype, device, args))
            measured += 1
            if device == "cuda":
                torch.cuda.empty_cache()
    except STOPS as stop:
        # What was measured is kept: a report of it, saying where the run stopped; then the signal's exit code.
        if measured:
            runnable = sum(1 for _, impl, _ in tasks if not impl.needs(device))
            publish_results([f"the run was stopped ({stopped_by(stop)}) after {measured} of {runnable} shapes; the "
                             "rest were not measured (--kernels and --impls pick fewer)"])
        raise
    publish_results([])
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    cli.run(main)
