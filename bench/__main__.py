"""Latency, throughput, memory and accuracy of every backend of an artifact (or a checkpoint), side by side.

    python -m bench artifacts/tiny --out reports/tiny
    python -m bench artifacts/small-cuda --out reports/small --device cuda --backends eager hf torch
    python -m bench runs/tiny --out reports/tiny-eager          # a checkpoint: the eager and hf backends only

Backends: every runtime backend the artifact holds (onnxruntime, torch, ...), `eager` (our model on the source
checkpoint: the baseline) and `hf` (transformers' Qwen3NextForCausalLM on the same checkpoint: the external
anchor). All are measured in one run, one after another, through the runtime Engine API: prefill at batch 1 for
each prompt length, decode ms/token at each batch, generate end to end, peak memory during decode, the bandwidth
a decode step achieves, and accuracy against the eager model (teacher-forced vs float32, long-run drift vs
float64); with --profile-steps, what a decode step is made of (kernels per step and their time, under
torch.profiler), and with --profile-prefill, a prefill of that many tokens. By default every backend is measured and
those that cannot run are listed with the reason; a backend named in --backends that cannot run is an error. Lengths
and batches beyond the target's capacity are clipped.

REPORT_DIR receives report.json (schema: bench/schema.py), report.md and PNG charts, written atomically; an
earlier report there is replaced, any other non-empty directory only with --overwrite. Stopped by Ctrl-C or SIGTERM
after a backend finished, it still writes the report of the backends measured, the others marked interrupted.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

from model import cli

from .profile import PREFILL_CALLS

DEFAULTS = dict(prompt_lengths=[128, 512, 2048, 8192], batches=[1, 8, 32], warmup=3, repeats=10, decode_context=128,
                decode_steps=32, generate_prompt=128, generate_tokens=256, generate_repeats=3, accuracy_steps=256,
                drift_steps=4096, profile_steps=0, profile_prefill=0)


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="artifact directory (python -m export) or HF-format checkpoint (python -m train)")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="directory to write the report into")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an earlier report")
    p.add_argument("--backends", nargs="+", metavar="NAME",
                   help="backends to measure (default: all; those that cannot run are listed with the reason)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="device to run on (default: the artifact's device; cpu for a checkpoint)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weights dtype for a checkpoint target (default: float32); an artifact has its own")
    p.add_argument("--checkpoint", help="the artifact's source checkpoint, for eager, hf and the accuracy reference "
                   "(default: the path in its manifest)")
    t = p.add_argument_group("timing")
    t.add_argument("--prompt-lengths", nargs="+", type=cli.integer(1), default=d["prompt_lengths"], metavar="N",
                   help=f"prefill prompt lengths at batch 1 (default: {' '.join(map(str, d['prompt_lengths']))})")
    t.add_argument("--batches", nargs="+", type=cli.integer(1), default=d["batches"], metavar="B",
                   help=f"decode batch sizes (default: {' '.join(map(str, d['batches']))})")
    t.add_argument("--warmup", type=cli.integer(0, 1000), default=d["warmup"],
                   help="untimed calls before each measurement (0: none; default: %(default)s)")
    t.add_argument("--repeats", type=cli.integer(1, 10000), default=d["repeats"],
                   help="timed prefill calls per prompt length (default: %(default)s)")
    t.add_argument("--decode-context", type=cli.integer(1), default=d["decode_context"],
                   help="prompt tokens before the decode steps (default: %(default)s)")
    t.add_argument("--decode-steps", type=cli.integer(1, 100000), default=d["decode_steps"],
                   help="timed decode steps per batch size (default: %(default)s)")
    t.add_argument("--generate-prompt", type=cli.integer(1), default=d["generate_prompt"],
                   help="prompt tokens of the end-to-end generate run (default: %(default)s)")
    t.add_argument("--generate-tokens", type=cli.integer(0), default=d["generate_tokens"],
                   help="tokens the generate run samples; 0 skips it (default: %(default)s)")
    t.add_argument("--generate-repeats", type=cli.integer(1, 1000), default=d["generate_repeats"],
                   help="timed generate runs (default: %(default)s)")
    a = p.add_argument_group("accuracy")
    a.add_argument("--accuracy-steps", type=cli.integer(0), default=d["accuracy_steps"],
                   help="teacher-forced decode steps compared with the float32 eager model; 0 skips (default: "
                   "%(default)s)")
    a.add_argument("--drift-steps", type=cli.integer(0), default=d["drift_steps"],
                   help="decode steps of the drift run compared with the float64 eager model; 0 skips (default: "
                   "%(default)s)")
    r = p.add_argument_group("profile")
    r.add_argument("--profile-steps", type=cli.integer(0, 10000), default=d["profile_steps"],
                   help="decode steps at batch 1 to run under torch.profiler: kernels per step, the GPU time they "
                   "take and the longest of them (on the CPU: torch operators, for eager, hf and torch); 0 skips "
                   "(default: %(default)s)")
    r.add_argument("--profile-prefill", type=cli.integer(0), default=d["profile_prefill"], metavar="TOKENS",
                   help=f"prompt length of {PREFILL_CALLS} prefills at batch 1 (each into a fresh state) to run under "
                   "torch.profiler, as for --profile-steps; 0 skips (default: %(default)s)")
    return p


def plan(args, target) -> tuple[dict, list[str]]:
    """Settings clipped to the target's capacity, and notes on what was clipped or skipped."""
    from .accuracy import PREFILL
    from .measure import clip
    cap, notes = target.manifest, []
    s = {k: getattr(args, k) for k in DEFAULTS}
    for key, limit, what in (("prompt_lengths", cap.max_seq_len, "tokens"), ("batches", cap.max_batch, "rows")):
        clipped = clip(s[key], limit)
        if clipped != sorted(set(s[key])):
            notes.append(f"{key.replace('_', ' ')} {s[key]} clipped to {clipped} (the target holds {limit} {what})")
        s[key] = clipped
    for key, room, taken in (("accuracy_steps", cap.max_seq_len - PREFILL - 1, f"{PREFILL} of them prompt"),
                             ("drift_steps", cap.max_seq_len - PREFILL, f"{PREFILL} of them prompt"),
                             ("profile_steps", cap.max_seq_len - s["warmup"] - 1,
                              f"{s['warmup'] + 1} of them prompt and warm-up")):
        if s[key] > max(room, 0):
            notes.append(f"{key.replace('_', ' ')} {s[key]} clipped to {max(room, 0)} (capacity {cap.max_seq_len} "
                         f"tokens, {taken})")
            s[key] = max(room, 0)
    if s["profile_prefill"] > cap.max_seq_len:
        notes.append(f"profile prefill {s['profile_prefill']} clipped to {cap.max_seq_len} (the target holds "
                     f"{cap.max_seq_len} tokens)")
        s["profile_prefill"] = cap.max_seq_len
    if target.checkpoint is None and (s["accuracy_steps"] or s["drift_steps"]):
        notes.append(f"accuracy not measured: {target.checkpoint_problem}")
        s["accuracy_steps"] = s["drift_steps"] = 0
    return s, notes


