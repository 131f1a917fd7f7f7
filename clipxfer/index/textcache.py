"""Text query embeddings cached on disk, so a repeated search skips the text encoder.

One SQLite file in clipxfer's cache folder, keyed by encoder id (plus its precision: bf16 and
fp32 embeddings differ slightly) and the exact query text.
"""

from __future__ import annotations

import sqlite3
from typing import Sequence

import numpy as np

from ..paths import cache_dir


def _connect() -> sqlite3.Connection:
    conn = sqlite3.connect(cache_dir() / "text_embeddings.sqlite", timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS text_embeddings ("
        " model_id TEXT NOT NULL, text TEXT NOT NULL, embedding BLOB NOT NULL, PRIMARY KEY (model_id, text))"
    )
    return conn


def cached_text_embeddings(encoder, texts: Sequence[str]) -> np.ndarray:
    """``encoder.encode_texts(texts)``, reading and filling the on-disk cache.

    A cache that cannot be opened or written (read-only home, full disk) only costs speed.
    """
    texts = list(texts)
    key = f"{encoder.id}@{getattr(encoder, 'dtype', '')}"
    found: dict[str, np.ndarray] = {}
    try:
        conn = _connect()
    except (sqlite3.Error, OSError):
        return encoder.encode_texts(texts)
    try:
        for text in set(texts):
            row = conn.execute(
                "SELECT embedding FROM text_embeddings WHERE model_id=? AND text=?", (key, text)
            ).fetchone()
            if row is not None and len(row[0]) == 4 * encoder.dim:
                found[text] = np.frombuffer(row[0], dtype=np.float32)
        missing = sorted(set(texts) - set(found))
        if missing:
            encoded = encoder.encode_texts(missing)
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
        found = dict(zip(texts, encoder.encode_texts(texts)))
    finally:
        conn.close()
    return np.stack([found[t] for t in texts]).astype(np.float32)
