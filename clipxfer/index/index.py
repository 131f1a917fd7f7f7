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

Readers (search, info) open SQLite read-only and write nothing when the folder is not
writable, so an index on read-only media or owned by another user can still be searched. A
damaged database is reported in one line, with ``clipxfer index --rebuild`` to rebuild it from
the images (keeping every row that can still be read).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import math
import os
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..encoders.pipeline import DEFAULT_BATCH_SIZE, EncodedBatch, Failure, encode_files, file_sha256
from ..errors import ClipxferError
from ..images import find_images
from ..paths import default_index_path
from . import store, vectors

if TYPE_CHECKING:
    from ..encoders.base import Encoder, ImageEncoding

DB_FILE = "index.sqlite"
LOCK_FILE = "lock"


@dataclass(frozen=True)
class Hit:
    """One search result; ``path`` is absolute."""

    rank: int
    score: float
    path: Path
    id: int

    def to_dict(self) -> dict:
        """The stable JSON form: ``rank``, ``score``, ``path``."""
        return {"rank": self.rank, "score": round(self.score, 6), "path": str(self.path)}


@dataclass
class UpdateReport:
    """What one ``clipxfer index`` run did."""

    index: str
    root: str
    model_id: str
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[Failure] = field(default_factory=list)
    total: int = 0
    recovered: int = 0  # rows kept from a damaged database by --rebuild
    damaged_copy: str | None = None  # where --rebuild kept a damaged database it could not fully read

    def to_dict(self) -> dict:
        """The stable JSON form: counts, ``failed_count`` and ``failed`` as {path, reason} objects."""
        data = asdict(self)
        data["failed"] = [{"path": str(f.path), "reason": f.reason} for f in self.failed]
        data["failed_count"] = len(self.failed)
        return data


@dataclass(frozen=True)
class DuplicatePair:
    """Two indexed images whose embeddings have cosine similarity ``score``."""

    score: float
    a: Path
    b: Path

    def to_dict(self) -> dict:
        return {"score": round(self.score, 6), "a": str(self.a), "b": str(self.b)}


def resolve_index_path(path: str | os.PathLike | None) -> Path:
    """``path``, or the default index location (``CLIPXFER_INDEX`` or the data folder)."""
    return Path(path).expanduser() if path else default_index_path()


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


def _model_mismatch(folder: Path, index_model: str, spec: str, other: str) -> ClipxferError:
    return ClipxferError(
        f"index {folder} was built with {index_model}, not {other}: "
        f"use --model {spec} (or leave --model out), or another --index"
    )


def _faiss_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("vectors-*.faiss"))


