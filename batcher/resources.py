"""What the machine allows a run: open files (``ulimit -n``) and disk space, checked and
explained before they run out, and the OS errors of running out turned into messages."""

from __future__ import annotations

import errno
import os
import resource
import shutil
from pathlib import Path

from batcher.errors import Aborted, ConfigError

FD_RESERVE = 32
"""Descriptors kept free beside the connection pool: the state's journal, lock and parts,
Parquet readers, the price table's imports, the loop's own pipes and a thread pool."""


class OutOfSpace(Aborted):
    """The disk holding the output or its state is full (exit 3; rerun once space is freed)."""


class OutOfFiles(Aborted):
    """The process ran out of file descriptors (exit 3; rerun resumes)."""


def _open_now() -> int:
    """Descriptors this process holds now (a fair guess where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 16


def fit_open_files(concurrency: int) -> tuple[int, str | None]:
    """The pool size the open-file limit allows for ``concurrency`` connections.

    Raises the soft limit toward the hard one when it is too low. When even the hard limit is
    too low, returns a smaller pool and a warning naming the limit; when it leaves no room for
    a single connection, raises :class:`ConfigError`. Returns ``(pool size, warning or None)``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = _open_now() + FD_RESERVE + concurrency
    if soft == resource.RLIM_INFINITY or soft >= need:
        return concurrency, None
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft >= need:
        return concurrency, None
    room = soft - _open_now() - FD_RESERVE
    if room < 1:
        raise ConfigError(
            f"the open-file limit (ulimit -n) is {soft}, too low to open even one connection "
            f"beside batcher's own files; raise it (ulimit -n {need}) and run again")
    return room, (f"--concurrency {concurrency} needs about {need} open files but the limit "
                  f"(ulimit -n) is {soft} (hard limit {hard}); running {room} connections at "
                  f"once instead. Raise it with `ulimit -n {need}` for the full pool")


def _used_bytes(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def explain_os_error(exc: OSError, output: Path, state_dir: Path) -> Aborted | None:
    """The user-facing error for running out of disk space or file descriptors, or None for
    other OS errors. Full disk: names the path and how much space to free."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = Path(exc.filename) if exc.filename else state_dir
        folder = output.parent if output.parent.exists() else Path(".")
        free = shutil.disk_usage(folder).free
        # Finishing writes the output once more beside the parts it merges.
        need = max(2 * _used_bytes([output, state_dir]), 16 * 2**20)
        return OutOfSpace(
            f"the disk is full writing {where} ({_size(free)} free on the disk of "
            f"{folder.resolve()}); free at least {_size(need)} there and rerun the same command "
            "to resume: every answer already saved is kept")
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return OutOfFiles(
            f"ran out of open files (limit {soft}, see `ulimit -n`) at {exc.filename or 'a socket'}; "
            "lower --concurrency or raise the limit, then rerun the same command to resume: "
            "every answer already saved is kept")
    return None


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TB"
