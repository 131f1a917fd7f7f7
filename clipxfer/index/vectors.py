"""The FAISS side of an index: choosing, building, saving and loading the vector index.

Every index is an ``IndexIDMap2`` around an inner-product index, so FAISS ids are the SQLite
row ids. The index is a cache of the vectors SQLite holds (see :mod:`clipxfer.index.layout`):
it can always be rebuilt from them, which is what makes a crash harmless.

Index types follow faiss's "Guidelines to choose an index":
``flat`` exact search; ``hnsw`` (HNSW32) fast and accurate when the vectors fit in memory;
``ivf`` IVF with product quantisation (IVF-PQ) when they do not (IVF-Flat below 10,000 vectors,
too few to train PQ codebooks); ``auto`` picks flat for small collections, HNSW while it fits in
half the RAM, IVF-PQ beyond.

faiss is imported inside the functions that use it: ``clipxfer info`` reads what it needs from the
cache file's header, so it starts without loading faiss.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ClipxferError

if TYPE_CHECKING:
    import faiss

INDEX_TYPES = ("flat", "hnsw", "ivf", "auto")
# Below this many vectors exact search is already fast (milliseconds per query).
AUTO_FLAT_MAX = 50_000
# IVF-PQ needs about 39 training points per centroid for 256-entry PQ codebooks.
PQ_MIN_VECTORS = 10_000
HNSW_M = 32
HNSW_EF_SEARCH = 64
IVF_NPROBE = 32


def physical_memory_bytes() -> int:
    """RAM of this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def resolve_index_type(index_type: str, count: int, dim: int) -> str:
    """``flat``/``hnsw``/``ivf`` for a requested type (``auto`` resolved for ``count`` vectors)."""
    if index_type not in INDEX_TYPES:
        raise ClipxferError(f"unknown index type '{index_type}': use one of {', '.join(INDEX_TYPES)}")
    if index_type != "auto":
        return index_type
    if count <= AUTO_FLAT_MAX:
        return "flat"
    # HNSW keeps the float32 vectors plus about 2*M int32 links per vector.
    hnsw_bytes = count * (4 * dim + 2 * HNSW_M * 4)
    memory = physical_memory_bytes()
    return "hnsw" if memory == 0 or hnsw_bytes <= memory // 2 else "ivf"


def factory_string(index_type: str, count: int, dim: int) -> str:
    """The faiss factory string (without the ID map) for a resolved type and collection size."""
    index_type = resolve_index_type(index_type, count, dim)
    if index_type == "flat":
        return "Flat"
    if index_type == "hnsw":
        return f"HNSW{HNSW_M},Flat"
    # nlist ~ 4 * sqrt(n), rounded to a power of two so it changes (and the index is retrained)
    # only when the collection has grown or shrunk about four-fold.
    nlist = 2 ** max(0, round(math.log2(max(1.0, 4 * math.sqrt(max(count, 1))))))
    nlist = min(nlist, max(1, count // 39))
    if count < PQ_MIN_VECTORS:
        return f"IVF{nlist},Flat"
    m = next(m for m in (dim // 4, dim // 8, dim // 16, 8, 4, 2, 1) if m >= 1 and dim % m == 0)
    return f"IVF{nlist},PQ{m}"


def _tune(index: faiss.Index) -> faiss.Index:
    """Search-time parameters (not all are stored in the file)."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = min(IVF_NPROBE, inner.nlist)
    return index


def build(factory: str, vectors: np.ndarray, ids: np.ndarray, dim: int) -> faiss.IndexIDMap2:
    """An ``IndexIDMap2`` of ``factory`` holding ``vectors`` under ``ids`` (trained if needed)."""
    import faiss

    index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)
    if not index.is_trained and len(vectors):
        index.train(vectors)
    if len(vectors):
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return _tune(index)


def can_update(index: faiss.Index) -> bool:
    """True when vectors can be removed from ``index`` in place (HNSW cannot)."""
    import faiss

    inner = faiss.downcast_index(index.index)
    return not isinstance(inner, faiss.IndexHNSW) and index.is_trained


CACHE_MAGIC = b"CLIPXFER-FAISS 1\n"


class StaleCache(Exception):
    """A FAISS cache file that does not belong to the current database content."""


def save(index: faiss.Index, path: Path, generation: str) -> None:
    """Write ``index`` to ``path`` atomically (readers see the old file or the new one), bound to
    the database ``generation`` it was built from and checksummed, replacing any file there."""
    import faiss

    path = Path(path)
    data = faiss.serialize_index(index).tobytes()
    header = {
        "generation": generation,
        "ntotal": int(index.ntotal),
        "sha256": hashlib.sha256(data).hexdigest(),
        "factory": describe(index),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(CACHE_MAGIC + json.dumps(header).encode() + b"\n")
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a disk-full write leaves no half file behind
        raise


def read_header(path: Path) -> dict | None:
    """The JSON header of a file written by :func:`save` (generation, ntotal, checksum, factory),
    read without the index bytes or faiss; None for a file that is not such a cache."""
    try:
        with open(path, "rb") as handle:
            if handle.read(len(CACHE_MAGIC)) != CACHE_MAGIC:
                return None
            header = json.loads(handle.readline(1 << 16))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def load(path: Path, generation: str | None, count: int) -> faiss.IndexIDMap2:
    """Read an index written by :func:`save`; raises :class:`StaleCache` unless it was built from
    database ``generation``, holds ``count`` vectors and its bytes are intact."""
    import faiss

    blob = Path(path).read_bytes()
    if not blob.startswith(CACHE_MAGIC) or generation is None:
        raise StaleCache(f"{path}: not a clipxfer FAISS cache of this database")
    end = blob.index(b"\n", len(CACHE_MAGIC))
    try:
        header = json.loads(blob[len(CACHE_MAGIC) : end])
    except ValueError:
        raise StaleCache(f"{path}: unreadable header") from None
    data = memoryview(blob)[end + 1 :]
    if header.get("generation") != generation or header.get("ntotal") != count:
        raise StaleCache(f"{path}: built from other database content")
    if hashlib.sha256(data).hexdigest() != header.get("sha256"):
        raise StaleCache(f"{path}: damaged (checksum mismatch)")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise StaleCache(f"{path}: unreadable ({exc})") from None
    index = faiss.downcast_index(index) if not isinstance(index, faiss.IndexIDMap2) else index
    if not isinstance(index, faiss.IndexIDMap2) or index.ntotal != count:
        raise StaleCache(f"{path}: not an id-mapped index of {count} vectors")
    return _tune(index)


def score_bound(index: faiss.Index) -> float:
    """The largest |score| / |query| a healthy index can return for unit vectors: 1 for exact
    vectors (plus float error), more for product-quantised ones (approximated vectors)."""
    return 2.0 if "PQ" in describe(index) else 1.0 + 1e-3


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query row; missing neighbours have id -1."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    k = max(1, min(k, max(index.ntotal, 1)))
    return index.search(queries, k)


def describe(index: faiss.Index) -> str:
    """The factory string of a built index, e.g. ``Flat``, ``HNSW32,Flat``, ``IVF1024,PQ128``."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        return f"HNSW{inner.hnsw.nb_neighbors(1)},Flat"
    if isinstance(inner, faiss.IndexIVFPQ):
        return f"IVF{inner.nlist},PQ{inner.pq.M}"
    if isinstance(inner, faiss.IndexIVFFlat):
        return f"IVF{inner.nlist},Flat"
    if isinstance(inner, faiss.IndexFlat):
        return "Flat"
    return type(inner).__name__
