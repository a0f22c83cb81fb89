"""report.json, as `python -m bench` (kind "backends") and `python -m bench.kernels` (kind "kernels") write it.

Version 2 (version 1 had no prefill_profile). Times are milliseconds, sizes bytes, bandwidths GB/s (1e9 bytes/s). A
timing is {min_ms, median_ms, max_ms, repeats}: `repeats` calls timed after the warm-up calls. Absolute figures hold
for environment.device.name only. Unmeasurable figures are null with a reason beside them, never left out.

Both kinds:
    schema            "next-deploy/bench"
    schema_version    2 (a reader refuses a larger number)
    kind              "backends" | "kernels"
    command           argv of the run
    environment       device {type, name, memory_bytes, capability, cuda, driver}, python, platform,
                      packages {torch, onnxruntime, transformers, fla, causal_conv1d, triton, numpy, matplotlib:
                      version or null}, git {commit, dirty}, created_utc
    settings          the options in force after clipping to the target's capacity
    copy_bandwidth    {gb_per_s, bytes, method}: (bytes read + written) / time of one large device copy
    plots             PNG file names written beside report.json
    plots_skipped     null, or why no plots were drawn (matplotlib missing)

kind "backends":
    target            {path, kind: artifact|checkpoint, dtype, device, max_batch, max_seq_len, targets,
                      source_checkpoint, source_sha256, manifest_sha256 (sha256 of manifest.json; null for a
                      checkpoint), parity_at_export, model_config}
    capacity_bytes    {weights, state, total, batch, seq_len}: weights plus the whole state at capacity
    baselines         ["eager", "hf"]: the backends speedups are taken against
    backends          {name: backend}, every backend asked for, in the order measured:
      status          "ok" | "unavailable" | "failed" | "interrupted" (Ctrl-C or SIGTERM while it or an earlier
                      backend ran: the report holds what finished)
      reason          null when ok; else why, naming the fix (export command, package to install, ...)
      load_s          seconds to open the backend
      prefill         [{prompt_length, batch, <timing>, tokens_per_s}]
      decode          [{batch, context, <timing> per step, tokens_per_s, bytes_per_step {weights,
                      recurrent_and_conv, kv_cache, total}, gb_per_s, fraction_of_copy_bandwidth}]
      generate        {prompt_tokens, new_tokens, how, <timing> per whole generation, tokens_per_s} or null
      memory          {peak_bytes (null if not measured), method}
      accuracy        {max_abs_error, rel_error, top1_agreement, steps, prefill, batch, reference,
                      output_rounding: null for float32, else {max_abs_error, rel_error, top1_agreement, dtype} of
                      the float32 reference's logits rounded to the target's dtype (the part of the error that
                      returning logits in that dtype costs)} or null
      drift           {steps, logits_rel_error, logits_rel_error_by_step {step: error}, state_rel_error (null
                      when the backend does not expose its state), state_note, reference} or null
      profile         null (--profile-steps 0), {reason} (not profiled), or {batch 1, context, steps, method,
                      kernels_per_step, busy_ms_per_step, span_ms_per_step, top [{name, calls_per_step,
                      ms_per_step}]}: decode steps under torch.profiler; on CUDA every CUDA kernel of the process,
                      busy = their device time, span = a step's first kernel start to last kernel end (median; null
                      on the CPU); on the CPU top-level torch operators, busy = their CPU time (bench/profile.py)
      prefill_profile null (--profile-prefill 0), {reason}, or {batch 1, prompt_length, calls, method,
                      kernels_per_call, busy_ms_per_call, span_ms_per_call, top [{name, calls_per_call,
                      ms_per_call}]}: prefills of prompt_length tokens, each into a fresh state, under
                      torch.profiler; the figures as for profile, per prefill call
      speedup         {"vs_eager"|"vs_hf": {prefill {prompt_length: x}, decode {batch: x}, generate: x}}:
                      baseline median / this backend's median (> 1 is faster); absent baselines are left out

kind "kernels":
    dtype             the dtype of the kernels' inputs
    results           [{kernel, mode, shape {name: size}, label, impl, status "ok"|"unavailable"|"failed",
                      reason, timing, <timing>, bytes, flops, gb_per_s, tflop_per_s, rel_error, state_rel_error,
                      speedup_vs_reference}]; errors are against a float64 token-by-token loop. timing: how the row
                      was timed, settings.timing ("graph": 10 CUDA graph replays of many calls each, the time per
                      call, repeats 10; "calls": each call on its own, the host's launch included), or "calls (no
                      CUDA graph: why)" where an implementation could not be captured; null where it did not run
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "next-deploy/bench"
SCHEMA_VERSION = 2
REPORT = "report.json"

COMMON = ("schema", "schema_version", "kind", "command", "environment", "settings", "copy_bandwidth", "plots",
          "plots_skipped")
BY_KIND = {
    "backends": ("target", "capacity_bytes", "baselines", "backends"),
    "kernels": ("dtype", "results"),
}
BACKEND = ("status", "reason", "load_s", "prefill", "decode", "generate", "memory", "accuracy", "drift", "profile",
           "prefill_profile", "speedup")
KERNEL_RESULT = ("kernel", "mode", "shape", "label", "impl", "status", "reason", "timing", "median_ms", "gb_per_s",
                 "tflop_per_s", "rel_error", "speedup_vs_reference")


def missing_fields(report: dict) -> list[str]:
    """Fields this version requires that `report` lacks (empty when it conforms)."""
    missing = [k for k in COMMON + BY_KIND.get(report.get("kind"), ("kind",)) if k not in report]
    for name, b in report.get("backends", {}).items():
        missing += [f"backends.{name}.{k}" for k in BACKEND if k not in b]
    for i, r in enumerate(report.get("results", [])):
        missing += [f"results[{i}].{k}" for k in KERNEL_RESULT if k not in r]
    return missing


def is_report(directory: Path) -> bool:
    """Whether `directory` holds an earlier bench report (which a new run may replace)."""
    try:
        d = json.loads((Path(directory) / REPORT).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("schema") == SCHEMA
