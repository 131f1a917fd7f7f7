"""Building an index from embedding shards (``clipxfer index --from-embeddings``), streaming.

Rows go to the index's SQLite store shard batch by shard batch through :mod:`clipxfer.index.store`.
The FAISS side follows the index's own ``auto`` rule (:func:`clipxfer.index.vectors.factory_string`,
sized for the final count); when that is IVF-PQ it is trained on a seeded random sample read in
a first pass, and vectors are added batch by batch in the second, so memory holds the sample and
the compressed codes, never all float32 vectors. Keys become the index's paths (relative to the
source root recorded in the manifest); an item whose key is already indexed with the same
SHA-256 is skipped, with another SHA-256 replaced.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ClipxferError
from .shards import iter_embeddings, open_embeddings

# faiss: at least 39 training points per IVF centroid (fewer triggers its warning).
TRAIN_POINTS_PER_LIST = 40
TRAIN_SEED = 0


@dataclass
class IngestReport:
    """What one ingestion did."""

    index: str
    embeddings: str
    model_id: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    total: int = 0
    faiss: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def ingest(embeddings: str | os.PathLike, index_path=None, index_type: str | None = None, progress: bool = False) -> IngestReport:
    """Add the shards in ``embeddings`` to the index at ``index_path`` (created when missing).

    ``index_type`` (flat, hnsw, ivf, auto) defaults to the index's own type, ``auto`` for a new
    index. The index must hold the same encoder and source root as the shards.
    """
    from ..index import store, vectors
    from ..index.layout import DB_FILE, resolve_index_path
    from ..index.lock import WriterLock

    manifest = open_embeddings(embeddings)
    if index_type is not None:
        vectors.resolve_index_type(index_type, 0, 1)  # validate early
    folder = resolve_index_path(index_path)
    folder.mkdir(parents=True, exist_ok=True)
    root = manifest["source"].get("root", "")
    with WriterLock(folder):
        conn = store.connect(folder / DB_FILE, create=True)
        try:
            meta = _open_metadata(conn, store, folder, manifest, root, index_type)
            report = IngestReport(str(folder), str(embeddings), manifest["model_id"])
            existing = {row.path: (row.id, row.sha256) for row in store.rows(conn)}
            dim = manifest["dim"]
            final_count = len(existing) + manifest["count"]
            factory = vectors.factory_string(meta["index_type"], final_count, dim)
            # Streaming FAISS when starting empty; otherwise rebuilt from SQLite at the end.
            index = _empty_index(factory, dim, embeddings, manifest, progress) if not existing else None
            store_features = meta.get("store_features") == "1"
            index = _ingest_rows(conn, store, embeddings, existing, store_features, index, report, progress)
            report.total = store.count(conn)
            if index is None or index.ntotal != report.total:
                ids, _, emb, _ = store.vectors(conn, dim)
                rng = np.random.default_rng(TRAIN_SEED)
                sample = emb[np.sort(rng.choice(len(emb), size=min(len(emb), TRAIN_POINTS_PER_LIST * 4096), replace=False))]
                index = _empty_index(factory, dim, embeddings, manifest, progress, sample)
                index.add_with_ids(emb, ids)
            meta = store.get_metadata(conn)
            target = folder / f"vectors-{meta['version']}.faiss"
            vectors.save(index, target, meta["generation"])  # bound to the rows just committed
            for old in folder.glob("vectors-*.faiss"):
                if old != target:
                    old.unlink(missing_ok=True)
            report.faiss = factory
            return report
        finally:
            conn.close()


def _open_metadata(conn, store, folder: Path, manifest: dict, root: str, index_type: str | None) -> dict:
    meta = store.get_metadata(conn)
    if "model_id" in meta:
        if meta["model_id"] != manifest["model_id"]:
            raise ClipxferError(
                f"index {folder} was built with {meta['model_id']}, the shards with {manifest['model_id']}: use another --index"
            )
        if meta["root"] != root:
            raise ClipxferError(f"index {folder} holds {meta['root']}, the shards {root}: use another --index")
        if index_type and index_type != meta["index_type"]:
            store.set_metadata(conn, index_type=index_type)
    else:
        store.set_metadata(
            conn,
            schema=store.SCHEMA_VERSION,
            model_id=manifest["model_id"],
            model_spec=manifest["model_spec"],
            dim=manifest["dim"],
            feature_dim=manifest["feature_dim"],
            store_features=int(bool(manifest["features"])),
            index_type=index_type or "auto",
            root=root,
            created=time.time(),
        )
    store.bump_version(conn)
    conn.commit()
    return store.get_metadata(conn)


def _empty_index(factory: str, dim: int, embeddings, manifest: dict, progress: bool, sample: np.ndarray | None = None):
    """An empty ``IDMap2`` of ``factory``, trained (IVF) on a seeded sample of the shards."""
    import faiss

    index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexIVFPQ):
        # Polysemous training only reorders PQ codes for Hamming pre-filtering, which search never
        # uses (polysemous_ht = 0); it took 88 of 92 s of a 12k-vector ingestion here.
        inner.do_polysemous_training = False
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist
        if sample is None:
            sample = _training_sample(embeddings, manifest["count"], TRAIN_POINTS_PER_LIST * nlist, dim)
        if progress:
            print(f"training {factory} on {len(sample):,} vectors", file=sys.stderr)
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def _training_sample(embeddings, count: int, wanted: int, dim: int) -> np.ndarray:
    """``wanted`` rows drawn uniformly (seeded) from all shards in one streaming pass."""
    wanted = min(wanted, count)
    chosen = np.sort(np.random.default_rng(TRAIN_SEED).choice(count, size=wanted, replace=False))
    sample = np.empty((wanted, dim), np.float32)
    filled, offset = 0, 0
    for batch in iter_embeddings(embeddings):
        rows = len(batch.keys)
        end = np.searchsorted(chosen, offset + rows)
        picks = chosen[filled:end] - offset
        sample[filled:end] = batch.embeddings[picks]
        filled, offset = end, offset + rows
    return sample[:filled]


def _ingest_rows(conn, store, embeddings, existing: dict, store_features: bool, index, report: IngestReport, progress: bool):
    """Insert every shard row; returns ``index`` with the new vectors added, or None when it
    can no longer be kept in step (a vector was replaced) and must be rebuilt."""
    from tqdm import tqdm

    bar = tqdm(total=open_embeddings(embeddings)["count"], desc="ingesting", unit="vec", file=sys.stderr, disable=not progress)
    try:
        for batch in iter_embeddings(embeddings):
            ids, rows = [], []
            for row, key in enumerate(batch.keys):
                values = {
                    "path": key,
                    "size": int(batch.sizes[row]),
                    "mtime_ns": 0,  # not known for items that were not files; a re-index re-hashes them
                    "sha256": batch.sha256[row],
                    "width": int(batch.widths[row]),
                    "height": int(batch.heights[row]),
                }
                features = batch.features[row] if store_features and batch.features is not None else None
                found = existing.get(key)
                if found is None:
                    item_id = store.insert(conn, values, batch.embeddings[row], features)
                    existing[key] = (item_id, values["sha256"])
                    report.added += 1
                elif found[1] != values["sha256"]:
                    store.replace_content(conn, found[0], values, batch.embeddings[row], features)
                    report.updated += 1
                    index = None  # a replaced vector: FAISS is rebuilt from SQLite at the end
                    continue
                else:
                    report.unchanged += 1
                    continue
                ids.append(item_id)
                rows.append(row)
            store.bump_version(conn)
            conn.commit()
            if index is not None and ids:
                index.add_with_ids(np.ascontiguousarray(batch.embeddings[rows]), np.asarray(ids, dtype=np.int64))
            bar.update(len(batch.keys))
    finally:
        bar.close()
    return index
