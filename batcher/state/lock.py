"""The lock of a state folder: one live run per output (``fcntl.flock``), naming its
holder. See :mod:`batcher.checkpoint`."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import orjson

from batcher.errors import ConfigError, LockHeld
from batcher.results import now_iso
from batcher.types import JSON

_LOCK_TRIES = 3
"""Tries to take a lock held for an instant by a status probe before giving up."""

# --- the lock -----------------------------------------------------------------------------


def _read_holder(fd: int) -> dict[str, JSON] | None:
    try:
        data = os.pread(fd, 4096, 0)
        value = orjson.loads(data) if data else None
    except (OSError, orjson.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _describe_holder(holder: Mapping[str, JSON] | None) -> str:
    if not holder:
        return "another process (holder unknown)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since "
            f"{holder.get('started_at')} (run_id {holder.get('run_id')})")


def _take_lock(state: Path, output: Path, run_id: str) -> int:
    path = state / "lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open lock file {path}: {exc.strerror or exc}") from exc
    for attempt in range(_LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if attempt == _LOCK_TRIES - 1:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockHeld(f"{output} is being written by {_describe_holder(holder)}; wait "
                               "for that run to finish or stop it first") from None
            # `status` holds a shared lock for an instant; don't mistake it for a live run.
            time.sleep(0.05)
    holder_info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": now_iso(),
                   "run_id": run_id}
    os.ftruncate(fd, 0)
    os.pwrite(fd, orjson.dumps(holder_info), 0)
    return fd


def _probe_lock(state: Path) -> tuple[bool, dict[str, JSON] | None]:
    """(held by a live process, holder info). Takes a shared flock for an instant and drops it."""
    try:
        fd = os.open(state / "lock", os.O_RDONLY)
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True, _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


