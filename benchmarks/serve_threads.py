"""Why ``clipxfer serve`` runs FAISS and torch with one intra-op thread: per-request work (one
HNSW search over 100k vectors, one lite text encoding, one lite image encoding) timed with the
library defaults and with one thread, interleaved in one process. Prints JSON.

    python benchmarks/serve_threads.py --index /tmp/clipxfer-serve-bench/index
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", default="/tmp/clipxfer-serve-bench/index", help="Made by serve_load.py.")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import faiss
    import torch
    from PIL import Image

    from clipxfer.encoders import cached_encoder
    from clipxfer.index import Index
    from clipxfer.sample_photos import sample_photo

    default_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    idx = Index.open(args.index)
    encoder = cached_encoder("lite", "cpu", None)
    image = Image.fromarray(sample_photo("coffee"))
    queries = np.random.default_rng(0).standard_normal((200, idx.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    idx.search_vectors(queries[0], 20)
    encoder.encode_texts(["warm up"])
    encoder.embed_images([image])

    def timed(fn, n):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        return round((time.perf_counter() - start) / n * 1000, 2)

    rows = []
    for round_no in range(args.rounds):
        for label, (torch_threads, faiss_threads) in (("default", default_threads), ("one thread", (1, 1))):
            torch.set_num_threads(torch_threads)
            faiss.omp_set_num_threads(faiss_threads)
            rows.append({
                "round": round_no + 1, "threads": label, "torch_threads": torch_threads, "faiss_threads": faiss_threads,
                "hnsw_search_ms": timed(lambda i: idx.search_vectors(queries[i], 20), 200),
                "text_encode_ms": timed(lambda i: encoder.encode_texts([f"query {time.time()} {i}"]), 10),
                "image_encode_ms": timed(lambda i: encoder.embed_images([image]), 5),
            })
    print(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "load_average": os.getloadavg(), "count": len(idx), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
