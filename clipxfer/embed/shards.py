"""The embedding shard format: parquet files of key, sha256, size and vectors, plus a manifest.

Layout of an embeddings folder (see docs/scale-out.md for how other tools read it)::

    manifest.json          encoder id and spec, dims, counts, source, the list of shards
    <unit>.parquet         one per input unit (tar shard, parquet file, run of folder files)

Columns of a shard: ``key`` (string: a name inside the source, never a file-system path to open;
file names that are not valid UTF-8 show their odd bytes as ``\\xff`` here), ``key_bytes``
(binary, null unless the key is not valid UTF-8: then its raw bytes, the key readers must use),
``sha256`` (string), ``width``/``height`` (int32, as
displayed), ``size`` (int64, bytes of the encoded image),
``embedding`` (fixed_size_list<float32>[dim], L2-normalised, in the image-text space) and, for
encoders whose probe features differ from the embedding (``lite``), ``features``
(fixed_size_list<float16>[feature_dim]). The file's schema metadata ``clipxfer`` holds the
encoder id, the unit and the items that failed ({key, reason}), so a shard describes itself and
the manifest can always be rebuilt from the shards.

Each shard is written to a temporary name and renamed into place, so a killed job leaves no
half-written shard visible; a re-run skips the shards already there. A folder's file that changed
between runs is embedded again into a new shard and its old row then dropped (:func:`drop_keys`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..encoders.pipeline import Failure
from ..errors import ClipxferError
from ..extras import import_extra
from ..paths import atomic_write_bytes, path_text

FORMAT = "clipxfer-embeddings"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA_KEY = b"clipxfer"


@dataclass
class ShardData:
    """One unit's results, rows in input order; ``features`` None when they equal the embeddings."""

    name: str
    keys: list[str]
    sha256: list[str]
    widths: list[int]
    heights: list[int]
    sizes: list[int]
    embeddings: np.ndarray
    features: np.ndarray | None
    failed: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class EncoderInfo:
    """What every shard and the manifest record about the encoder."""

    model_id: str
    model_spec: str
    dim: int
    feature_dim: int

    @property
    def store_features(self) -> bool:
        # As the index does: CLIP models' probe features are their embeddings.
        return self.feature_dim != self.dim

    @classmethod
    def of(cls, encoder) -> "EncoderInfo":
        from ..encoders.ids import spec_for_id

        return cls(encoder.id, spec_for_id(encoder.id), encoder.dim, encoder.feature_dim)


def need(module: str):
    """Import an optional dependency of embedding shards, or one clear line naming the extra."""
    return import_extra(module, "shards", "embedding shards")


def shard_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.parquet"


def _schema(info: EncoderInfo, metadata: dict):
    pa = need("pyarrow")

    fields = [
        pa.field("key", pa.string()),
        pa.field("key_bytes", pa.binary()),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("size", pa.int64()),
        pa.field("embedding", pa.list_(pa.float32(), info.dim)),
    ]
    if info.store_features:
        fields.append(pa.field("features", pa.list_(pa.float16(), info.feature_dim)))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


def _vectors(array: np.ndarray, dtype, width: int):
    pa = need("pyarrow")

    flat = np.ascontiguousarray(array, dtype=dtype).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), width)


def write_shard(folder: Path, info: EncoderInfo, shard: ShardData, extra: dict | None = None) -> Path:
    """Write one shard atomically (temporary file, fsync, rename)."""
    pa = need("pyarrow")
    pq = need("pyarrow.parquet")

    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_id": info.model_id,
        "unit": shard.name,
        "count": len(shard),
        "failed": [{"key": path_text(f.path), "reason": f.reason} for f in shard.failed],
        **(extra or {}),
    }
    schema = _schema(info, metadata)
    columns = [
        pa.array([path_text(k) for k in shard.keys], pa.string()),
        pa.array([_key_bytes(k) for k in shard.keys], pa.binary()),
        pa.array(shard.sha256, pa.string()),
        pa.array(shard.widths, pa.int32()),
        pa.array(shard.heights, pa.int32()),
        pa.array(shard.sizes, pa.int64()),
        _vectors(shard.embeddings.reshape(len(shard), info.dim), np.float32, info.dim),
    ]
    if info.store_features:
        features = shard.embeddings if shard.features is None else shard.features
        columns.append(_vectors(features.reshape(len(shard), info.feature_dim), np.float16, info.feature_dim))
    table = pa.Table.from_arrays(columns, schema=schema)
    target = shard_path(folder, shard.name)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    return target


