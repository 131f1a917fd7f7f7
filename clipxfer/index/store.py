"""The SQLite side of an index: one row per image, with its vectors, plus a ``meta`` table.

SQLite is the index's source of truth. Each row holds the file's path relative to the indexed
folder, size, mtime, SHA-256, width and height, its embedding (float32 blob) and, for encoders
whose probe features differ from the embedding (``lite``), its features (float16 blob). The
``version`` in ``meta`` goes up with every committed change and ``generation`` becomes a new
random token with it; the FAISS file carries the generation it was built from, so a stale FAISS
file (after a crash, or left from an index whose database was deleted and built again) is
recognised and rebuilt.

Paths are stored losslessly: as TEXT when the file name is valid UTF-8, else as a BLOB of the
raw file-system bytes (``os.fsencode``), so any file name Linux allows can be indexed.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import quote

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


def encode_path(rel: str) -> str | bytes:
    """The stored form of a relative path: the text itself, or its raw bytes when the name is
    not valid UTF-8 (Python holds such names with surrogate escapes, which SQLite refuses)."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel)


def decode_path(value: str | bytes) -> str:
    """Inverse of :func:`encode_path`."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open the database for reading only: nothing in the index folder is written.

    A WAL database normally needs its ``-shm`` file (created by the first reader); where the
    folder cannot be written (read-only media, another user's index) SQLite is told the file is
    immutable instead, which is true for as long as nobody can write there.
    """
    uri = "file:" + quote(os.fsencode(Path(path).absolute()).decode("utf-8", "surrogateescape"))
    conn = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as exc:
        if error_code(exc) not in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY):
            raise
        conn.close()
    return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, timeout=30)


def error_code(exc: sqlite3.Error) -> int:
    """The primary SQLite result code of ``exc`` (SQLITE_FULL, SQLITE_CORRUPT, ...)."""
    return getattr(exc, "sqlite_errorcode", sqlite3.SQLITE_ERROR) & 0xFF


def has_schema(conn: sqlite3.Connection) -> bool:
    """True when the ``meta`` and ``items`` tables exist."""
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return {"meta", "items"} <= names


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


def get_metadata(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta"))


def set_metadata(conn: sqlite3.Connection, **values) -> None:
    """Set meta keys (within the caller's transaction)."""
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [(key, str(value)) for key, value in values.items()],
    )


def bump_version(conn: sqlite3.Connection) -> int:
    """Mark a change (within the caller's transaction): new version, updated time."""
    version = int(get_metadata(conn).get("version", "0")) + 1
    set_metadata(conn, version=version, generation=secrets.token_hex(16), updated=time.time())
    return version


def rows(conn: sqlite3.Connection) -> Iterator[Row]:
    """All rows without vectors, by id."""
    for item_id, path, *values in conn.execute(
        "SELECT id, path, size, mtime_ns, sha256, width, height FROM items ORDER BY id"
    ):
        yield Row(item_id, decode_path(path), *values)


def count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]


