"""Filters beside meaning: path glob, modification time, image size.

They select rows of the index's SQLite table (which stores each file's path, mtime, width and height
since the first schema), giving the ids a search may return; the search applies them inside FAISS
(see :mod:`clipxfer.index.filtered`) so ``k`` results come back whenever ``k`` images pass.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import ClipxferError
from . import store


def parse_time(value: str | datetime | None, option: str) -> datetime | None:
    """An ISO date or date-time (``2024-05-01``, ``2024-05-01T18:30``; local time unless it names a
    zone) as an aware datetime; one clear error otherwise."""
    if value is None or isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise ClipxferError(
                f"{option} {value!r}: give a date as YYYY-MM-DD or a date-time as YYYY-MM-DDTHH:MM"
            ) from None
    if moment is not None and moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as the user's clock shows it
    return moment


def _check_size(value, option: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ClipxferError(f"{option} {value}: give a whole number of pixels, at least 1")
    return int(value)


@dataclass(frozen=True)
class Filters:
    """Conditions on indexed files; unset ones (None) let every file through.

    ``path`` is a glob (``*``, ``?``, ``[...]``; ``*`` also crosses ``/``) matched against the
    path relative to the indexed folder, or against the absolute path when it starts with ``/``.
    """

    path: str | None = None
    modified_after: datetime | None = None
    modified_before: datetime | None = None
    min_width: int | None = None
    min_height: int | None = None

    @classmethod
    def from_options(
        cls,
        path: str | None = None,
        modified_after: str | datetime | None = None,
        modified_before: str | datetime | None = None,
        min_width: int | None = None,
        min_height: int | None = None,
    ) -> "Filters":
        """Filters from command-line or API values, each checked with one clear error."""
        if path is not None and not str(path).strip():
            raise ClipxferError("--path '': give a glob such as 'holidays/*.jpg'")
        after = parse_time(modified_after, "--modified-after")
        before = parse_time(modified_before, "--modified-before")
        if after is not None and before is not None and after >= before:
            raise ClipxferError(
                f"--modified-after {after.isoformat()} is not before --modified-before {before.isoformat()}: "
                "no file can match"
            )
        return cls(path, after, before, _check_size(min_width, "--min-width"), _check_size(min_height, "--min-height"))

    @property
    def active(self) -> bool:
        """True when any condition is set."""
        return any(v is not None for v in (self.path, self.modified_after, self.modified_before,
                                           self.min_width, self.min_height))

    def allowed_ids(self, conn, root: Path) -> np.ndarray:
        """Sorted ids of the rows that pass (numeric conditions in SQL, the glob in Python)."""
        clauses, params = [], []
        if self.modified_after is not None:
            clauses.append("mtime_ns > ?")
            params.append(_ns(self.modified_after))
        if self.modified_before is not None:
            clauses.append("mtime_ns < ?")
            params.append(_ns(self.modified_before))
        if self.min_width is not None:
            clauses.append("width >= ?")
            params.append(self.min_width)
        if self.min_height is not None:
            clauses.append("height >= ?")
            params.append(self.min_height)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        ids = []
        absolute = self.path is not None and self.path.startswith("/")
        for item_id, path in conn.execute(f"SELECT id, path FROM items{where} ORDER BY id", params):
            if self.path is not None:
                rel = store.decode_path(path)
                name = str(root / rel) if absolute else rel
                if not fnmatch.fnmatchcase(name, self.path):
                    continue
            ids.append(item_id)
        return np.asarray(ids, dtype=np.int64)


NO_FILTERS = Filters()


def _ns(moment: datetime) -> int:
    return int(round(moment.astimezone(timezone.utc).timestamp() * 1e9))