def checkpoint_capacity(args) -> int:
    """Tokens a checkpoint target's states must hold for every requested measurement."""
    from .accuracy import PREFILL
    return max(*args.prompt_lengths, args.decode_context + args.warmup + args.decode_steps,
               args.generate_prompt + args.generate_tokens, PREFILL + args.accuracy_steps + 1,
               PREFILL + args.drift_steps, args.warmup + args.profile_steps + 1, args.profile_prefill)


def measure_backend(name, target, device, s, ref, copy_bw, config, dtype_bytes) -> dict:
    from . import measure, profile
    from .backends import Unavailable, open_engine
    from .run import failure
    from .timing import MemoryProbe
    entry = dict(status="ok", reason=None, load_s=None, prefill=[], decode=[], generate=None,
                 memory={"peak_bytes": None, "method": "not measured"}, accuracy=None, drift=None, profile=None,
                 prefill_profile=None, speedup={})
    probe = MemoryProbe(device)
    t0 = time.perf_counter()
    engine = None
    try:
        engine = open_engine(name, target, device)
        entry["load_s"] = time.perf_counter() - t0
        settings = measure.Settings(**s)
        entry["prefill"] = measure.prefill(engine, settings, device)
        entry["decode"] = measure.decode(engine, settings, device, probe, config, dtype_bytes, copy_bw)
        entry["memory"] = probe.result()
        if s["generate_tokens"]:
            entry["generate"] = measure.generate(engine, settings, device)
        if ref is not None and s["accuracy_steps"]:
            entry["accuracy"] = ref.teacher_forced(engine)
        if ref is not None and s["drift_steps"]:
            entry["drift"] = ref.drift(engine)
        if s["profile_steps"]:
            entry["profile"] = profile.decode_profile_or_reason(name, engine, device, s["profile_steps"],
                                                                s["warmup"])
        if s["profile_prefill"]:
            entry["prefill_profile"] = profile.prefill_profile_or_reason(name, engine, device, s["profile_prefill"])
    except Unavailable as e:
        return {**entry, "status": "unavailable", "reason": str(e)}
    except Exception as e:  # one backend's failure is recorded; the others are still measured
        return {**entry, "status": "failed", "reason": failure(e)}
    finally:
        del engine
        gc.collect()
    return entry


