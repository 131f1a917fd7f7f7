"""Text query embeddings cached on disk, so a repeated search loads no model at all.

One SQLite file in clipxfer's cache folder (``CLIPXFER_CACHE``), keyed by the model's weights id
and the exact query text. The id leaves out the ``@int8`` mark: int8 runs the image tower only,
so the text vectors are the same. Many processes may read and fill it at once: SQLite in WAL mode
serialises the writers, and ``INSERT OR REPLACE`` of the same key writes the same vector.
"""

from __future__ import annotations

import sqlite3
from typing import Callable, Sequence

import numpy as np

from ..encoders.ids import weights_id
from ..paths import cache_dir

CACHE_FILE = "text_embeddings.sqlite"


def _connect() -> sqlite3.Connection:
    conn = sqlite3.connect(cache_dir() / CACHE_FILE, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS text_embeddings ("
        " model_id TEXT NOT NULL, text TEXT NOT NULL, embedding BLOB NOT NULL, PRIMARY KEY (model_id, text))"
    )
    return conn


def cached_texts(model_id: str, dim: int, texts: Sequence[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """Embeddings of ``texts`` for model ``model_id`` (``dim`` wide): from the on-disk cache, with
    ``encode`` called (and its vectors stored) only for the texts not cached yet.

    A cache that cannot be opened or written (read-only home, full disk) only costs speed.
    """
    texts = list(texts)
    key = weights_id(model_id)
    found: dict[str, np.ndarray] = {}
    try:
        conn = _connect()
    except (sqlite3.Error, OSError):
        return np.asarray(encode(texts), np.float32)
    try:
        for text in set(texts):
            row = conn.execute(
                "SELECT embedding FROM text_embeddings WHERE model_id=? AND text=?", (key, text)
            ).fetchone()
            if row is not None and len(row[0]) == 4 * dim:
                found[text] = np.frombuffer(row[0], dtype=np.float32)
        missing = sorted(set(texts) - set(found))
        if missing:
            encoded = encode(missing)
            for text, vector in zip(missing, encoded):
                found[text] = vector
            try:
                with conn:
                    conn.executemany(
                        "INSERT OR REPLACE INTO text_embeddings (model_id, text, embedding) VALUES (?, ?, ?)",
                        [(key, t, np.asarray(found[t], np.float32).tobytes()) for t in missing],
                    )
            except (sqlite3.Error, UnicodeEncodeError):
                pass
    except (sqlite3.Error, UnicodeEncodeError):
        found = dict(zip(texts, encode(texts)))
    finally:
        conn.close()
    return np.stack([found[t] for t in texts]).astype(np.float32)


def cached_text_embeddings(encoder, texts: Sequence[str]) -> np.ndarray:
    """``encoder.encode_texts(texts)``, reading and filling the on-disk cache."""
    return cached_texts(encoder.id, encoder.dim, texts, encoder.encode_texts)
