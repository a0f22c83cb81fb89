"""Atomic file writes: a reader never sees a half-written file, and an interrupted write leaves the old one."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from .errors import NextDeployError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def signals_deferred():
    """Ctrl-C or SIGTERM inside the block takes effect when it ends, so that a rename pair or a cleanup is never
    cut in half. (Blocking the signals would not do: the kernel may hand them to another thread.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:   # None: a handler installed outside Python, left alone
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should read like any saved file
        os.replace(tmp, path)
    finally:
        with signals_deferred():
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary directory beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        with signals_deferred():   # an interrupt between the two renames would leave `path` missing
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)


class OutputDirError(NextDeployError):
    """An --out directory that a command must not write into or replace."""


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(out: str | os.PathLike, *, what: str, ours: Callable[[Path], bool], overwrite: bool = False,
                     sources: Iterable[str | os.PathLike] = (), option: str = "--out", in_place: bool = False) -> Path:
    """Refuse an output directory whose replacement could destroy something the command did not create.

    `out` may not be, contain or lie inside any of `sources` (the command's inputs), whatever `overwrite` says,
    nor be or contain the current directory or the home directory. An existing non-empty directory is written
    only when `ours(out)` recognises it as an earlier output of the same command, or with `overwrite`.
    `in_place`: the command writes its own files into `out` rather than replacing the directory whole (train),
    so `out` may contain an input, and the current or home directory is refused only with `overwrite`.
    Returns `out` as a Path. `what` names the output in messages ("artifact", "training run").
    """
    path = Path(out)
    resolved = path.resolve()
    for source in sources:
        src = Path(source).resolve()
        # Written in place, the output harms an input it lies in (mixes into it), not one it contains.
        if _is_within(resolved, src) or (_is_within(src, resolved) and not in_place):
            relation = "is" if resolved == src else ("lies inside" if _is_within(resolved, src) else "contains")
            harm = "mix it into" if in_place else "destroy"
            raise OutputDirError(f"{option} {path} {relation} the input {source}; writing the {what} there would "
                                 f"{harm} it. Choose an {option} outside it")
    for keep, name in ((Path.cwd().resolve(), "the current directory"), (Path.home().resolve(), "your home directory")):
        if _is_within(keep, resolved) and (overwrite or not in_place):
            raise OutputDirError(f"{option} {path} is or contains {name}; choose a new directory for the {what}")
    if path.is_symlink() and not in_place:
        raise OutputDirError(f"{option} {path} is a symbolic link, which the {what} would replace; pass the "
                             f"directory it points to ({resolved}) or another {option}")
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{option} {path} exists and is not a directory; choose another {option}")
    if path.is_dir() and any(path.iterdir()) and not ours(path) and not overwrite:
        effect = "write into it anyway (files of the same names are replaced)" if in_place else \
            "replace the directory and everything in it"
        raise OutputDirError(f"{option} {path} exists and is not an earlier {what} of next-deploy; choose another "
                             f"{option}, or pass --overwrite to {effect}")
    return path
