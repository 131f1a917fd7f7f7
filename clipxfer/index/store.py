"""The SQLite side of an index: one row per image, with its vectors, plus a ``meta`` table.

SQLite is the index's source of truth. Each row holds the file's path relative to the indexed
folder, size, mtime, SHA-256, width and height, its embedding (float32 blob) and, for encoders
whose probe features differ from the embedding (``lite``), its features (float16 blob). The
``version`` in ``meta`` goes up with every committed change, and the FAISS file carries the
version it was saved at, so a stale FAISS file (after a crash) is recognised and rebuilt.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    features BLOB
);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (sha256);
"""


@dataclass(frozen=True)
class Row:
    """One indexed file as stored (``path`` relative to the index root, POSIX separators)."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int


def connect(path: Path, create: bool = False) -> sqlite3.Connection:
    """Open the database; ``create`` (the writer) also sets up WAL mode and the schema.

    In WAL mode readers never block the writer and see the last committed batch.
    """
    conn = sqlite3.connect(path, timeout=30)
    if create:
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed batch survives a process crash (kill -9); only a power
        # loss can drop the last commits, and the database stays consistent either way.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        conn.commit()
    return conn


def get_meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta"))


def set_meta(conn: sqlite3.Connection, **values) -> None:
    """Set meta keys (within the caller's transaction)."""
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [(key, str(value)) for key, value in values.items()],
    )


def bump_version(conn: sqlite3.Connection) -> int:
    """Mark a change (within the caller's transaction): new version, updated time."""
    version = int(get_meta(conn).get("version", "0")) + 1
    set_meta(conn, version=version, updated=time.time())
    return version


def rows(conn: sqlite3.Connection) -> Iterator[Row]:
    """All rows without vectors, by id."""
    for values in conn.execute("SELECT id, path, size, mtime_ns, sha256, width, height FROM items ORDER BY id"):
        yield Row(*values)


def count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]


def insert(conn: sqlite3.Connection, values: dict, embedding: np.ndarray, features: np.ndarray | None) -> int:
    """Add a row; returns its id (ids are never reused, so FAISS ids stay unambiguous)."""
    cursor = conn.execute(
        "INSERT INTO items (path, size, mtime_ns, sha256, width, height, embedding, features)"
        " VALUES (:path, :size, :mtime_ns, :sha256, :width, :height, :embedding, :features)",
        {**values, "embedding": _f32(embedding), "features": _f16(features)},
    )
    return cursor.lastrowid


def replace_content(conn: sqlite3.Connection, item_id: int, values: dict, embedding, features) -> None:
    """New content for an existing path (same id)."""
    conn.execute(
        "UPDATE items SET size=:size, mtime_ns=:mtime_ns, sha256=:sha256, width=:width, height=:height,"
        " embedding=:embedding, features=:features WHERE id=:id",
        {**values, "id": item_id, "embedding": _f32(embedding), "features": _f16(features)},
    )


def move(conn: sqlite3.Connection, item_id: int, path: str, size: int, mtime_ns: int) -> None:
    """Same content under a new path: the vectors stay."""
    conn.execute("UPDATE items SET path=?, size=?, mtime_ns=? WHERE id=?", (path, size, mtime_ns, item_id))


def delete(conn: sqlite3.Connection, ids: Iterable[int]) -> None:
    conn.executemany("DELETE FROM items WHERE id=?", [(int(i),) for i in ids])


def vectors(conn: sqlite3.Connection, dim: int, feature_dim: int | None = None):
    """``(ids, paths, embeddings, features or None)`` of all rows, by id, in one snapshot."""
    ids, paths, embeddings, features = [], [], [], []
    with_features = feature_dim is not None
    query = "SELECT id, path, embedding" + (", features" if with_features else "") + " FROM items ORDER BY id"
    for row in conn.execute(query):
        ids.append(row[0])
        paths.append(row[1])
        embeddings.append(row[2])
        if with_features:
            features.append(row[3])
    emb = np.frombuffer(b"".join(embeddings), dtype=np.float32).reshape(len(ids), dim)
    feats = None
    if with_features:
        feats = np.frombuffer(b"".join(features), dtype=np.float16).reshape(len(ids), feature_dim).astype(np.float32)
    return np.asarray(ids, dtype=np.int64), paths, emb, feats


def paths_for(conn: sqlite3.Connection, ids: Iterable[int]) -> dict[int, str]:
    """id -> relative path for the ids still present."""
    ids = [int(i) for i in ids]
    found: dict[int, str] = {}
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ",".join("?" * len(part))
        found.update(conn.execute(f"SELECT id, path FROM items WHERE id IN ({marks})", part))
    return found


def _f32(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=np.float32).tobytes()


def _f16(array: np.ndarray | None) -> bytes | None:
    return None if array is None else np.ascontiguousarray(array, dtype=np.float16).tobytes()
