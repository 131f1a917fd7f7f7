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

# Lock descriptors held by this process. Forked children (the decode workers) close their
# copies at once, so a worker outliving a killed writer can never keep the index locked.
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


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
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ClipxferError(
                f"index {self.folder} is being updated by another process (pid {holder}); "
                "wait for it to finish or use another --index"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        _HELD_LOCK_FDS.add(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            _HELD_LOCK_FDS.discard(self.fd)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
