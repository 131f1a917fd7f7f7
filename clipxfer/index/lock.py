"""The writer lock: one process at a time updates an index folder (``clipxfer index``, ingestion).

An ``flock`` on the folder's lock file, which holds the writer's pid for the error a second writer
gets and for readers that find an index still being built.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import ClipxferError
from .layout import LOCK_FILE

# Lock descriptors held by this process (index writer and label-file locks). Forked children (the
# decode workers) close their copies at once, so a child outliving a killed writer never keeps a lock.
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is its pid as written in the lock file."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def take_pid_lock(path: Path) -> int:
    """Open ``path`` (created if missing), take an exclusive non-blocking ``flock`` and write this
    process's pid into it; the descriptor to pass to :func:`release_pid_lock`. An ``flock`` dies with
    its process, so a killed holder never leaves a stale lock. Raises LockHeld, or OSError from open."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockHeld(holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD_LOCK_FDS.add(fd)
    return fd


def release_pid_lock(fd: int) -> None:
    """Release and close a lock taken by :func:`take_pid_lock`."""
    _HELD_LOCK_FDS.discard(fd)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def writer_pid(folder: Path) -> str | None:
    """The pid of the process updating the index in ``folder``, or None when none is."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)


class WriterLock:
    """Exclusive right to update one index folder; a second writer gets a clear error.

    An ``flock`` dies with its process, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.fd: int | None = None

    def __enter__(self) -> "WriterLock":
        try:
            self.fd = take_pid_lock(self.folder / LOCK_FILE)
        except LockHeld as held:
            raise ClipxferError(
                f"index {self.folder} is being updated by another process (pid {held.holder}); "
                "wait for it to finish or use another --index"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            release_pid_lock(self.fd)
            self.fd = None
