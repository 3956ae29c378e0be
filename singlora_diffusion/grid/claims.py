"""Who runs which cell: one lock file per cell, held with flock for as long as the cell runs.

Why flock and not "create claim.json, delete it when done": the kernel releases a flock when
its process dies, however it dies (kill -9, OOM killer, a node's power), so a crashed cell is
free again at once and no process has to guess from a heartbeat's age whether another is
alive. On a folder shared by several machines, Linux's NFS client maps flock onto NFS byte-
range locks, which the server frees when a client's lease lapses. A filesystem without locks
is refused with one line rather than risking two processes on one cell.

The lock file's text (host, pid, start) is for people (`ls cells/*/lock`); the lock is the fd.
A cell is done when its result.json exists (written atomically, last).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import BadInput

LOCK, RESULT = "lock", "result.json"


class Claim:
    """An exclusive hold on one cell's folder; release() (or the process's death) frees it."""

    def __init__(self, folder: Path, fd: int):
        self.folder, self._fd = folder, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the fd drops the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def is_done(folder: Path) -> bool:
    return (folder / RESULT).is_file()


def try_claim(folder: Path) -> Claim | None:
    """The cell for this process, or None when it is done or another process holds it."""
    if is_done(folder):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise BadInput(f"{folder}: the filesystem refuses file locks ({os.strerror(e.errno)}); the grid needs them "
                       f"so that two processes never run one cell: put --out on a local disk or NFS") from None
    if is_done(folder):  # finished between the check above and the lock
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode())
    return Claim(folder, fd)


def held(folder: Path) -> bool:
    """Whether some process holds this cell now (for the status line; racy by nature)."""
    lock = folder / LOCK
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
