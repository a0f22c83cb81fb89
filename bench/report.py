"""Writing a report directory: report.json (see bench.schema), report.md and the PNGs, all or nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from model.io import atomic_directory

from .plots import PlotsSkipped
from .schema import REPORT


def write(out: Path, report: dict, markdown: Callable[[dict], str], draw: Callable[[dict, Path], list[str]]) -> None:
    """Into a temporary directory beside `out`, renamed over it only once everything is written."""
    with atomic_directory(out) as tmp:
        try:
            report["plots"], report["plots_skipped"] = draw(report, tmp), None
        except PlotsSkipped as e:
            report["plots"], report["plots_skipped"] = [], str(e)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(markdown(report))


# ---- Markdown ----------------------------------------------------------------------------------


def ms(x) -> str:
    return "—" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def num(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def times(x) -> str:
    return "—" if x is None else f"{x:.2f}x"


def size(n) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def at(rows: list[dict], key: str, value, field: str = "median_ms"):
    """`field` of the row whose `key` is `value` (None when no row has it)."""
    return next((r[field] for r in rows if r[key] == value), None)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def preamble(report: dict) -> str:
    env = report["environment"]
    dev, pk, git = env["device"], env["packages"], env["git"]
    commit = (git["commit"] or "unknown")[:10] + (" (with uncommitted changes)" if git["dirty"] else "")
    versions = ", ".join(f"{k} {v}" for k, v in pk.items() if v and k in
                         ("torch", "onnxruntime", "transformers", "fla", "causal_conv1d", "triton"))
    driver = f", driver {dev['driver']}, CUDA {dev['cuda']}" if dev["type"] == "cuda" else ""
    s = report["settings"]
    bw = report["copy_bandwidth"]
    return (f"Device: **{dev['name']}**{driver}. {env['created_utc']}, commit {commit}. {versions}.\n\n"
            f"Times are medians of {s['repeats']} timed calls after {s['warmup']} warm-up calls (min and max are in "
            f"report.json); the device's copy bandwidth, measured in this run, is {bw['gb_per_s']:.1f} GB/s.\n")


def plots_section(report: dict) -> str:
    if report["plots_skipped"]:
        return f"\nPlots skipped: {report['plots_skipped']}\n"
    return "\n" + "\n".join(f"![{Path(p).stem}]({p})" for p in report["plots"]) + "\n"


def backends_markdown(report: dict) -> str:
    t, s = report["target"], report["settings"]
    ok = {n: b for n, b in report["backends"].items() if b["status"] == "ok"}
    out = [f"# Bench: {t['path']} ({t['kind']}, {t['dtype']})\n", preamble(report)]
    out += [f"\n- {note}" for note in s["notes"]] + (["\n"] if s["notes"] else [])
    lengths, batches = s["prompt_lengths"], s["batches"]
    context = next((b["decode"][0]["context"] for b in ok.values() if b["decode"]), s["decode_context"])
    generated = next((b["generate"] for b in ok.values() if b["generate"]), None)
    out.append("\n## Latency (ms)\n\nPrefill at batch 1 (time to first token); decode per step after a "
               f"{context}-token prompt; generate: "
               + (f"{generated['prompt_tokens']}-token prompt, {generated['new_tokens']} new tokens, sampled, "
                  "whole run.\n\n" if generated else "not run.\n\n"))
    gen = lambda b: b["generate"]["median_ms"] if b["generate"] else None  # noqa: E731
    out.append(table(["backend", *[f"prefill {n}" for n in lengths], *[f"decode b={b}" for b in batches],
                      "generate"],
                     [[n, *[ms(at(b["prefill"], "prompt_length", n)) for n in lengths],
                       *[ms(at(b["decode"], "batch", x)) for x in batches], ms(gen(b))] for n, b in ok.items()]))
    for base in report["baselines"]:
        rows = [[n, *[times(b["speedup"][f"vs_{base}"].get("prefill", {}).get(str(n2))) for n2 in lengths],
                 *[times(b["speedup"][f"vs_{base}"].get("decode", {}).get(str(x))) for x in batches],
                 times(b["speedup"][f"vs_{base}"].get("generate"))]
                for n, b in ok.items() if f"vs_{base}" in b["speedup"]]
        if rows:
            out.append(f"\n## Speedup vs {base} ({base} median / backend median; > 1 is faster)\n\n")
            out.append(table(["backend", *[f"prefill {n}" for n in lengths], *[f"decode b={b}" for b in batches],
                              "generate"], rows))
    cap = report["capacity_bytes"]
    out.append(f"\n## Throughput, memory and bandwidth\n\nWeights + state at capacity (batch {cap['batch']}, "
               f"{cap['seq_len']} tokens): {size(cap['total'])} ({size(cap['weights'])} weights). Bandwidth: the "
               "bytes a decode step must read (weights used, recurrent and conv state, KV cache in use) per "
               "median step time, and as a share of the copy bandwidth.\n\n")
    rows = []
    for n, b in ok.items():
        first = b["decode"][0] if b["decode"] else {}
        last = b["decode"][-1] if b["decode"] else {}
        frac = first.get("fraction_of_copy_bandwidth")
        peak = b["memory"]["peak_bytes"]
        rows.append([n, num(last.get("tokens_per_s"), 4),
                     num(b["generate"]["tokens_per_s"] if b["generate"] else None, 4),
                     size(peak), "—" if peak is None else f"{peak / cap['total']:.2f}x",
                     size(first.get("bytes_per_step", {}).get("total")),
                     num(first.get("gb_per_s")), "—" if frac is None else f"{100 * frac:.1f}%"])
    big = s["batches"][-1] if s["batches"] else "?"
    out.append(table(["backend", f"decode tok/s (b={big})", "generate tok/s", "peak memory (decode)",
                      "of weights + state", f"bytes/step (b={s['batches'][0] if s['batches'] else '?'})", "GB/s",
                      "of copy bw"], rows))
    methods = sorted({b["memory"]["method"] for b in ok.values()})
    out.append("\nPeak memory: " + "; ".join(methods) + ".\n" if methods else "")
    out.append(f"\n## Accuracy against the eager model\n\nTeacher-forced: {s['accuracy_steps']} decode steps against "
               f"float32; drift: {s['drift_steps']} decode steps against float64 (logits and recurrent state, "
               "relative error at the last step).\n\n")
    rows = []
    for n, b in ok.items():
        a, d = b["accuracy"] or {}, b["drift"] or {}
        rows.append([n, num(a.get("rel_error")), num(a.get("max_abs_error")), num(a.get("top1_agreement"), 4),
                     num(d.get("logits_rel_error")), num(d.get("state_rel_error")) if d.get("state_note") is None
                     else "not exposed"])
    out.append(table(["backend", "rel logit error", "max abs", "top-1 agreement", "drift: logits", "drift: state"],
                     rows))
    floor = next((b["accuracy"]["output_rounding"] for b in ok.values()
                  if (b["accuracy"] or {}).get("output_rounding")), None)
    if floor:
        out.append(f"\nThe float32 reference's own logits rounded to {floor['dtype']}, and nothing else: rel error "
                   f"{num(floor['rel_error'])}, top-1 agreement {num(floor['top1_agreement'], 4)}: the part of each "
                   "backend's error that returning logits in that dtype costs.\n")
    out.append(profile_section(ok))
    out.append(prefill_profile_section(ok))
    missing = {n: b for n, b in report["backends"].items() if b["status"] != "ok"}
    if missing:
        out.append("\n## Not measured\n\n" + "".join(f"- **{n}** ({b['status']}): {b['reason']}\n"
                                                     for n, b in missing.items()))
    out.append(plots_section(report))
    return "".join(out)


def profile_section(ok: dict) -> str:
    """Kernels (operators) per decode step and what they take, beside the unprofiled step: the gap is the host's
    and the launches' share."""
    def intro(p):
        return (f"{p['steps']} decode steps after a {p['context']}-token prompt, {p['method']}. Busy: the time those "
                "kernels (operators) take per step, against the unprofiled step time above. Device (CUDA): a step's "
                "first kernel start to its last kernel end, busy time plus the gaps between kernels; the rest of the "
                "step is the host's (launches, copies in and out, Python).")
    return _profile_section(ok, "profile", "Decode profile (batch 1)", intro, "step", "decode ms (b=1)",
                            lambda b, p: at(b["decode"], "batch", 1))


