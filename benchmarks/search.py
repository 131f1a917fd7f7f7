"""Search benchmark: flat vs HNSW vs IVF-PQ, as clipxfer's index builds them, on synthetic vectors.

For each collection size: build seconds, queries/s (one batch of all queries, and one query at a
time), and recall@10 against exact search. The vectors are unit-length 512-d rows with a low
intrinsic dimension (a 32-d Gaussian mixture projected to 512-d plus noise): real embedding
collections are like that, while uniform random vectors make every neighbour a near-tie. Prints one JSON object.

    python benchmarks/search.py --sizes 100000 1000000 --json
    python benchmarks/search.py --sizes 1000000 --types flat ivf --gpu   # faiss-gpu: flat and IVF on GPU 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import faiss
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from clipxfer.index import vectors  # noqa: E402


def synthetic(count: int, dim: int, seed: int, latent: int = 32, centres: int = 1000) -> np.ndarray:
    """Unit rows with low intrinsic dimension, like real embeddings: points around ``centres``
    cluster centres in a ``latent``-d space, projected to ``dim`` dimensions, plus a little noise.
    (Isotropic noise in all 512 dimensions makes every neighbour a near-tie, which no real
    collection looks like.) The projection comes from a fixed seed so queries share the space."""
    projection = np.random.default_rng(12345).standard_normal((latent, dim), dtype=np.float32)
    middle = np.random.default_rng(54321).standard_normal((centres, latent), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):
        stop = min(count, start + 100_000)
        z = middle[rng.integers(0, centres, stop - start)] + 0.5 * rng.standard_normal((stop - start, latent), dtype=np.float32)
        out[start:stop] = z @ projection + 0.5 * rng.standard_normal((stop - start, dim), dtype=np.float32)
    faiss.normalize_L2(out)
    return out


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Fraction of the true top-k found in the top-k, averaged over queries."""
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth))
    return hits / (k * len(truth))


def measure(index, queries: np.ndarray, k: int, singles: int) -> tuple[float, float, np.ndarray]:
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    batched = len(queries) / (time.perf_counter() - start)
    start = time.perf_counter()
    for row in queries[:singles]:
        index.search(row[None], k)
    single = singles / (time.perf_counter() - start)
    return batched, single, ids


def build_on_gpu(factory: str, data: np.ndarray, dim: int):
    """``factory`` built on GPU 0 (faiss-gpu): trained and filled there, with clipxfer's nprobe.
    No ID map (ids are the row numbers here) and no HNSW: faiss has no GPU HNSW."""
    resources = faiss.StandardGpuResources()
    index = faiss.index_cpu_to_gpu(resources, 0, faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))
    if not index.is_trained:
        index.train(data)
    index.add(data)
    if "IVF" in factory:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", vectors.IVF_NPROBE)
    index.resources = resources  # kept alive with the index
    return index


def run(sizes, dim: int, n_queries: int, k: int, singles: int, types, seed: int, gpu: bool = False) -> dict:
    results = []
    for size in sizes:
        data = synthetic(size, dim, seed)
        queries = synthetic(n_queries, dim, seed + 1)
        ids = np.arange(size, dtype=np.int64)
        truth = None
        for index_type in types:
            factory = vectors.factory_string(index_type, size, dim)
            start = time.perf_counter()
            index = build_on_gpu(factory, data, dim) if gpu else vectors.build(factory, data, ids, dim)
            build_s = time.perf_counter() - start
            batched, single, found = measure(index, queries, k, singles)
            if index_type == "flat":
                truth = found
            row = {
                "size": size,
                "type": index_type,
                "faiss": factory,
                "build_s": round(build_s, 2),
                "batched_qps": round(batched, 1),
                "single_qps": round(single, 1),
                "recall_at_10": round(recall_at(found, truth, k), 4) if truth is not None else None,
            }
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del index
        del data
    for row in results:  # ratios against flat at the same size
        flat = next(r for r in results if r["size"] == row["size"] and r["type"] == "flat")
        row["batched_vs_flat"] = round(row["batched_qps"] / flat["batched_qps"], 2)
        row["single_vs_flat"] = round(row["single_qps"] / flat["single_qps"], 2)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "faiss": faiss.__version__,
        "device": "cuda:0" if gpu else "cpu",
        "threads": faiss.omp_get_max_threads(),
        "dim": dim,
        "queries": n_queries,
        "single_queries": singles,
        "k": k,
        "hnsw_ef_search": vectors.HNSW_EF_SEARCH,
        "ivf_nprobe": vectors.IVF_NPROBE,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000, help="queries in the batched run (and recall)")
    parser.add_argument("--single", type=int, default=200, help="queries run one at a time")
    parser.add_argument("--types", nargs="+", default=["flat", "hnsw", "ivf"], choices=["flat", "hnsw", "ivf"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu", action="store_true", help="build and search on GPU 0 (faiss-gpu; flat and ivf)")
    parser.add_argument("--json", action="store_true", help="(the output is always JSON)")
    args = parser.parse_args()
    types = ["flat"] + [t for t in args.types if t != "flat"]  # flat first: it is the ground truth
    if args.gpu and (not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1):
        raise SystemExit("--gpu: this faiss has no GPU support or sees no GPU (pip install faiss-gpu-cu12)")
    if args.gpu and "hnsw" in types:
        raise SystemExit("--gpu: faiss has no GPU HNSW; use --types flat ivf")
    print(json.dumps(run(args.sizes, args.dim, args.queries, 10, args.single, types, args.seed, args.gpu), indent=2))


if __name__ == "__main__":
    main()
