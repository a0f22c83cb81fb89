"""Clocks, copy bandwidth and memory probes shared by `python -m bench` and `python -m bench.kernels`.

Every timed call is bracketed by a device synchronisation (torch.cuda.synchronize on CUDA, nothing on the CPU)
and read with time.perf_counter, so work queued by an earlier call is not billed to this one and asynchronous
work of this call is. Engine calls return host logits, so they have finished when they return anyway.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import numpy as np


def synchronizer(device: str) -> Callable[[], None]:
    if device == "cuda":
        import torch
        return torch.cuda.synchronize
    return lambda: None


def summarize(ms: list[float]) -> dict:
    return {"min_ms": min(ms), "median_ms": statistics.median(ms), "max_ms": max(ms), "repeats": len(ms)}


def time_calls(call: Callable[[object], object], device: str, warmup: int, repeats: int,
               setup: Callable[[], object] = lambda: None, after: Callable[[], None] = lambda: None,
               cuda_events: bool = False) -> dict:
    """Run `call(setup())` warmup + repeats times; the timed part is `call` alone. `after` runs untimed after each
    call (memory sampling). Returns min / median / max milliseconds over the repeats.

    `cuda_events` times with CUDA events on the current stream instead of the host clock: for torch kernels of a
    few microseconds. (Libraries with streams of their own, such as ONNX Runtime, need the host clock.)"""
    sync = synchronizer(device)
    if cuda_events and device == "cuda":
        import torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + repeats):
        arg = setup()
        sync()
        if cuda_events and device == "cuda":
            start.record()
            call(arg)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            call(arg)
            sync()
            elapsed = (time.perf_counter() - t0) * 1e3
        after()
        if i >= warmup:
            times.append(elapsed)
    return summarize(times)


def time_in_graph(call: Callable[[], object], rep_ms: float = 20.0) -> dict:
    """The device time of one `call` as it costs inside a CUDA graph: Triton's do_bench_cudagraph captures as many
    calls back to back as fill about `rep_ms` and times 10 replays, per call. A kernel of a few microseconds launched
    from Python takes longer to launch than to run, so timing single calls measures the host; a decode step's graph
    launches none of them from the host. Raises what the capture raises where `call` cannot be captured."""
    from triton.testing import do_bench_cudagraph
    return summarize(do_bench_cudagraph(call, rep=rep_ms, return_mode="all"))


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> dict:
    """The device's memory bandwidth as a large copy sees it: (bytes read + bytes written) / time, median."""
    if device == "cuda":
        import torch
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        result = time_calls(lambda _: dst.copy_(src), device, 3, repeats, cuda_events=True)
        del src, dst
        torch.cuda.empty_cache()
        method = "torch copy_ of a CUDA buffer"
    else:
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        result = time_calls(lambda _: np.copyto(dst, src), device, 2, repeats)
        method = "numpy copyto of a host buffer"
    return {"gb_per_s": 2 * nbytes / (result["median_ms"] * 1e-3) / 1e9, "bytes": nbytes, "method": method}


# ---- memory --------------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM (peak resident set) to the current RSS when "5" is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory a backend takes, from before it is loaded to the end of its decode measurements.

    CUDA: the torch caching allocator's peak (torch-based backends), else the device's used memory
    (cudaMemGetInfo, which sees every library's allocations) sampled after each step. CPU: the process's peak
    resident set (VmHWM, reset before decode) less the resident set before loading; memory that earlier backends
    freed may be reused, so this can read low.
    """

    def __init__(self, device: str):
        self.device = device
        gc.collect()
        if device == "cuda":
            import torch
            self.torch = torch
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.allocated0 = torch.cuda.memory_allocated()
            self.used0 = self._used()
        else:
            self.rss0 = _proc_status_kb("VmRSS")
        self.peak_used = 0
        self.hwm_reset = False

    def _used(self) -> int:
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def begin_decode(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.hwm_reset = _reset_peak_rss()

    def sample(self) -> None:
        if self.device == "cuda":
            self.peak_used = max(self.peak_used, self._used())
        elif not self.hwm_reset:
            self.peak_used = max(self.peak_used, (_proc_status_kb("VmRSS") or 0) * 1024)

    def result(self) -> dict:
        if self.device == "cuda":
            allocator = self.torch.cuda.max_memory_allocated() - self.allocated0
            if allocator > 0:
                return {"peak_bytes": allocator, "method": "torch CUDA allocator peak during decode, less what "
                        "was allocated before the backend was loaded"}
            return {"peak_bytes": self.peak_used - self.used0, "method": "device memory in use (cudaMemGetInfo) "
                    "at its highest after a decode step, less the amount before the backend was loaded"}
        if self.rss0 is None:
            return {"peak_bytes": None, "method": "not measured: /proc/self/status is not readable here"}
        peak = (_proc_status_kb("VmHWM") or 0) * 1024 if self.hwm_reset else self.peak_used
        how = "peak resident set (VmHWM) during decode" if self.hwm_reset else "resident set sampled after each step"
        return {"peak_bytes": peak - self.rss0 * 1024, "method": f"{how}, less the resident set before the backend "
                "was loaded (approximate: memory freed by earlier backends may be reused)"}
