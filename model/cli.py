"""What every `python -m ...` command shares: one-line errors instead of tracebacks, clean interrupts, and
argparse types that refuse out-of-range numbers when the command line is parsed.

    def main(argv=None) -> int: ...
    if __name__ == "__main__":
        cli.run(main)

`run` maps a NextDeployError to `error: ...` (exit 2), Ctrl-C and SIGTERM to `interrupted` / `terminated`
(exit 130 / 143) after every `finally` block has run (temporary directories are removed), and a closed stdout
(`| head`) to a quiet exit.

Every CLI module also has `build_parser()`, which `main` calls, so that tests can walk every option of every
command. An option that accepts 0 says so in its help ("0: greedy", ">= 0"); every help states the default.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable

from .errors import NextDeployError


class Terminated(BaseException):
    """SIGTERM, raised so that `finally` blocks run. Not a KeyboardInterrupt: code that treats Ctrl-C as "stop
    this and carry on" (an interactive prompt) must not swallow a request to end the process."""


def _raise_terminated(signum, frame):
    # One request is enough: a second SIGTERM while cleanup runs must not cut the cleanup short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def run(main: Callable[[], int]) -> None:
    """Call `main()` and exit with its code; never shows a traceback for the user's own mistakes or signals."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = main()
    except SystemExit as e:   # argparse's --help and usage errors: their output may meet a closed pipe too
        code = e.code
    except NextDeployError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Terminated:
        print("\nterminated", file=sys.stderr)
        code = 143
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 141
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = 141
    if code == 141:
        # The reader went away (`| head`): point stdout at /dev/null so the exit-time flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


# ---- argparse types ---------------------------------------------------------------------------------


def _bounds_text(lo, hi, lo_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}]"


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse `type` for whole numbers in [lo, hi] (either bound may be None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            want = f"in {lo}..{hi}" if lo is not None and hi is not None else \
                (f">= {lo}" if lo is not None else f"<= {hi}")
            raise argparse.ArgumentTypeError(f"must be {want}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse `type` for finite numbers >= lo (> lo with lo_open) and <= hi. NaN and inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if lo is not None and (value < lo or (lo_open and value == lo)) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds_text(lo, hi, lo_open)}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse
