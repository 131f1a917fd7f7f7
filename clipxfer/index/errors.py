"""What goes wrong with an index folder, as one-line ``ClipxferError``s: a damaged database (with
the ``--rebuild`` command that recovers it), a read-only folder, a full disk, a busy database, an
index built with another model."""

from __future__ import annotations

import errno
import functools
import sqlite3
from pathlib import Path

from ..encoders.ids import switch_hint
from ..errors import ClipxferError
from . import store
from .layout import DB_FILE

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def model_mismatch(folder: Path, index_model: str, spec: str, other: str) -> ClipxferError:
    """The index was built with another encoder: name the option that fixes it (the precision when only that
    differs, else the model the index records)."""
    hint = switch_hint(index_model, other)
    if hint.startswith("--model"):
        hint = f"--model {spec}"
    return ClipxferError(
        f"index {folder} was built with {index_model}, not {other}: "
        f"use {hint} (or leave --model and --precision out), or another --index"
    )


def rebuild_hint(folder: Path, root: str | None = None, model_spec: str | None = None) -> str:
    """The quoted ``--rebuild`` command, with what to fill in where the database no longer says."""
    command = f"'clipxfer index {root or 'FOLDER'} --index {folder} --model {model_spec or 'SPEC'} --rebuild'"
    notes = ([] if root else ["FOLDER: the folder of images it indexed"]) + (
        [] if model_spec else ["SPEC: the model it was built with"]
    )
    return command + (f" ({'; '.join(notes)})" if notes else "")


def damaged_error(folder: Path, reason: str) -> ClipxferError:
    """The one line for a damaged database: what is wrong, what can be recovered, and how."""
    found = store.salvage(folder / DB_FILE)
    if found.meta.get("model_id") and found.rows:
        recover = f"{len(found.rows)} indexed images can still be read and are kept without re-encoding"
    else:
        recover = "nothing in it can be recovered, so every image will be encoded again"
    hint = rebuild_hint(folder, found.meta.get("root"), found.meta.get("model_spec"))
    return ClipxferError(f"index {folder} is damaged ({reason}); {recover}: rebuild it with {hint}")


def cannot_write(folder: Path, exc: BaseException) -> ClipxferError:
    why = getattr(exc, "strerror", None) or str(exc)
    return ClipxferError(
        f"cannot write index {folder} ({why}): it is read-only here; search and info still work, "
        "or give another --index to build one"
    )


def disk_full(folder: Path) -> ClipxferError:
    return ClipxferError(
        f"disk full while writing index {folder}: the images indexed so far are kept; "
        "free some space and run the same command again to resume"
    )


def sqlite_error(folder: Path, exc: sqlite3.Error) -> ClipxferError:
    """A SQLite error as one line: disk full, read-only, busy, or a damaged database."""
    code = store.error_code(exc)
    if code == sqlite3.SQLITE_FULL:
        return disk_full(folder)
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return cannot_write(folder, exc)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return ClipxferError(f"index {folder} is busy ({exc}): try again in a moment")
    return damaged_error(folder, str(exc))


def reports_damage(method):
    """SQLite errors while reading an index become one line (see :func:`sqlite_error`)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, exc) from None

    return wrapper
