"""Building an index from embedding shards (``clipxfer index --from-embeddings``), streaming.

Rows go to the index's SQLite store shard batch by shard batch through :mod:`clipxfer.index.store`.
The FAISS side follows the index's own ``auto`` rule (:func:`clipxfer.index.vectors.factory_string`,
sized for the final count); when that is IVF-PQ it is trained on a seeded random sample read in
a first pass, and vectors are added batch by batch in the second, so memory holds the sample and
the compressed codes, never all float32 vectors. Keys become the index's paths (relative to the
source root recorded in the manifest); an item whose key is already indexed with the same
SHA-256 is skipped, with another SHA-256 replaced.

Nothing is written before every shard has been checked against the manifest (its own encoder id,
vector widths, row count, keys) and the manifest against the target index (encoder id, widths,
root), so a foreign or damaged shard is one line and the index is left as it was.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ClipxferError
from .shards import FORMAT, iter_embeddings, keys_of, need, open_embeddings, shard_metadata, unsafe_key

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
    check_shards(embeddings, manifest)
    folder = resolve_index_path(index_path)
    folder.mkdir(parents=True, exist_ok=True)
    root = str(manifest["source"].get("root", ""))
    with WriterLock(folder):
        conn = store.connect(folder / DB_FILE, create=True)
        try:
            _check_target(store.get_metadata(conn), folder, manifest, root)
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


def check_shards(embeddings: str | os.PathLike, manifest: dict) -> None:
    """Each shard the manifest lists, read from its own footer and key column: a clipxfer shard
    of the manifest's encoder, vectors ``dim`` (and ``feature_dim``) wide, as many rows as it
    says, keys that are names below the source root. One line naming the shard otherwise."""
    pa = need("pyarrow")
    pq = need("pyarrow.parquet")

    folder = Path(embeddings)
    dim, feature_dim, model_id = manifest["dim"], manifest["feature_dim"], manifest["model_id"]
    if manifest["features"] != (feature_dim != dim):
        raise ClipxferError(
            f"{folder}/manifest.json: 'features' is {manifest['features']} with dim {dim} and feature_dim {feature_dim} "
            "(features are stored exactly when the two differ): the manifest was edited; rebuild it with 'clipxfer embed'"
        )
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise ClipxferError(f"{path}: listed in the manifest but missing; run 'clipxfer embed' again to redo it")
        meta = shard_metadata(path)
        if meta.get("format") != FORMAT:
            raise ClipxferError(f"{path}: not a clipxfer embedding shard; remove it or use another --from-embeddings")
        if meta.get("model_id") != model_id:
            raise ClipxferError(
                f"{path} holds embeddings of {meta.get('model_id')}, the manifest says {model_id}: "
                "shards of different encoders cannot share an index; embed them again or use another folder"
            )
        schema = pq.read_schema(path)
        widths = {}
        for column in ("embedding", "features"):
            if column in schema.names:
                kind = schema.field(column).type
                widths[column] = kind.list_size if pa.types.is_fixed_size_list(kind) else None
        wanted = {"embedding": dim, **({"features": feature_dim} if manifest["features"] else {})}
        if widths != wanted:
            raise ClipxferError(
                f"{path}: vectors {_widths(widths)}, the manifest says {_widths(wanted)} ({model_id}): "
                "the shard is from another encoder or the manifest was edited; embed again into a new folder"
            )
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows != meta.get("count"):
            raise ClipxferError(f"{path}: {rows} rows, its metadata says {meta.get('count')}: a damaged shard; embed it again")
        columns = [c for c in ("key", "key_bytes") if c in schema.names]
        for key in keys_of(pq.read_table(path, columns=columns)):
            reason = unsafe_key(key) if isinstance(key, str) else "missing"
            if reason:
                raise ClipxferError(f"{path}: key {key!r} {reason}: keys name items below the source root, not other files")


def _widths(widths: dict) -> str:
    return ", ".join(f"{name} {width}" for name, width in widths.items()) or "missing"


def _check_target(meta: dict, folder: Path, manifest: dict, root: str) -> None:
    """The existing index at ``folder`` (its metadata ``meta``) must hold this encoder, widths and root."""
    if "model_id" not in meta:
        return
    if meta["model_id"] != manifest["model_id"]:
        raise ClipxferError(
            f"index {folder} was built with {meta['model_id']}, the shards with {manifest['model_id']}: use another --index"
        )
    for name in ("dim", "feature_dim"):
        if str(meta.get(name)) != str(manifest[name]):
            raise ClipxferError(
                f"index {folder} has {name} {meta.get(name)}, the shards {manifest[name]} (same id {meta['model_id']}): "
                "the manifest was edited; use another --index or embed again"
            )
    if meta["root"] != root:
        raise ClipxferError(f"index {folder} holds {meta['root']}, the shards {root}: use another --index")


def _open_metadata(conn, store, folder: Path, manifest: dict, root: str, index_type: str | None) -> dict:
    meta = store.get_metadata(conn)
    if "model_id" in meta:
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
