"""Search restricted to a set of ids, so ``k`` hits come back whenever ``k`` items pass a filter.

Small sets (up to :data:`EXACT_MAX` ids) are scored exactly from their SQLite vectors. Larger ones go
to FAISS with an ID selector (flat, HNSW and IVF all take one); HNSW and IVF may still return fewer
than ``k`` under a selective filter (the graph walk or the probed lists run out of allowed items),
so the search is repeated exhaustively (all IVF lists, a wide HNSW beam) and, if still short, scored
exactly over the allowed vectors.
"""

from __future__ import annotations

import numpy as np

from . import store, vectors

EXACT_MAX = 4096
WIDE_EF_SEARCH = 1024


def exact_search(conn, dim: int, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query over the SQLite vectors of ``ids`` (-1 pads missing hits)."""
    found_ids, embeddings = store.vectors_for(conn, ids, dim)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    if len(found_ids):
        all_scores = queries @ embeddings.T
        take = min(k, len(found_ids))
        top = np.argsort(-all_scores, axis=1, kind="stable")[:, :take]
        scores[:, :take] = np.take_along_axis(all_scores, top, axis=1)
        out_ids[:, :take] = found_ids[top]
    return scores, out_ids


def _params(index, selector, exhaustive: bool, k: int):
    import faiss  # lazily, like vectors.py: commands that never search start without it

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        ef = WIDE_EF_SEARCH if exhaustive else vectors.HNSW_EF_SEARCH
        return faiss.SearchParametersHNSW(sel=selector, efSearch=max(ef, k))
    if isinstance(inner, faiss.IndexIVF):
        nprobe = inner.nlist if exhaustive else min(vectors.IVF_NPROBE, inner.nlist)
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
    return faiss.SearchParameters(sel=selector)


def search_allowed(index, conn, dim: int, queries: np.ndarray, k: int, allowed: np.ndarray):
    """Top-``k`` (scores, ids) per query among ``allowed`` ids only."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, len(allowed))) if len(allowed) else 1
    if len(allowed) == 0:
        return np.full((len(queries), 1), -np.inf, np.float32), np.full((len(queries), 1), -1, np.int64)
    if len(allowed) <= EXACT_MAX:
        return exact_search(conn, dim, queries, k, allowed)
    import faiss

    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    for exhaustive in (False, True):
        scores, ids = index.search(queries, k, params=_params(index, selector, exhaustive, k))
        if np.all((ids >= 0).sum(axis=1) >= k):
            return scores, ids
    return exact_search(conn, dim, queries, k, allowed)
