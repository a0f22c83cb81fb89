"""What `python -m bench` and `python -m bench.kernels` share: checking the names asked for, the report's common
fields, and publishing it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from model import cli

from .backends import BenchError

# What Ctrl-C and SIGTERM raise under model.cli.run: a run stopped by either still publishes what it measured.
STOPS = (KeyboardInterrupt, cli.Terminated)


def pick(requested: list[str] | None, known: list[str], what: str, hint: str = "") -> list[str]:
    """The names asked for (all known ones when none were), each once, in the order given; an unknown one is an
    error that lists the known ones (then `hint`)."""
    if requested is None:
        return known
    unknown = [r for r in requested if r not in known]
    if unknown:
        raise BenchError(f"unknown {what} {unknown[0]!r}; known: {', '.join(known)}{hint}")
    return list(dict.fromkeys(requested))


def failure(e: Exception) -> str:
    """An exception as a report's one-line reason: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def stopped_by(stop: BaseException) -> str:
    """Which of STOPS ended a run, as its report says it."""
    return "SIGTERM" if isinstance(stop, cli.Terminated) else "Ctrl-C"


def header(kind: str, module: str, argv: list[str] | None, device: str) -> dict:
    """The fields every report starts with (bench/schema.py), the device's copy bandwidth measured now."""
    from . import environment, schema
    from .timing import copy_bandwidth
    return {"schema": schema.SCHEMA, "schema_version": schema.SCHEMA_VERSION, "kind": kind,
            "command": ["python", "-m", module, *(sys.argv[1:] if argv is None else argv)],
            "environment": environment.environment(device),
            "copy_bandwidth": copy_bandwidth(device, (1 << 30) if device == "cuda" else (64 << 20))}


def publish(out: Path, report: dict, markdown: Callable[[dict], str], draw: Callable[[dict, Path], list[str]]) -> None:
    """Write the report directory atomically, print its Markdown, and say where it went."""
    from . import report as writer
    writer.write(out, report, markdown, draw)
    print((out / "report.md").read_text())
    print(f"report written to {out}", file=sys.stderr)
