"""Atomic file writes: a reader never sees a half-written file, and an interrupted write leaves the old one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from .errors import NextDeployError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class OutputDirError(NextDeployError):
    """An --out directory that a command must not write into or replace."""


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(out: str | os.PathLike, *, what: str, ours: Callable[[Path], bool], overwrite: bool = False,
                     sources: Iterable[str | os.PathLike] = (), option: str = "--out") -> Path:
    """Refuse an output directory whose replacement could destroy something the command did not create.

    `out` may not be, contain or lie inside any of `sources` (the command's inputs), nor contain the current
    directory or the home directory, whatever `overwrite` says. An existing non-empty directory is replaced only
    when `ours(out)` recognises it as an earlier output of the same command, or with `overwrite`.
    Returns `out` as a Path. `what` names the output in messages ("artifact", "report").
    """
    path = Path(out)
    resolved = path.resolve()
    for source in sources:
        src = Path(source).resolve()
        if _is_within(resolved, src) or _is_within(src, resolved):
            relation = "is" if resolved == src else ("lies inside" if _is_within(resolved, src) else "contains")
            raise OutputDirError(f"{option} {path} {relation} the input {source}; writing the {what} there would "
                                 f"destroy it. Choose an {option} outside it")
    for keep, name in ((Path.cwd().resolve(), "the current directory"), (Path.home().resolve(), "your home directory")):
        if _is_within(keep, resolved):
            raise OutputDirError(f"{option} {path} is or contains {name}; choose a new directory for the {what}")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputDirError(f"{option} {path} exists and is not a directory; choose another {option}")
    if path.is_dir() and any(path.iterdir()) and not ours(path) and not overwrite:
        raise OutputDirError(f"{option} {path} exists and is not an earlier {what} of next-deploy; choose another "
                             f"{option}, or pass --overwrite to replace the directory and everything in it")
    return path