def prefill_profile_section(ok: dict) -> str:
    """Kernels (operators) per prefill call and what they take, beside the unprofiled prefill of that length."""
    def intro(p):
        return (f"{p['calls']} prefills of {p['prompt_length']} tokens, each into a fresh state, {p['method']}. Busy "
                "and device time per call as in the decode profile; the prefill column is the unprofiled prefill of "
                "that length above, where it was measured.")
    return _profile_section(ok, "prefill_profile", "Prefill profile (batch 1)", intro, "call", "prefill ms",
                            lambda b, p: at(b["prefill"], "prompt_length", p["prompt_length"]))


def _profile_section(ok: dict, key: str, title: str, intro, per: str, timed_header: str, timed) -> str:
    """A profile's section: `intro(profile)`, then per backend its kernels, busy and device ms per `per`, the
    unprofiled time `timed(backend entry, profile)` and its three longest kernels; then those not profiled."""
    profiled = {n: b[key] for n, b in ok.items() if b.get(key)}
    if not profiled:
        return ""
    shown = {n: p for n, p in profiled.items() if "reason" not in p}
    out = [f"\n## {title}\n\n"]
    if shown:
        out.append(intro(next(iter(shown.values()))) + "\n\n")
        rows = []
        for n, p in shown.items():
            longest = ", ".join(f"{t['name'][:40]} {ms(t[f'ms_per_{per}'])}" for t in p["top"][:3])
            rows.append([n, num(p[f"kernels_per_{per}"], 4), ms(p[f"busy_ms_per_{per}"]),
                         ms(p.get(f"span_ms_per_{per}")), ms(timed(ok[n], p)), longest])
        out.append(table(["backend", f"kernels per {per}", f"busy ms per {per}", f"device ms per {per}", timed_header,
                          f"longest three (ms per {per})"], rows))
    out += [f"\n- **{n}** not profiled: {p['reason']}" for n, p in profiled.items() if "reason" in p]
    return "".join(out) + "\n"