def _key_bytes(key: str) -> bytes | None:
    """None for a UTF-8 key; the raw bytes of a file name that is not (held as surrogate escapes)."""
    try:
        key.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(key)


def keys_of(table) -> list[str]:
    """The keys of a shard table or batch, ``key_bytes`` taking precedence (shards of earlier
    versions have no such column): the same text as the file name they came from."""
    names = table.schema.names
    keys = table.column(names.index("key")).to_pylist()
    if "key_bytes" in names:
        raw = table.column(names.index("key_bytes")).to_pylist()
        keys = [key if data is None else os.fsdecode(data) for key, data in zip(keys, raw)]
    return keys


def unsafe_key(key: str) -> str | None:
    """Why ``key`` cannot name an item (it would read as a path outside the source), or None.
    Keys become paths relative to the source root in an index, so they must stay below it."""
    if not key or "\0" in key:
        return "empty or holds a NUL character"
    if key.startswith("/"):
        return "an absolute path"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "has empty, '.' or '..' parts"
    return None


def drop_keys(folder: Path, info: EncoderInfo, name: str, keys: set[str]) -> int:
    """Rewrite shard ``name`` without the rows of ``keys`` (items embedded again in a later shard),
    atomically; a shard that had rows and has none left is removed. Returns the rows left."""
    pq = need("pyarrow.parquet")

    path = shard_path(folder, name)
    table = pq.read_table(path)
    own = keys_of(table)
    keep = [row for row, key in enumerate(own) if key not in keys]
    if len(keep) == len(own):
        return len(own)
    if not keep:
        path.unlink()
        return 0
    meta = shard_metadata(path)
    table = table.take(keep)
    names = table.schema.names
    column = {n: table.column(n) for n in names}
    features = None
    if "features" in names:
        features = column["features"].combine_chunks().flatten().to_numpy().reshape(-1, info.feature_dim).astype(np.float32)
    shard = ShardData(
        name,
        keys_of(table),
        column["sha256"].to_pylist(),
        column["width"].to_pylist(),
        column["height"].to_pylist(),
        column["size"].to_pylist(),
        column["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, info.dim),
        features,
        [Failure(f["key"], f["reason"]) for f in meta.get("failed", [])],
    )
    extra = {k: v for k, v in meta.items() if k not in ("format", "version", "model_id", "unit", "count", "failed")}
    write_shard(folder, info, shard, extra)
    return len(keep)


def shard_metadata(path: Path) -> dict:
    """The ``clipxfer`` metadata of a shard (read from the footer only)."""
    pq = need("pyarrow.parquet")

    try:
        schema = pq.read_schema(path)
        return json.loads(schema.metadata[METADATA_KEY])
    except Exception as exc:
        raise ClipxferError(f"{path}: not a clipxfer embedding shard ({type(exc).__name__}); remove it or use another --out")


def remove_partial_files(folder: Path) -> None:
    """Temporary files of a killed job (never visible as shards)."""
    for stray in Path(folder).glob(".*.tmp-*"):
        stray.unlink(missing_ok=True)


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ClipxferError(f"{path}: unreadable manifest ({exc}); remove it and run again to rebuild it")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ClipxferError(f"{path}: not a clipxfer embeddings manifest")
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: dict, path: Path) -> None:
    """Every field readers use, of the right type: one line naming the first that is not."""
    def positive_int(value):
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    checks = {
        "model_id": lambda v: isinstance(v, str) and v != "",
        "model_spec": lambda v: isinstance(v, str) and v != "",
        "dim": positive_int,
        "feature_dim": positive_int,
        "features": lambda v: isinstance(v, bool),
        "count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "source": lambda v: isinstance(v, dict),
        "shards": lambda v: isinstance(v, list),
    }
    for name, valid in checks.items():
        if name not in manifest:
            raise ClipxferError(f"{path}: no '{name}'; remove the manifest and run 'clipxfer embed' again to rebuild it")
        if not valid(manifest[name]):
            raise ClipxferError(
                f"{path}: '{name}' is {json.dumps(manifest[name])[:60]}, not a valid value; remove the manifest and run "
                "'clipxfer embed' again to rebuild it"
            )
    for entry in manifest["shards"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or unsafe_key(name) or "/" in name or entry.get("file") != f"{name}.parquet":
            raise ClipxferError(f"{path}: shard entry {json.dumps(entry)[:80]} is not {{name, file: NAME.parquet}}")


def write_manifest(folder: Path, info: EncoderInfo, source: dict, shard_names: list[str]) -> dict:
    """(Re)write the manifest from the shards' own metadata (atomic)."""
    shards, count, failed = [], 0, 0
    for name in shard_names:
        meta = shard_metadata(shard_path(folder, name))
        shards.append({"name": name, "file": f"{name}.parquet", "count": meta["count"], "failed": len(meta["failed"])})
        count += meta["count"]
        failed += len(meta["failed"])
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_id": info.model_id,
        "model_spec": info.model_spec,
        "dim": info.dim,
        "feature_dim": info.feature_dim,
        "features": info.store_features,
        "embedding_dtype": "float32",
        "features_dtype": "float16" if info.store_features else None,
        "source": source,
        "count": count,
        "failed_count": failed,
        "shards": shards,
    }
    atomic_write_bytes(Path(folder) / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def shard_names(folder: Path) -> list[str]:
    """The shards in ``folder``: the manifest's order, then any written after it (by name)."""
    folder = Path(folder)
    manifest = read_manifest(folder) if folder.is_dir() else None
    listed = [entry["name"] for entry in manifest["shards"]] if manifest else []
    on_disk = {path.stem for path in folder.glob("*.parquet")} if folder.is_dir() else set()
    return [name for name in listed if name in on_disk] + sorted(on_disk - set(listed))


def embedded_items(folder: Path) -> dict[str, tuple[int, str]]:
    """key -> (size, sha256) of every item in the shards of ``folder``, later shards winning."""
    pq = need("pyarrow.parquet")

    items: dict[str, tuple[int, str]] = {}
    for name in shard_names(folder):
        path = shard_path(folder, name)
        try:
            schema = pq.read_schema(path)
            table = pq.read_table(path, columns=[c for c in ("key", "key_bytes", "size", "sha256") if c in schema.names])
        except Exception as exc:
            raise ClipxferError(f"{path}: not a clipxfer embedding shard ({type(exc).__name__}); remove it or use another --out")
        for key, size, sha256 in zip(keys_of(table), table.column("size").to_pylist(), table.column("sha256").to_pylist()):
            items[key] = (size, sha256)
    return items


def open_embeddings(folder: str | os.PathLike) -> dict:
    """The manifest of an embeddings folder, or one clear error."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ClipxferError(f"{folder}: no {MANIFEST}; create embeddings with 'clipxfer embed SOURCE --out {folder}'")
    return manifest


@dataclass
class EmbeddingBatch:
    """A slice of one shard: row ``i`` of the arrays belongs to ``keys[i]``."""

    shard: str
    keys: list[str]
    sha256: list[str]
    widths: np.ndarray
    heights: np.ndarray
    sizes: np.ndarray
    embeddings: np.ndarray
    features: np.ndarray | None


def iter_embeddings(folder: str | os.PathLike, batch_rows: int = 65_536) -> Iterator[EmbeddingBatch]:
    """Stream every shard listed in the manifest, ``batch_rows`` rows at a time (bounded memory)."""
    pq = need("pyarrow.parquet")

    folder = Path(folder)
    manifest = open_embeddings(folder)
    dim, feature_dim = manifest["dim"], manifest["feature_dim"]
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise ClipxferError(f"{path}: listed in the manifest but missing; run 'clipxfer embed' again to redo it")
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            names = batch.schema.names
            features = None
            if "features" in names:
                column = batch.column(names.index("features"))
                features = column.flatten().to_numpy().reshape(-1, feature_dim).astype(np.float32)
            yield EmbeddingBatch(
                entry["name"],
                keys_of(batch),
                batch.column(names.index("sha256")).to_pylist(),
                batch.column(names.index("width")).to_numpy(),
                batch.column(names.index("height")).to_numpy(),
                batch.column(names.index("size")).to_numpy(),
                batch.column(names.index("embedding")).flatten().to_numpy().reshape(-1, dim),
                features,
            )