def speedups(backends: dict, baselines: list[str]) -> None:
    def medians(b):
        return {"prefill": {str(r["prompt_length"]): r["median_ms"] for r in b["prefill"]},
                "decode": {str(r["batch"]): r["median_ms"] for r in b["decode"]},
                "generate": b["generate"]["median_ms"] if b["generate"] else None}
    for name, b in backends.items():
        if b["status"] != "ok":
            continue
        mine = medians(b)
        for base in baselines:
            if base == name or backends.get(base, {}).get("status") != "ok":
                continue
            theirs = medians(backends[base])
            b["speedup"][f"vs_{base}"] = {
                kind: {k: theirs[kind][k] / v for k, v in mine[kind].items() if k in theirs[kind]}
                for kind in ("prefill", "decode")}
            if mine["generate"] and theirs["generate"]:
                b["speedup"][f"vs_{base}"]["generate"] = theirs["generate"] / mine["generate"]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from model import Qwen3NextConfig
    from model.io import check_output_dir
    from runtime.manifest import is_artifact

    from . import measure, plots, report, schema
    from .accuracy import Reference
    from .backends import BenchError, describe, known_backends, open_target, why_unavailable
    from model.device import torch_device

    from .run import STOPS, header, pick, publish

    names = pick(args.backends, known_backends(), "backend", " (onnxruntime needs pip install onnxruntime or "
                 "onnxruntime-gpu, hf needs pip install transformers, and further backends come with newer versions "
                 "of the runtime package)")
    device = args.device
    if device is None:
        device = "cpu"
        if is_artifact(Path(args.target)):
            from runtime.manifest import Manifest
            device = Manifest.load(args.target).device
    torch_device(device)
    target = open_target(args.target, device, args.dtype, args.checkpoint, max(args.batches),
                         checkpoint_capacity(args))
    out = check_output_dir(args.out, what="bench report", ours=schema.is_report, overwrite=args.overwrite,
                           sources=[target.path, *([target.checkpoint] if target.checkpoint else [])])
    if args.backends is not None:   # named ones must run
        for name in names:
            reason = why_unavailable(name, target)
            if reason:
                raise BenchError(f"backend {name} cannot run: {reason}")
    s, notes = plan(args, target)
    config = Qwen3NextConfig.from_dict(target.manifest.model_config)
    dtype_bytes = torch.empty(0, dtype=getattr(torch, target.manifest.dtype)).element_size()
    print(f"bench: {target.path} ({target.kind}, {target.manifest.dtype}) on {device}; backends: {', '.join(names)}",
          file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    rep = {**header("backends", "bench", argv, device), "settings": {**s, "device": device, "notes": notes},
           "target": describe(target),
           "capacity_bytes": measure.capacity_bytes(config, dtype_bytes, target.manifest.max_batch,
                                                    target.manifest.max_seq_len),
           "baselines": ["eager", "hf"], "backends": {}}
    ref = None
    if s["accuracy_steps"] or s["drift_steps"]:
        print("computing the float32 and float64 references ...", file=sys.stderr)
        ref = Reference(target.checkpoint, config.vocab_size, min(2, target.manifest.max_batch),
                        s["accuracy_steps"], s["drift_steps"], device, target.manifest.dtype)
    stop = None
    try:
        with tqdm(names, desc="backends", unit="backend", disable=None) as bar:
            for name in bar:
                bar.set_postfix_str(name)
                t0 = time.perf_counter()
                entry = measure_backend(name, target, device, s, ref, rep["copy_bandwidth"]["gb_per_s"], config,
                                        dtype_bytes)
                rep["backends"][name] = entry
                tqdm.write(f"{name}: {entry['status']}{': ' + entry['reason'] if entry['reason'] else ''} "
                           f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    except STOPS as e:
        # The backends measured so far are kept: a report of them, the rest listed as interrupted, then the
        # usual exit code for the signal.
        if not rep["backends"]:
            raise
        stop = e
        rest = [n for n in names if n not in rep["backends"]]
        for name in rest:
            rep["backends"][name] = interrupted(stop, rest, args)
    speedups(rep["backends"], rep["baselines"])
    publish(out, rep, report.backends_markdown, plots.backend_plots)
    if stop is not None:
        raise stop
    return 1 if any(b["status"] == "failed" for b in rep["backends"].values()) else 0


def interrupted(stop: BaseException, rest: list[str], args) -> dict:
    """The report entry of a backend that the run did not finish, naming the command that measures the rest."""
    from .run import stopped_by
    again = ["python", "-m", "bench", args.target, "--out", "NEW_REPORT_DIR", "--backends", *rest]
    if args.device:
        again += ["--device", args.device]
    return dict(status="interrupted", reason=f"the run was stopped ({stopped_by(stop)}) before this backend "
                f"finished; measure the rest with `{' '.join(again)}`", load_s=None, prefill=[], decode=[],
                generate=None, memory={"peak_bytes": None, "method": "not measured"}, accuracy=None, drift=None,
                profile=None, prefill_profile=None, speedup={})


if __name__ == "__main__":
    cli.run(main)
