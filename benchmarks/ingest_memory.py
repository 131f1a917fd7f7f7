"""Peak memory of ``clipxfer index --from-embeddings`` for N x D vectors (default 1M x 512).

    python benchmarks/ingest_memory.py [--count 1000000] [--dim 512] [--index-type ivf] --json

Writes ``--count`` random unit vectors as 10 embedding shards (this process), then runs the
ingestion in a child process and reports its peak resident memory (``ru_maxrss`` of the child),
its wall time, the FAISS factory chosen and the bytes on disk. The float32 vectors alone are
``count * dim * 4`` bytes (2.05 GB for 1M x 512): a peak well below that shows the ingestion
streams instead of loading every vector.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipxfer.embed.shards import EncoderInfo, ShardData, write_manifest, write_shard  # noqa: E402

CHILD = """
import json, sys, time
from clipxfer.embed import ingest
began = time.perf_counter()
report = ingest(sys.argv[1], sys.argv[2], index_type=sys.argv[3])
print(json.dumps({**report.to_dict(), "seconds": time.perf_counter() - began}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--index-type", default="ivf")
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--dir", default=None, help="Working folder (default: a temporary one).")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        emb, idx = Path(tmp) / "emb", Path(tmp) / "idx"
        emb.mkdir()
        info = EncoderInfo("open_clip:synthetic:benchmark", "synthetic", args.dim, args.dim)
        rng = np.random.default_rng(0)
        per_shard = -(-args.count // args.shards)
        names = []
        for part, start in enumerate(range(0, args.count, per_shard)):
            rows = min(per_shard, args.count - start)
            vectors = rng.standard_normal((rows, args.dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            keys = [f"{i:09d}.jpg" for i in range(start, start + rows)]
            ones = [1] * rows
            write_shard(emb, info, ShardData(f"part-{part:05d}", keys, [f"{i:064x}" for i in range(start, start + rows)], ones, ones, ones, vectors, None))
            names.append(f"part-{part:05d}")
            del vectors
        write_manifest(emb, info, {"kind": "synthetic", "root": tmp}, names)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, str(emb), str(idx), args.index_type], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - began
        if done.returncode:
            sys.exit(done.stderr)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        summary = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "count": args.count,
            "dim": args.dim,
            "index_type": args.index_type,
            "faiss": report["faiss"],
            "ingest_seconds": round(wall, 1),
            "peak_rss_mib": round(peak_kib / 1024),
            "float32_vectors_mib": round(args.count * args.dim * 4 / 2**20),
            "shards_mib": round(sum(p.stat().st_size for p in emb.iterdir()) / 2**20),
            "index_mib": round(sum(p.stat().st_size for p in idx.iterdir() if p.is_file()) / 2**20),
        }
    print(json.dumps(summary, indent=2) if args.json else summary)


if __name__ == "__main__":
    main()
