"""Creating and refreshing an index: one run under the writer lock (:meth:`clipxfer.index.Index.update`).

The run compares the folder with the rows: new and changed files are encoded and committed batch by
batch, deleted ones removed, moved ones found by content hash; the FAISS cache follows and is saved
at the end (see :mod:`clipxfer.index.layout` for why a run killed at any moment loses nothing
committed). ``--rebuild`` first sets a damaged database aside and starts from the rows it still holds.
"""

from __future__ import annotations

import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..encoders.pipeline import EncodedBatch, Failure, encode_files, file_sha256
from ..errors import ClipxferError
from ..images import find_images
from ..progress import progress_bar
from . import faiss_cache, store, vectors
from .errors import FULL_ERRNOS, READ_ONLY_ERRNOS, cannot_write, disk_full, model_mismatch, sqlite_error
from .layout import DB_FILE, faiss_file, faiss_files, resolve_index_path
from .lock import WriterLock
from .results import UpdateReport

if TYPE_CHECKING:
    from ..encoders.base import Encoder


def update_index(
    root: str | os.PathLike,
    model: "str | Encoder | None",
    path: str | os.PathLike | None,
    index_type: str | None,
    workers: int | None,
    batch_size: int,
    fail_fast: bool,
    progress: bool,
    device: str | None,
    precision: str | None,
    rebuild: bool,
) -> UpdateReport:
    """Create or refresh the index at ``path`` for the images below ``root`` (see :meth:`Index.update`)."""
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
        raise cannot_write(folder, exc) from None
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
        raise sqlite_error(folder, exc) from None
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            raise disk_full(folder) from None
        if exc.errno in READ_ONLY_ERRNOS and exc.filename and Path(exc.filename).parent == folder:
            raise cannot_write(folder, exc) from None
        raise
    finally:
        lock.__exit__(None, None, None)


@dataclass
class _Recovered:
    """Rows read back from a database set aside by ``--rebuild``."""

    salvage: "store.Salvage"
    set_aside: Path  # the old database, kept while it holds anything not recovered
    complete: bool


REQUIRED_METADATA = ("model_id", "dim", "feature_dim", "store_features", "index_type", "root")


def _set_aside_for_rebuild(folder: Path, root: Path) -> _Recovered | None:
    """Move the database out of the way for ``--rebuild``, keeping what can be read from it."""
    db = folder / DB_FILE
    if not db.is_file():
        return None
    found = store.salvage(db)
    usable = all(key in found.meta for key in REQUIRED_METADATA) and found.meta["root"] == str(root)
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

        meta = store.get_metadata(self.conn)
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
                    raise model_mismatch(self.folder, meta["model_id"], spec, model)
                self.encoder = load_encoder(model or spec, self.device, precision_for_id(meta["model_id"], self.precision))
            else:
                self.encoder = model
            if self.encoder.id != meta["model_id"]:
                raise model_mismatch(self.folder, meta["model_id"], spec, self.encoder.id)
            if self.requested_type and self.requested_type != meta["index_type"]:
                store.set_metadata(self.conn, index_type=self.requested_type)
                store.bump_version(self.conn)
                self.conn.commit()
        else:
            self.encoder = model if model is not None and not isinstance(model, str) else load_encoder(
                model, self.device, self.precision
            )
            enc = self.encoder
            store.set_metadata(
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
        self.meta = store.get_metadata(self.conn)
        self.dim = int(self.meta["dim"])
        self.store_features = self.meta["store_features"] == "1"
        # cache_generation: the generation the FAISS file on disk is current for
        self.faiss, self.cache_generation = faiss_cache.load_or_rebuild(self.folder, self.conn, self.dim)
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
        todo = sorted(new + changed)
        if not todo:
            return
        changed_set = set(changed)
        bar = progress_bar(len(todo), "indexing", "img", progress)
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
        meta = store.get_metadata(self.conn)
        version = meta["version"]
        target = faiss_file(self.folder, version)
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
        for old in faiss_files(self.folder):
            if old != target:
                old.unlink(missing_ok=True)


def _try_hash(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None