def insert(conn: sqlite3.Connection, values: dict, embedding: np.ndarray, features: np.ndarray | None) -> int:
    """Add a row; returns its id (ids are never reused, so FAISS ids stay unambiguous)."""
    cursor = conn.execute(
        "INSERT INTO items (path, size, mtime_ns, sha256, width, height, embedding, features)"
        " VALUES (:path, :size, :mtime_ns, :sha256, :width, :height, :embedding, :features)",
        {**values, "path": encode_path(values["path"]), "embedding": _f32(embedding), "features": _f16(features)},
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
    conn.execute("UPDATE items SET path=?, size=?, mtime_ns=? WHERE id=?", (encode_path(path), size, mtime_ns, item_id))


def delete(conn: sqlite3.Connection, ids: Iterable[int]) -> None:
    conn.executemany("DELETE FROM items WHERE id=?", [(int(i),) for i in ids])


def vectors(conn: sqlite3.Connection, dim: int, feature_dim: int | None = None):
    """``(ids, paths, embeddings, features or None)`` of all rows, by id, in one snapshot."""
    ids, paths, embeddings, features = [], [], [], []
    with_features = feature_dim is not None
    query = "SELECT id, path, embedding" + (", features" if with_features else "") + " FROM items ORDER BY id"
    for row in conn.execute(query):
        ids.append(row[0])
        paths.append(decode_path(row[1]))
        embeddings.append(row[2])
        if with_features:
            features.append(row[3])
    emb = np.frombuffer(b"".join(embeddings), dtype=np.float32).reshape(len(ids), dim)
    feats = None
    if with_features:
        feats = np.frombuffer(b"".join(features), dtype=np.float16).reshape(len(ids), feature_dim).astype(np.float32)
    return np.asarray(ids, dtype=np.int64), paths, emb, feats


def vectors_for(conn: sqlite3.Connection, ids: Iterable[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, embeddings)`` of the rows among ``ids`` still present, by id."""
    ids = sorted({int(i) for i in ids})
    found, blobs = [], []
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ",".join("?" * len(part))
        for item_id, blob in conn.execute(f"SELECT id, embedding FROM items WHERE id IN ({marks}) ORDER BY id", part):
            found.append(item_id)
            blobs.append(blob)
    embeddings = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(found), dim)
    return np.asarray(found, dtype=np.int64), embeddings


def sample_vectors(conn: sqlite3.Connection, dim: int, limit: int) -> np.ndarray:
    """Embeddings of up to ``limit`` rows spread evenly over the ids (all rows when fewer)."""
    ids = [row[0] for row in conn.execute("SELECT id FROM items ORDER BY id")]
    if len(ids) > limit:
        ids = [ids[i] for i in np.linspace(0, len(ids) - 1, limit).round().astype(int)]
    return vectors_for(conn, ids, dim)[1]


def paths_for(conn: sqlite3.Connection, ids: Iterable[int]) -> dict[int, str]:
    """id -> relative path for the ids still present."""
    ids = [int(i) for i in ids]
    found: dict[int, str] = {}
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ",".join("?" * len(part))
        found.update((i, decode_path(p)) for i, p in conn.execute(f"SELECT id, path FROM items WHERE id IN ({marks})", part))
    return found


def _f32(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=np.float32).tobytes()


def _f16(array: np.ndarray | None) -> bytes | None:
    return None if array is None else np.ascontiguousarray(array, dtype=np.float16).tobytes()


@dataclass
class Salvage:
    """What could be read back from a (possibly damaged) database."""

    meta: dict[str, str] = field(default_factory=dict)
    rows: list[tuple] = field(default_factory=list)  # full ``items`` rows, as stored
    error: str | None = None  # the first read error, None when everything was read


ITEM_COLUMNS = "id, path, size, mtime_ns, sha256, width, height, embedding, features"


def salvage(path: Path) -> Salvage:
    """Read whatever is readable from the database at ``path`` (read-only), row by row.

    Rows whose vectors do not have the meta's dimensions are left out; without a readable
    ``meta`` no row can be trusted (the model that made its vectors is unknown).
    """
    found = Salvage()
    try:
        conn = connect_readonly(path)
    except sqlite3.Error as exc:
        found.error = str(exc)
        return found
    try:
        found.meta = get_metadata(conn)
        dim = int(found.meta["dim"])
        feature_dim = int(found.meta["feature_dim"]) if found.meta.get("store_features") == "1" else None
        for row in conn.execute(f"SELECT {ITEM_COLUMNS} FROM items ORDER BY id"):
            embedding, features = row[7], row[8]
            if not isinstance(embedding, bytes) or len(embedding) != 4 * dim:
                continue
            if feature_dim is not None and (not isinstance(features, bytes) or len(features) != 2 * feature_dim):
                continue
            found.rows.append(tuple(row))
    except (sqlite3.Error, KeyError, ValueError) as exc:
        found.error = str(exc) if isinstance(exc, sqlite3.Error) else f"meta table incomplete ({exc})"
    finally:
        conn.close()
    return found


def restore(conn: sqlite3.Connection, salvaged: Salvage) -> None:
    """Write salvaged meta and rows into a fresh database (within the caller's transaction)."""
    set_metadata(conn, **{k: v for k, v in salvaged.meta.items() if k != "generation"})
    conn.executemany(f"INSERT INTO items ({ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", salvaged.rows)
