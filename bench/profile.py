"""What a decode step is made of, and a prefill: `python -m bench --profile-steps N` runs N decode steps at batch 1
under torch.profiler, `--profile-prefill L` a few prefills of L tokens into fresh batch-1 states.

On CUDA the profiler sees every kernel the process launches (CUPTI), whichever library launched it, CUDA graph
replays included: kernels per step and the device time they take, set against the step's unprofiled time, say
whether a backend is bound by launches and the host or by the GPU's work. On the CPU it sees torch's operators
only (not the C++ kernels Inductor generates, nor ONNX Runtime's), so there it counts the top-level torch operators
of the backends that run them.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict

import numpy as np

TOP = 60   # longest kernels (operators) per backend in report.json, a compiled step's whole list; report.md: 3
STEP = "bench: decode step"   # the profiler range around each profiled Engine.decode call
PREFILL_RANGE = "bench: prefill"   # ... and around each profiled Engine.prefill call
RANGES = (STEP, PREFILL_RANGE)
PREFILL_CALLS = 3             # prefills profiled, after one untimed
CPU_VISIBLE = ("eager", "hf", "torch")   # backends whose CPU work is torch operators


def profile_or_reason(name: str, device: str, profile_call) -> dict:
    """profile_call(), or {reason} where the profiler cannot see the backend's work or fails: a diagnostic that
    fails costs the report its profile, not the backend's measurements."""
    if device == "cpu" and name not in CPU_VISIBLE:
        return {"reason": f"on the CPU the profiler sees torch operators only, and {name} runs its own kernels; "
                          "profile it on CUDA, where every library's kernels are seen"}
    from .run import failure
    try:
        return profile_call()
    except Exception as e:
        return {"reason": f"the profiler failed ({failure(e)})"}


def decode_profile_or_reason(name: str, engine, device: str, steps: int, warmup: int) -> dict:
    return profile_or_reason(name, device, lambda: decode_profile(engine, device, steps, warmup))


def prefill_profile_or_reason(name: str, engine, device: str, length: int) -> dict:
    return profile_or_reason(name, device, lambda: prefill_profile(engine, device, length))


def decode_profile(engine, device: str, steps: int, warmup: int, context: int = 32) -> dict:
    """Profile `steps` decode steps of one row after a `context`-token prompt and `warmup` untimed steps."""
    from .measure import _ids

    rng = np.random.default_rng(3)
    state = engine.new_state(1)
    context = max(1, min(context, engine.max_seq_len - warmup - steps))
    engine.prefill(_ids(rng, engine.vocab_size, (1, context)), state)
    ids = _ids(rng, engine.vocab_size, (warmup + steps, 1))
    for i in range(warmup):
        engine.decode(ids[i], state)
    found = _profiled(device, STEP, [lambda i=i: engine.decode(ids[i], state) for i in range(warmup, warmup + steps)])
    return {"batch": 1, "context": context, "steps": steps, "method": found["method"],
            "kernels_per_step": found["kernels"], "busy_ms_per_step": found["busy_ms"],
            "span_ms_per_step": found["span_ms"],
            "top": [{"name": n, "calls_per_step": c, "ms_per_step": t} for n, c, t in found["top"]]}


def prefill_profile(engine, device: str, length: int) -> dict:
    """Profile PREFILL_CALLS prefills of `length` random tokens, each into a fresh batch-1 state made before the
    profiler starts (so its allocation is not counted), after one untimed prefill."""
    from .measure import _ids

    ids = _ids(np.random.default_rng(4), engine.vocab_size, (1, length))
    engine.prefill(ids, engine.new_state(1))
    states = [engine.new_state(1) for _ in range(PREFILL_CALLS)]
    found = _profiled(device, PREFILL_RANGE, [lambda st=st: engine.prefill(ids, st) for st in states])
    return {"batch": 1, "prompt_length": length, "calls": PREFILL_CALLS, "method": found["method"],
            "kernels_per_call": found["kernels"], "busy_ms_per_call": found["busy_ms"],
            "span_ms_per_call": found["span_ms"],
            "top": [{"name": n, "calls_per_call": c, "ms_per_call": t} for n, c, t in found["top"]]}


def _profiled(device: str, range_name: str, runs: list) -> dict:
    """Run each of `runs` inside a profiler range named `range_name`; per run: kernels (operators), busy ms, the
    device span, and the TOP longest as (name, calls, ms)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for run in runs:
            with record_function(range_name):
                run()
        if cuda:
            torch.cuda.synchronize()
    calls, micros = defaultdict(int), defaultdict(float)
    for e in prof.events():
        if cuda and _device_work(e):
            calls[e.name] += 1
            micros[e.name] += e.device_time_total
        elif not cuda and _top_level(e) and e.name.startswith("aten::"):
            calls[e.name] += 1
            micros[e.name] += e.cpu_time_total
    n = len(runs)
    top = sorted(micros, key=micros.get, reverse=True)[:TOP]
    return {"method": "torch.profiler: CUDA kernels and copies (CUPTI), every library's" if cuda else
                      "torch.profiler: top-level torch operators on the CPU (Inductor's C++ kernels and ONNX "
                      "Runtime's operators are not seen)",
            "kernels": sum(calls.values()) / n, "busy_ms": sum(micros.values()) / 1e3 / n,
            "span_ms": device_span_ms(prof.events(), range_name) if cuda else None,
            "top": [(name, calls[name] / n, micros[name] / 1e3 / n) for name in top]}


def _device_work(event) -> bool:
    """A kernel or copy on the device. The profiler also draws each call's range on the device's timeline (a user
    annotation spanning the call's kernels, under the range's name): that one is not work, and counting it would
    add one kernel and a whole call's time to every call."""
    import torch
    return event.device_type == torch.autograd.DeviceType.CUDA and event.name not in RANGES


def _top_level(event) -> bool:
    """An operator the profiled call made itself, not one inside another operator."""
    return event.cpu_parent is None or event.cpu_parent.name in RANGES


def device_span_ms(events, range_name: str = STEP) -> float | None:
    """Median over the profiled calls (ranges named `range_name`) of the time from a call's first kernel start to
    its last kernel end: the device's share of the call (the kernels' busy time and the gaps between them); what
    the call takes beyond it is the host's (launches, the copies in and out, Python). Each kernel belongs to the
    last range begun before it (a call waits for its logits, so its kernels end before the next range begins)."""
    import torch
    cpu = torch.autograd.DeviceType.CPU
    starts = sorted(e.time_range.start for e in events if e.name == range_name and e.device_type == cpu)
    if not starts:
        return None
    first, last = [float("inf")] * len(starts), [float("-inf")] * len(starts)
    for e in events:
        if _device_work(e):
            i = max(0, bisect_right(starts, e.time_range.start) - 1)
            first[i], last[i] = min(first[i], e.time_range.start), max(last[i], e.time_range.end)
    spans = [b - a for a, b in zip(first, last) if b > a]
    return float(np.median(spans)) / 1e3 if spans else None
