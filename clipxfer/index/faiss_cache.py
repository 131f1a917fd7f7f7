"""The FAISS file of an index folder as a cache of the SQLite vectors: loaded only when it belongs
to the database's current content, else rebuilt from the rows (see :mod:`clipxfer.index.layout`)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from . import store, vectors
from .layout import faiss_file, faiss_files, faiss_version
from .lock import writer_pid


def load_or_rebuild(folder: Path, conn, dim: int, trust_file: bool = True) -> tuple[object, str | None]:
    """The saved FAISS index when it belongs to the current database content, else one built
    from the SQLite rows (and saved for the next reader, where this folder is writable).

    Returns the index and the generation the file on disk is current for (None when it is not)."""
    conn.execute("BEGIN")  # one snapshot for the version and the rows
    try:
        meta = store.get_metadata(conn)
        expected = store.count(conn)
        generation = meta.get("generation")
        file = faiss_file(folder, meta.get("version", "0"))
        if trust_file and file.is_file():
            try:
                return vectors.load(file, generation, expected), generation
            except (vectors.StaleCache, OSError):  # rebuilt below
                pass
        ids, _, embeddings, _ = store.vectors(conn, dim)
    finally:
        conn.rollback()
    factory = vectors.factory_string(meta["index_type"], len(ids), dim)
    index = vectors.build(factory, embeddings, ids, dim)
    saved = _try_save(index, folder, conn, file, generation)
    return index, generation if saved else None


def current_factory(folder: Path, conn) -> str | None:
    """The factory string (``Flat``, ``HNSW32,Flat``...) of the saved FAISS index when it belongs to
    the database's current content, read from the file's header without faiss; None otherwise."""
    conn.execute("BEGIN")  # one snapshot for the version and the count
    try:
        meta = store.get_metadata(conn)
        count = store.count(conn)
    finally:
        conn.rollback()
    header = vectors.read_header(faiss_file(folder, meta.get("version", "0")))
    if header is None or header.get("generation") != meta.get("generation") or header.get("ntotal") != count:
        return None
    factory = header.get("factory")
    return factory if isinstance(factory, str) else None


def _try_save(index, folder: Path, conn, file: Path, generation: str | None) -> bool:
    """Save a rebuilt FAISS index for later readers: only where the folder is writable and no
    writer is at work (the writer saves its own), and only while the database is unchanged.
    True when it was saved.

    No lock is taken, so a reader never makes a writer wait or fail; a file saved just as a
    writer commits is named after an old version and carries an old generation, so it is
    never loaded, and the writer's next save removes it."""
    if generation is None or not os.access(folder, os.W_OK) or writer_pid(folder) is not None:
        return False
    saved = False
    try:
        if store.get_metadata(conn).get("generation") != generation:
            return False
        vectors.save(index, file, generation)
        saved = True
        for old in faiss_files(folder):  # older versions only: a writer may be saving a newer one
            if faiss_version(old) < faiss_version(file):
                old.unlink(missing_ok=True)
    except (OSError, sqlite3.Error):
        pass  # a cache that cannot be written only costs the next reader a rebuild
    return saved
