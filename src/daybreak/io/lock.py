"""One process per run directory.

Two trainers in one run directory would write the same checkpoints, tokenizer and metrics and
damage each other's work, so a run holds `RUN_DIR/.daybreak.lock` for as long as it trains (rank 0
under torchrun: one lock per run). The lock is an exclusive `flock` on that file, and the file names
its holder (host, PID, start time): a second process is refused in one line naming it. The kernel
drops a `flock` when its process ends, however it ends (kill -9 included), so the lock of a killed
run is free again and the same command resumes; the file itself is never deleted (deleting a lock
file races with a process that has just opened it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from daybreak.errors import UserError

LOCK_NAME = ".daybreak.lock"

_held: dict[str, int] = {}  # resolved lock path -> fd, for the locks this process holds


def holder(run_dir: str | os.PathLike) -> str:
    """Who the lock file says holds (or last held) the run directory, in words."""
    try:
        h = json.loads((Path(run_dir) / LOCK_NAME).read_text())
        return f"PID {int(h['pid'])} on host {h['host']} (since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file is unreadable)"


def acquire(run_dir: str | os.PathLike) -> Path:
    """Hold `run_dir`'s lock (created with the directory if need be), or a UserError naming the holder.
    A lock this process already holds is kept (a second trainer in one process, e.g. a test)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    key = str(path.resolve())
    if key in _held:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise UserError(f"run.dir '{run_dir}' is in use by {holder(run_dir)}: one process per run directory; "
                        f"wait for it to end, or stop it (its checkpoint lets the same command resume)") from None
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[key] = fd
    return path


def held(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds `run_dir`'s lock."""
    return str((Path(run_dir) / LOCK_NAME).resolve()) in _held


def release(run_dir: str | os.PathLike) -> None:
    """Let go of `run_dir`'s lock if this process holds it (the file stays, naming its last holder)."""
    fd = _held.pop(str((Path(run_dir) / LOCK_NAME).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
