"""An image index: a folder holding SQLite metadata + vectors and a FAISS cache of the vectors.

Layout of an index folder::

    index.sqlite          rows (path, size, mtime, sha256, width, height, vectors) and meta
    vectors-<V>.faiss     FAISS IndexIDMap2 of the embeddings as of meta version V
    lock                  held (flock) by the one process updating the index

Consistency: SQLite is the single source of truth, written in batched transactions. Every
committed change increments ``meta.version`` and draws a new random ``meta.generation``; the
FAISS file records the generation it was built from and a checksum of its bytes, and is
written atomically. On open, the FAISS file is used only when its generation, count and
checksum match the database; anything else (a crash before the FAISS file was saved, a kill -9
at any point, a database deleted and built again, altered bytes) makes the FAISS index be
rebuilt from the SQLite rows and saved again. Scores a healthy index cannot produce (outside
[-1, 1] for unit vectors) also trigger a rebuild. So whatever moment a run is killed at, the
index loads with every committed file, and a re-run continues with the files not committed yet.

Reading: :mod:`clipxfer.index.index`; the FAISS cache: :mod:`clipxfer.index.faiss_cache`; updating:
:mod:`clipxfer.index.writer`, under the lock of :mod:`clipxfer.index.lock`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..paths import default_index_path

DB_FILE = "index.sqlite"
LOCK_FILE = "lock"


def resolve_index_path(path: str | os.PathLike | None) -> Path:
    """``path``, or the default index location (``CLIPXFER_INDEX`` or the data folder)."""
    return Path(path).expanduser() if path else default_index_path()


def faiss_file(folder: Path, version) -> Path:
    """The FAISS file for meta version ``version``."""
    return folder / f"vectors-{version}.faiss"


def faiss_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("vectors-*.faiss"))


def faiss_version(file: Path) -> int:
    try:
        return int(file.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1