TIMING = {"graph": "\nTiming: each call's device time, the median of 10 CUDA graph replays of as many calls back to "
                   "back as fill 20 ms (as a decode step's graph runs them: the host's launch is not in the figure; "
                   "the counts of calls above hold for rows timed per call).\n",
          "calls": "\nTiming: each call on its own, the host's launch included (as an eager model runs them).\n"}


def kernels_markdown(report: dict) -> str:
    out = [f"# Kernel bench ({report['dtype']})\n", preamble(report),
           "\nError: relative to a float64 token-by-token loop (output; state in brackets). Throughput: "
           "GB/s moved (inputs, outputs, states), or TFLOP/s counted as the token-by-token recurrence's "
           "work.\n", TIMING[report["settings"]["timing"]]]
    out += [f"\n- {note}\n" for note in report["settings"]["notes"]]
    groups = {}
    for r in report["results"]:
        groups.setdefault((r["kernel"], r["mode"]), []).append(r)
    for (kernel, mode), rows in groups.items():
        out.append(f"\n## {kernel} ({mode})\n\n")
        body = []
        for r in rows:
            if r["status"] != "ok":
                body.append([r["label"], r["impl"], f"{r['status']}: {r['reason']}", "", "", "", ""])
                continue
            err = num(r["rel_error"], 2) + (f" ({num(r['state_rel_error'], 2)})" if r.get("state_rel_error")
                                            is not None else "")
            body.append([r["label"], r["impl"], ms(r["median_ms"]), num(r["gb_per_s"]), num(r["tflop_per_s"]),
                         err, times(r["speedup_vs_reference"])])
        out.append(table(["shape", "impl", "ms", "GB/s", "TFLOP/s", "rel error", "vs reference"], body))
        out += [f"\n- {r['label']}, {r['impl']}: timed by {r['timing']}\n" for r in rows
                if r["status"] == "ok" and r["timing"] != report["settings"]["timing"]]
    out.append(plots_section(report))
    return "".join(out)
