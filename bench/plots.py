"""matplotlib charts for the backend and kernel reports. Without matplotlib, `PlotsSkipped` says why."""

from __future__ import annotations

from pathlib import Path


class PlotsSkipped(Exception):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise PlotsSkipped("matplotlib is not installed: pip install matplotlib (or pip install -e '.[bench]'); "
                           "report.json and report.md hold every figure") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def backend_plots(report: dict, out: Path) -> list[str]:
    plt = _pyplot()
    device = report["environment"]["device"]["name"]
    title = f"{Path(report['target']['path']).name} ({report['target']['dtype']}) on {device}"
    measured = {n: b for n, b in report["backends"].items() if b["status"] == "ok"}
    files = []
    if not measured:
        return files

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, b in measured.items():
        if b["decode"]:
            ax.plot([r["batch"] for r in b["decode"]], [r["median_ms"] for r in b["decode"]], "o-", label=name)
    ax.set(xscale="log", xlabel="batch", ylabel="ms per decode step (median)", title=f"Decode: {title}")
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend()
    files.append(_save(plt, fig, out / "decode.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, b in measured.items():
        if b["prefill"]:
            ax.plot([r["prompt_length"] for r in b["prefill"]], [r["median_ms"] for r in b["prefill"]], "o-",
                    label=name)
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="prompt length (tokens), batch 1", ylabel="prefill ms (median)",
           title=f"Prefill: {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    files.append(_save(plt, fig, out / "prefill.png"))

    # A chart per baseline that some other measured backend has a speedup against (none when eager ran alone).
    compared = {base: [n for n in measured if n != base and f"vs_{base}" in measured[n]["speedup"]]
                for base in report["baselines"] if base in measured}
    baselines = [base for base, others in compared.items() if others]
    if baselines:
        fig, axes = plt.subplots(1, len(baselines), figsize=(7 * len(baselines), 4.5), squeeze=False)
        for ax, base in zip(axes[0], baselines):
            others = compared[base]
            groups = _speedup_groups(measured, others, base)
            width = 0.8 / max(1, len(others))
            for i, name in enumerate(others):
                ax.bar([g + i * width for g in range(len(groups))],
                       [_speedup(measured[name], base, kind, key) for kind, key, _ in groups], width, label=name)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([g + width * (len(others) - 1) / 2 for g in range(len(groups))],
                          [label for *_, label in groups], rotation=30, ha="right")
            ax.set(yscale="log", ylabel=f"speedup vs {base} (x, log scale)", title=f"Speedup vs {base} on {device}")
            ax.legend()
        files.append(_save(plt, fig, out / "speedup.png"))
    return files


def _speedup(backend: dict, base: str, kind: str, key: str | None) -> float:
    figures = backend["speedup"][f"vs_{base}"]
    return (figures.get(kind) if key is None else figures.get(kind, {}).get(key)) or float("nan")


def _speedup_groups(measured: dict, names: list[str], base: str) -> list[tuple]:
    """(kind, key, label) of each bar group: decode per batch, prefill per length, generate."""
    groups = []
    for kind, unit in (("decode", "b={}"), ("prefill", "L={}")):
        keys = sorted({k for n in names for k in measured[n]["speedup"][f"vs_{base}"].get(kind, {})}, key=int)
        groups += [(kind, k, f"{kind} {unit.format(k)}") for k in keys]
    if any(measured[n]["speedup"][f"vs_{base}"].get("generate") for n in names):
        groups.append(("generate", None, "generate"))
    return groups


def kernel_plots(report: dict, out: Path) -> list[str]:
    """Per kernel and mode: time and throughput against scale (shape), speedup against the reference."""
    plt = _pyplot()
    device = report["environment"]["device"]["name"]
    files = []
    groups = {}
    for r in report["results"]:
        groups.setdefault((r["kernel"], r["mode"]), []).append(r)
    for (kernel, mode), rows in groups.items():
        labels = list(dict.fromkeys(r["label"] for r in rows if r["status"] == "ok"))
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["status"] == "ok"))
        if not impls:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
        flops = any(r.get("tflop_per_s") for r in rows)
        for impl in impls:
            by_label = {r["label"]: r for r in rows if r["impl"] == impl and r["status"] == "ok"}
            xs = [i for i, lab in enumerate(labels) if lab in by_label]
            axes[0].plot(xs, [by_label[labels[i]]["median_ms"] for i in xs], "o-", label=impl)
            axes[1].plot(xs, [by_label[labels[i]]["tflop_per_s" if flops else "gb_per_s"] for i in xs], "o-",
                         label=impl)
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            by_label = {r["label"]: r for r in rows if r["impl"] == impl and r["status"] == "ok"}
            axes[2].bar([i + j * width for i in range(len(labels))],
                        [(by_label.get(lab) or {}).get("speedup_vs_reference") or float("nan") for lab in labels],
                        width,
                        label=impl)
        axes[0].set(yscale="log", ylabel="ms (median)", title=f"{kernel} {mode}: time")
        axes[1].set(ylabel="TFLOP/s" if flops else "GB/s", title=f"{kernel} {mode}: throughput")
        axes[2].axhline(1.0, color="black", linewidth=0.8)
        axes[2].set(yscale="log", ylabel="speedup vs reference (x, log scale)", title=f"{kernel} {mode}: speedup")
        for ax in axes:
            ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{kernel} ({mode}, {report['dtype']}) on {device}")
        files.append(_save(plt, fig, out / f"kernel-{kernel}-{mode}.png"))
    return files
