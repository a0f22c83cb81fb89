"""What a decode step is made of: `python -m bench --profile-steps N` runs N decode steps at batch 1 under
torch.profiler.

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
CPU_VISIBLE = ("eager", "hf", "torch")   # backends whose CPU work is torch operators


def decode_profile_or_reason(name: str, engine, device: str, steps: int, warmup: int) -> dict:
    """decode_profile, or {reason} where the profiler cannot see the backend's work or fails: a diagnostic that
    fails costs the report its profile, not the backend's measurements."""
    if device == "cpu" and name not in CPU_VISIBLE:
        return {"reason": f"on the CPU the profiler sees torch operators only, and {name} runs its own kernels; "
                          "profile it on CUDA, where every library's kernels are seen"}
    from .run import failure
    try:
        return decode_profile(engine, device, steps, warmup)
    except Exception as e:
        return {"reason": f"the profiler failed ({failure(e)})"}


def decode_profile(engine, device: str, steps: int, warmup: int, context: int = 32) -> dict:
    """Profile `steps` decode steps of one row after a `context`-token prompt and `warmup` untimed steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from .measure import _ids

    rng = np.random.default_rng(3)
    state = engine.new_state(1)
    context = max(1, min(context, engine.max_seq_len - warmup - steps))
    engine.prefill(_ids(rng, engine.vocab_size, (1, context)), state)
    ids = _ids(rng, engine.vocab_size, (warmup + steps, 1))
    for i in range(warmup):
        engine.decode(ids[i], state)
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for i in range(warmup, warmup + steps):
            with record_function(STEP):
                engine.decode(ids[i], state)
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
    top = sorted(micros, key=micros.get, reverse=True)[:TOP]
    return {"batch": 1, "context": context, "steps": steps,
            "method": "torch.profiler: CUDA kernels and copies (CUPTI), every library's" if cuda else
                      "torch.profiler: top-level torch operators on the CPU (Inductor's C++ kernels and ONNX "
                      "Runtime's operators are not seen)",
            "kernels_per_step": sum(calls.values()) / steps,
            "busy_ms_per_step": sum(micros.values()) / 1e3 / steps,
            "span_ms_per_step": device_span_ms(prof.events()) if cuda else None,
            "top": [{"name": n, "calls_per_step": calls[n] / steps, "ms_per_step": micros[n] / 1e3 / steps}
                    for n in top]}


def _device_work(event) -> bool:
    """A kernel or copy on the device. The profiler also draws each step range on the device's timeline (a user
    annotation spanning the step's kernels, under the range's name): that one is not work, and counting it would
    add one kernel and a whole step's time to every step."""
    import torch
    return event.device_type == torch.autograd.DeviceType.CUDA and event.name != STEP


def _top_level(event) -> bool:
    """An operator the step called itself, not one inside another operator."""
    return event.cpu_parent is None or event.cpu_parent.name == STEP


def device_span_ms(events) -> float | None:
    """Median over the profiled steps of the time from a step's first kernel start to its last kernel end: the
    device's share of the step (the kernels' busy time and the gaps between them); what the step takes beyond it
    is the host's (launches, the copies in and out, Python). Each kernel belongs to the last step range begun
    before it (a step's host call waits for its logits, so its kernels end before the next range begins)."""
    import torch
    cpu = torch.autograd.DeviceType.CPU
    starts = sorted(e.time_range.start for e in events if e.name == STEP and e.device_type == cpu)
    if not starts:
        return None
    first, last = [float("inf")] * len(starts), [float("-inf")] * len(starts)
    for e in events:
        if _device_work(e):
            i = max(0, bisect_right(starts, e.time_range.start) - 1)
            first[i], last[i] = min(first[i], e.time_range.start), max(last[i], e.time_range.end)
    spans = [b - a for a, b in zip(first, last) if b > a]
    return float(np.median(spans)) / 1e3 if spans else None