def _faiss_version(file: Path) -> int:
    try:
        return int(file.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _rebuild_hint(folder: Path, root: str | None = None, model_spec: str | None = None) -> str:
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
    hint = _rebuild_hint(folder, found.meta.get("root"), found.meta.get("model_spec"))
    return ClipxferError(f"index {folder} is damaged ({reason}); {recover}: rebuild it with {hint}")


def _cannot_write(folder: Path, exc: BaseException) -> ClipxferError:
    why = getattr(exc, "strerror", None) or str(exc)
    return ClipxferError(
        f"cannot write index {folder} ({why}): it is read-only here; search and info still work, "
        "or give another --index to build one"
    )


def _disk_full(folder: Path) -> ClipxferError:
    return ClipxferError(
        f"disk full while writing index {folder}: the images indexed so far are kept; "
        "free some space and run the same command again to resume"
    )


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _sqlite_error(folder: Path, exc: sqlite3.Error) -> ClipxferError:
    """A SQLite error as one line: disk full, read-only, busy, or a damaged database."""
    code = store.error_code(exc)
    if code == sqlite3.SQLITE_FULL:
        return _disk_full(folder)
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return _cannot_write(folder, exc)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return ClipxferError(f"index {folder} is busy ({exc}): try again in a moment")
    return damaged_error(folder, str(exc))


def _reports_damage(method):
    """SQLite errors while reading an index become one line (see :func:`_sqlite_error`)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _sqlite_error(self.path, exc) from None

    return wrapper


def _check_search_options(k, min_score) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClipxferError(f"-k {k}: the number of results must be a whole number of at least 1")
    if min_score is not None and not math.isfinite(min_score):
        raise ClipxferError(f"--min-score {min_score}: give a number, a cosine similarity between -1 and 1")


def _scores_possible(index, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> bool:
    """False when FAISS returned scores that unit vectors cannot have (a damaged cache)."""
    found = ids >= 0
    limit = vectors.score_bound(index) * np.linalg.norm(queries, axis=1, keepdims=True)
    return bool(np.all(np.isfinite(scores[found])) and np.all(np.abs(scores) <= limit, where=found))


class Index:
    """An indexed image folder: search by text or image, near duplicates, stored vectors.

    Open an existing index with :meth:`open`; create or refresh one with :meth:`update`.
    """

    def __init__(self, folder: Path, conn, meta: dict[str, str]):
        self.path = Path(folder)
        self._conn = conn
        self._meta = meta
        self._faiss = None
        self._cache_generation: str | None = None  # set when the FAISS file on disk is current

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> "Index":
        """Open an existing index for reading (``None``: the default location)."""
        folder = resolve_index_path(path)
        if not (folder / DB_FILE).is_file():
            raise ClipxferError(f"no index at {folder}: build one with 'clipxfer index DIR --index {folder}'")
        try:
            conn = store.connect_readonly(folder / DB_FILE)
        except sqlite3.Error as exc:
            raise _sqlite_error(folder, exc) from None
        try:
            meta = store.get_meta(conn) if store.has_schema(conn) else None
            if meta is None or "model_id" not in meta:
                conn.close()
                pid = writer_pid(folder)
                if pid is not None:
                    raise ClipxferError(
                        f"index {folder} is being built by another process (pid {pid}): "
                        "try again when its first batch is saved"
                    )
                if meta is None:
                    raise ClipxferError(
                        f"index {folder} is empty or damaged (index.sqlite has no tables); nothing in it can be "
                        f"recovered: rebuild it with {_rebuild_hint(folder)}"
                    )
                raise ClipxferError(
                    f"index {folder} is incomplete (its first run stopped early): run 'clipxfer index' again"
                )
        except sqlite3.Error as exc:
            conn.close()
            raise _sqlite_error(folder, exc) from None
        return cls(folder, conn, meta)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- properties ----------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """Id of the encoder every vector in this index was made with."""
        return self._meta["model_id"]

    @property
    def model_spec(self) -> str:
        """The ``--model`` value that rebuilds :attr:`model_id`'s encoder."""
        from ..encoders.ids import spec_for_id

        return self._meta.get("model_spec") or spec_for_id(self.model_id)

    @property
    def root(self) -> Path:
        """The indexed folder (absolute)."""
        return Path(self._meta["root"])

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def index_type(self) -> str:
        """Requested index type: flat, hnsw, ivf or auto."""
        return self._meta["index_type"]

    @_reports_damage
    def __len__(self) -> int:
        return store.count(self._conn)

    # -- the FAISS cache -----------------------------------------------------------------
    def _vectors(self):
        """The FAISS index for the committed rows: the saved file if current, else rebuilt."""
        if self._faiss is None:
            self._faiss = self._load_or_rebuild()
        return self._faiss

    def _load_or_rebuild(self, trust_file: bool = True):
        """The saved FAISS index when it belongs to the current database content, else one built
        from the SQLite rows (and saved for the next reader, where this folder is writable)."""
        conn = self._conn
        conn.execute("BEGIN")  # one snapshot for the version and the rows
        try:
            meta = store.get_meta(conn)
            expected = store.count(conn)
            generation = meta.get("generation")
            file = self.path / f"vectors-{meta.get('version', '0')}.faiss"
            if trust_file and file.is_file():
                try:
                    index = vectors.load(file, generation, expected)
                    self._cache_generation = generation
                    return index
                except (vectors.StaleCache, OSError):  # rebuilt below
                    pass
            self._cache_generation = None
            ids, _, embeddings, _ = store.vectors(conn, self.dim)
        finally:
            conn.rollback()
        factory = vectors.factory_string(meta["index_type"], len(ids), self.dim)
        index = vectors.build(factory, embeddings, ids, self.dim)
        self._try_save_cache(index, file, generation)
        return index

    def _try_save_cache(self, index, file: Path, generation: str | None) -> None:
        """Save a rebuilt FAISS index for later readers: only where the folder is writable and no
        writer is at work (the writer saves its own), and only while the database is unchanged.

        No lock is taken, so a reader never makes a writer wait or fail; a file saved just as a
        writer commits is named after an old version and carries an old generation, so it is
        never loaded, and the writer's next save removes it."""
        if generation is None or not os.access(self.path, os.W_OK) or writer_pid(self.path) is not None:
            return
        try:
            if store.get_meta(self._conn).get("generation") != generation:
                return
            vectors.save(index, file, generation)
            self._cache_generation = generation
            for old in _faiss_files(self.path):  # older versions only: a writer may be saving a newer one
                if _faiss_version(old) < _faiss_version(file):
                    old.unlink(missing_ok=True)
        except (OSError, sqlite3.Error):
            pass  # a cache that cannot be written only costs the next reader a rebuild

    # -- reading -------------------------------------------------------------------------
    @_reports_damage
    def load_encoding(self) -> tuple[list[Path], "ImageEncoding"]:
        """Absolute paths and stored vectors of all items, by id (features = embeddings when
        the encoder has no separate probe features)."""
        _, paths, encoding = self.load_items()
        return paths, encoding

    def load_items(self) -> tuple[np.ndarray, list[Path], "ImageEncoding"]:
        """Row ids (the ``Hit.id`` values), absolute paths and stored vectors of all items, by id,
        in one snapshot."""
        from ..encoders.base import ImageEncoding

        feature_dim = int(self._meta["feature_dim"]) if self._meta.get("store_features") == "1" else None
        ids, paths, embeddings, features = store.vectors(self._conn, self.dim, feature_dim)
        embeddings = embeddings.copy()
        encoding = ImageEncoding(embeddings, embeddings if features is None else features)
        return ids, [self.root / p for p in paths], encoding

    def encoder(self, model: "str | Encoder | None" = None, device: str | None = None, precision: str | None = None):
        """The encoder matching this index; ``model`` (a spec or encoder) must be that model."""
        from ..encoders.registry import cached_encoder, precision_for_id

        if model is None or isinstance(model, str):
            encoder = cached_encoder(model or self.model_spec, device, precision_for_id(self.model_id, precision))
        else:
            encoder = model
        if encoder.id != self.model_id:
            raise _model_mismatch(self.path, self.model_id, self.model_spec, encoder.id)
        return encoder

    @_reports_damage
    def search_vectors(self, queries: np.ndarray, k: int = 10, min_score: float | None = None) -> list[list[Hit]]:
        """Top-``k`` hits for each query row (unit vectors in this index's space)."""
        _check_search_options(k, min_score)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.shape[1] != self.dim:
            raise ClipxferError(f"query vectors have {queries.shape[1]} dimensions, index {self.path} has {self.dim}")
        index = self._vectors()
        if index.ntotal == 0:
            return [[] for _ in queries]
        scores, ids = vectors.search(index, queries, k)
        if not _scores_possible(index, queries, scores, ids):
            # Only a damaged FAISS file gives these: rebuild it from SQLite and search again.
            self._faiss = index = self._load_or_rebuild(trust_file=False)
            scores, ids = vectors.search(index, queries, k)
        paths = store.paths_for(self._conn, {int(i) for i in ids.ravel() if i >= 0})
        results = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for score, item_id in zip(row_scores, row_ids):
                if item_id < 0 or int(item_id) not in paths:
                    continue  # no neighbour, or removed since the FAISS index was loaded
                if min_score is not None and score < min_score:
                    break
                hits.append(Hit(len(hits) + 1, float(score), self.root / paths[int(item_id)], int(item_id)))
            results.append(hits)
        return results

    def search_text(self, query: str, k: int = 10, model=None, min_score: float | None = None) -> list[Hit]:
        """Images best matching a text query (its embedding is cached on disk)."""
        from .textcache import cached_text_embeddings

        if not isinstance(query, str) or not query.strip():
            raise ClipxferError("the search query is empty: give some words describing the images to find")
        _check_search_options(k, min_score)
        encoder = self.encoder(model)
        return self.search_vectors(cached_text_embeddings(encoder, [query]), k, min_score)[0]

    def search_image(self, image, k: int = 10, model=None, min_score: float | None = None) -> list[Hit]:
        """Images most similar to ``image`` (a path, PIL image or uint8 array)."""
        _check_search_options(k, min_score)
        encoder = self.encoder(model)
        return self.search_vectors(encoder.encode_images([image]), k, min_score)[0]

    @_reports_damage
    def duplicates(self, threshold: float = 0.95) -> list[DuplicatePair]:
        """Pairs of items with cosine similarity >= ``threshold``, most similar first (exact)."""
        import faiss

        ids, paths, embeddings, _ = store.vectors(self._conn, self.dim)
        flat = faiss.IndexFlatIP(self.dim)
        flat.add(embeddings)
        pairs = []
        for start in range(0, len(ids), 4096):
            lims, scores, found = flat.range_search(embeddings[start : start + 4096], float(threshold))
            for row in range(len(lims) - 1):
                i = start + row
                for j, score in zip(found[lims[row] : lims[row + 1]], scores[lims[row] : lims[row + 1]]):
                    if j > i:
                        pairs.append(DuplicatePair(float(score), self.root / paths[i], self.root / paths[j]))
        pairs.sort(key=lambda p: (-p.score, str(p.a), str(p.b)))
        return pairs

    @_reports_damage
    def info(self) -> dict:
        """Model id, count, dimensions, index type, bytes on disk, last update (stable keys)."""
        self._meta = store.get_meta(self._conn)
        index = self._vectors()

        def iso(stamp: str | None):
            return datetime.fromtimestamp(float(stamp), timezone.utc).isoformat(timespec="seconds") if stamp else None

        return {
            "index": str(self.path),
            "root": str(self.root),
            "model_id": self.model_id,
            "model_spec": self.model_spec,
            "count": len(self),
            "dim": self.dim,
            "feature_dim": int(self._meta["feature_dim"]),
            "index_type": self.index_type,
            "faiss": vectors.describe(index),
            "bytes_on_disk": sum(p.stat().st_size for p in self.path.iterdir() if p.is_file()),
            "created": iso(self._meta.get("created")),
            "updated": iso(self._meta.get("updated")),
        }

    # -- writing -------------------------------------------------------------------------
    @classmethod
    def update(
        cls,
        root: str | os.PathLike,
        model: "str | Encoder | None" = None,
        path: str | os.PathLike | None = None,
        index_type: str | None = None,
        workers: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        fail_fast: bool = False,
        progress: bool = False,
        device: str | None = None,
        precision: str | None = None,
        rebuild: bool = False,
    ) -> UpdateReport:
        """Create or refresh the index at ``path`` for the images below ``root``.

        New and changed files are encoded, deleted ones removed, moved or renamed ones found by
        content hash and kept without re-encoding. Unreadable files and folders are reported in
        ``report.failed`` (with ``fail_fast``: the run stops with a ClipxferError after saving
        what it did); the indexed images of a folder that cannot be read are kept. ``model``
        defaults to the index's own model, or the default model for a new index; another model
        than the index's is refused. ``rebuild`` starts a new database from the rows of the old
        one that can still be read (for a damaged index), then updates it as usual.
        """
        from ..encoders.registry import load_encoder

        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise ClipxferError(f"{root} is not a folder: give the folder of images to index")
        folder = resolve_index_path(path)
        if index_type is not None:
            vectors.resolve_index_type(index_type, 0, 1)  # validate early
        if not (folder / DB_FILE).is_file() and (model is None or isinstance(model, str)):
            # A new index: load the model first, so a model that fails to load creates nothing.
            model = load_encoder(model, device, precision)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = WriterLock(folder)
            lock.__enter__()
        except OSError as exc:
            raise _cannot_write(folder, exc) from None
        try:
            for stray in folder.glob(".vectors-*.tmp-*"):  # left by a run killed while saving
                stray.unlink(missing_ok=True)
            recovered = _set_aside_for_rebuild(folder, root) if rebuild else None
            conn = store.connect(folder / DB_FILE, create=True)
            try:
                writer = _Writer(folder, conn, root, index_type, device, precision)
                if recovered is not None:
                    writer.restore(recovered)
                writer.open(model)
                return writer.run(workers, batch_size, fail_fast, progress)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise _sqlite_error(folder, exc) from None
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise _disk_full(folder) from None
            if exc.errno in _READ_ONLY_ERRNOS and exc.filename and Path(exc.filename).parent == folder:
                raise _cannot_write(folder, exc) from None
            raise
        finally:
            lock.__exit__(None, None, None)


@dataclass
class _Recovered:
    """Rows read back from a database set aside by ``--rebuild``."""

    salvage: "store.Salvage"
    set_aside: Path  # the old database, kept while it holds anything not recovered
    complete: bool


REQUIRED_META = ("model_id", "dim", "feature_dim", "store_features", "index_type", "root")


def _set_aside_for_rebuild(folder: Path, root: Path) -> _Recovered | None:
    """Move the database out of the way for ``--rebuild``, keeping what can be read from it."""
    db = folder / DB_FILE
    if not db.is_file():
        return None
    found = store.salvage(db)
    usable = all(key in found.meta for key in REQUIRED_META) and found.meta["root"] == str(root)
    if not usable:
        found = store.Salvage(error=found.error or "no usable meta")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = folder / f"{DB_FILE}.damaged-{stamp}"
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{db}{suffix}").exists():
            os.replace(f"{db}{suffix}", f"{aside}{suffix}")
    return _Recovered(found, aside, complete=found.error is None)


class _Writer:
    """One update run, holding the lock (see :meth:`Index.update`)."""

    def __init__(self, folder: Path, conn, root: Path, index_type: str | None, device, precision):
        self.folder, self.conn, self.root = folder, conn, root
        self.requested_type = index_type
        self.device, self.precision = device, precision

    def restore(self, recovered: _Recovered) -> None:
        """Fill the new database with the rows recovered by ``--rebuild``."""
        self.recovered = recovered
        if recovered.salvage.meta:
            store.restore(self.conn, recovered.salvage)
            store.bump_version(self.conn)
            self.conn.commit()
        if recovered.complete:  # everything was copied: the old file holds nothing more
            for suffix in ("", "-wal", "-shm"):
                Path(f"{recovered.set_aside}{suffix}").unlink(missing_ok=True)

    def open(self, model) -> None:
        """Create the meta rows or check them against this run; load the vectors."""
        from ..encoders.ids import spec_for_id
        from ..encoders.registry import load_encoder, precision_for_id

        meta = store.get_meta(self.conn)
        if "model_id" in meta and "generation" not in meta:
            store.bump_version(self.conn)  # an index from before generations: give it one
            self.conn.commit()
        if "model_id" in meta:
            if Path(meta["root"]) != self.root:
                raise ClipxferError(
                    f"index {self.folder} holds {meta['root']}, not {self.root}: use another --index for this folder"
                )
            spec = meta.get("model_spec") or spec_for_id(meta["model_id"])
            if model is None or isinstance(model, str):
                # A known mismatch is refused before paying for loading the model.
                if isinstance(model, str) and model in ("tiny", "lite") and spec_for_id(meta["model_id"]) != model:
                    raise _model_mismatch(self.folder, meta["model_id"], spec, model)
                self.encoder = load_encoder(model or spec, self.device, precision_for_id(meta["model_id"], self.precision))
            else:
                self.encoder = model
            if self.encoder.id != meta["model_id"]:
                raise _model_mismatch(self.folder, meta["model_id"], spec, self.encoder.id)
            if self.requested_type and self.requested_type != meta["index_type"]:
                store.set_meta(self.conn, index_type=self.requested_type)
                store.bump_version(self.conn)
                self.conn.commit()
        else:
            self.encoder = model if model is not None and not isinstance(model, str) else load_encoder(
                model, self.device, self.precision
            )
            enc = self.encoder
            store.set_meta(
                self.conn,
                schema=store.SCHEMA_VERSION,
                model_id=enc.id,
                model_spec=spec_for_id(enc.id),
                dim=enc.dim,
                feature_dim=enc.feature_dim,
                store_features=int(enc.feature_dim != enc.dim),
                index_type=self.requested_type or "flat",
                root=str(self.root),
                created=time.time(),
            )
            store.bump_version(self.conn)
            self.conn.commit()
        self.meta = store.get_meta(self.conn)
        self.dim = int(self.meta["dim"])
        self.store_features = self.meta["store_features"] == "1"
        reader = Index(self.folder, self.conn, self.meta)
        self.faiss = reader._vectors()
        self.cache_generation = reader._cache_generation  # the FAISS file on disk is current for it
        # After the index type changed, the final step rebuilds anyway.
        if vectors.describe(self.faiss) != vectors.factory_string(self.meta["index_type"], self.faiss.ntotal, self.dim):
            self.faiss = None

    def _commit(self) -> None:
        store.bump_version(self.conn)
        self.conn.commit()

    def _faiss_remove(self, ids) -> None:
        if self.faiss is None or not len(ids):
            return
        if vectors.can_update(self.faiss):
            self.faiss.remove_ids(np.asarray(list(ids), dtype=np.int64))
        else:
            self.faiss = None  # rebuilt from SQLite at the end

    def _faiss_add(self, embeddings: np.ndarray, ids: list[int]) -> None:
        if self.faiss is not None and self.faiss.is_trained:
            self.faiss.add_with_ids(np.ascontiguousarray(embeddings), np.asarray(ids, dtype=np.int64))
        else:
            self.faiss = None

    def run(self, workers, batch_size: int, fail_fast: bool, progress: bool) -> UpdateReport:
        report = UpdateReport(str(self.folder), str(self.root), self.encoder.id)
        recovered = getattr(self, "recovered", None)
        if recovered is not None:
            report.recovered = len(recovered.salvage.rows)
            report.damaged_copy = None if recovered.complete else str(recovered.set_aside)
        existing = {row.path: row for row in store.rows(self.conn)}
        unreadable: list[OSError] = []
        on_disk = {p.relative_to(self.root).as_posix(): p for p in find_images(self.root, on_error=unreadable.append)}
        report.total = len(on_disk)
        # A folder that cannot be listed is not a deleted one: its rows stay.
        kept_prefixes = []
        for exc in unreadable:
            folder = Path(exc.filename)
            report.failed.append(
                Failure(folder, f"cannot read folder ({exc.strerror or exc}); its indexed images are kept")
            )
            try:
                rel = folder.relative_to(self.root).as_posix() if folder != self.root else ""
            except ValueError:  # not below the root: keep everything rather than guess
                rel = ""
            kept_prefixes.append(rel + "/" if rel else "")

        new, changed = [], []
        for rel, full in on_disk.items():
            row = existing.get(rel)
            if row is None:
                new.append(rel)
                continue
            try:
                stat = full.stat()
            except OSError as exc:
                report.failed.append(Failure(full, f"cannot read ({exc.strerror})"))
                continue
            if (stat.st_size, stat.st_mtime_ns) == (row.size, row.mtime_ns):
                report.unchanged += 1
            else:
                changed.append(rel)
        vanished = [
            row
            for rel, row in existing.items()
            if rel not in on_disk and not any(rel.startswith(prefix) for prefix in kept_prefixes)
        ]

        new = self._apply_moves(new, vanished, on_disk, report)
        gone = [row.id for row in vanished if row.id not in self._moved_ids]
        if gone:
            store.delete(self.conn, gone)
            self._commit()
            self._faiss_remove(gone)
            report.removed = len(gone)

        self._encode(new, changed, on_disk, existing, workers, batch_size, fail_fast, progress, report)
        self._save()
        return report

    def _apply_moves(self, new: list[str], vanished, on_disk, report: UpdateReport) -> list[str]:
        """Match new paths to vanished rows by content hash; returns the truly new paths."""
        self._moved_ids: set[int] = set()
        if not vanished or not new:
            return new
        by_hash: dict[str, list] = {}
        for row in vanished:
            by_hash.setdefault(row.sha256, []).append(row)
        with ThreadPoolExecutor(4) as pool:
            hashes = list(pool.map(lambda rel: _try_hash(on_disk[rel]), new))
        remaining = []
        for rel, digest in zip(new, hashes):
            candidates = by_hash.get(digest) if digest else None
            if not candidates:
                remaining.append(rel)
                continue
            row = candidates.pop()
            stat = on_disk[rel].stat()
            store.move(self.conn, row.id, rel, stat.st_size, stat.st_mtime_ns)
            self._moved_ids.add(row.id)
            report.moved += 1
        if self._moved_ids:
            self._commit()
        return remaining

    def _encode(self, new, changed, on_disk, existing, workers, batch_size, fail_fast, progress, report) -> None:
        from tqdm import tqdm

        todo = sorted(new + changed)
        if not todo:
            return
        changed_set = set(changed)
        bar = tqdm(total=len(todo), desc="indexing", unit="img", file=sys.stderr, disable=not progress)
        paths = [on_disk[rel] for rel in todo]
        stream = encode_files(self.encoder, paths, batch_size=batch_size, workers=workers)
        try:
            for item in stream:
                if isinstance(item, Failure):
                    report.failed.append(item)
                    bar.update(1)
                    if fail_fast:
                        raise ClipxferError(
                            f"{item.path}: {item.reason} (stopped by --fail-fast; files encoded so far are kept)"
                        )
                    continue
                self._store_batch(item, changed_set, existing, report)
                bar.update(len(item.files))
        finally:
            stream.close()
            bar.close()
            if fail_fast and report.failed:
                self._save()

    def _store_batch(self, batch: EncodedBatch, changed: set[str], existing, report: UpdateReport) -> None:
        """Write one encoded batch to SQLite in one transaction, then to the FAISS index."""
        embeddings = batch.encoding.embeddings
        features = batch.encoding.features if self.store_features else None
        ids, replaced = [], []
        for row, info in enumerate(batch.files):
            rel = info.path.relative_to(self.root).as_posix()
            values = {
                "path": rel,
                "size": info.size,
                "mtime_ns": info.mtime_ns,
                "sha256": info.sha256,
                "width": info.width,
                "height": info.height,
            }
            feats = None if features is None else features[row]
            if rel in changed:
                item_id = existing[rel].id
                store.replace_content(self.conn, item_id, values, embeddings[row], feats)
                replaced.append(item_id)
                report.updated += 1
            else:
                item_id = store.insert(self.conn, values, embeddings[row], feats)
                report.added += 1
            ids.append(item_id)
        self._commit()
        self._faiss_remove(replaced)
        self._faiss_add(embeddings, ids)

    def _save(self) -> None:
        """Bring the FAISS index in line with SQLite (rebuilding when needed) and save it."""
        meta = store.get_meta(self.conn)
        version = meta["version"]
        target = self.folder / f"vectors-{version}.faiss"
        count = store.count(self.conn)
        factory = vectors.factory_string(meta["index_type"], count, self.dim)
        if self.faiss is None or vectors.describe(self.faiss) != factory or self.faiss.ntotal != count:
            ids, _, embeddings, _ = store.vectors(self.conn, self.dim)
            self.faiss = vectors.build(factory, embeddings, ids, self.dim)
        # Written unless the file there was loaded and verified for this very content: a stale
        # or damaged file under the same name is replaced.
        if self.cache_generation != meta["generation"] or not target.is_file():
            vectors.save(self.faiss, target, meta["generation"])
            self.cache_generation = meta["generation"]
        for old in _faiss_files(self.folder):
            if old != target:
                old.unlink(missing_ok=True)


def _try_hash(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None
