"""``export-embeddings``: an index's stored vectors written out as embedding shards."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ClipxferError
from . import shards
from .shards import EncoderInfo, ShardData

DEFAULT_ROWS_PER_SHARD = 100_000


def export_embeddings(index_path, out: str | os.PathLike, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> dict:
    """Write every item of the index at ``index_path`` to ``out`` as shards + manifest (the
    format :func:`clipxfer.embed.embed` writes; keys are the index's relative paths). Returns
    the manifest. ``out`` must not already hold other embeddings."""
    from ..index import Index, store
    from ..index.layout import DB_FILE

    if rows_per_shard < 1:
        raise ClipxferError(f"--rows-per-shard must be at least 1, not {rows_per_shard}")
    out = Path(out).expanduser()
    if shards.read_manifest(out) is not None:
        raise ClipxferError(f"{out} already holds embeddings: export to an empty folder")
    with Index.open(index_path) as idx:
        folder, model_id, model_spec, dim, root = idx.path, idx.model_id, idx.model_spec, idx.dim, idx.root
    conn = store.connect(folder / DB_FILE)
    try:
        meta = store.get_metadata(conn)
        info = EncoderInfo(model_id, model_spec, dim, int(meta["feature_dim"]))
        conn.execute("BEGIN")  # rows and vectors from one snapshot
        rows = list(store.rows(conn))
        _, _, embeddings, features = store.vectors(conn, dim, info.feature_dim if meta.get("store_features") == "1" else None)
        conn.rollback()
    finally:
        conn.close()
    source = {"kind": "index", "root": str(root), "index": str(folder), "units": 0}
    out.mkdir(parents=True, exist_ok=True)
    shards.remove_partial_files(out)
    names = []
    for number, start in enumerate(range(0, len(rows), rows_per_shard)):
        part = rows[start : start + rows_per_shard]
        stop = start + len(part)
        shard = ShardData(
            f"part-{number:06d}",
            [r.path for r in part],
            [r.sha256 for r in part],
            [r.width for r in part],
            [r.height for r in part],
            [r.size for r in part],
            embeddings[start:stop],
            None if features is None else features[start:stop],
        )
        shards.write_shard(out, info, shard, {"source_kind": "index"})
        names.append(shard.name)
    source["units"] = len(names)
    return shards.write_manifest(out, info, source, names)
