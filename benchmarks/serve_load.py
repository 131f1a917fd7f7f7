"""Load benchmark of ``clipxfer serve``: N concurrent clients on 127.0.0.1 against a 100k-vector
HNSW index, for cached text queries, uncached text queries and image uploads.

The index is synthetic: lite's model id and 384-d unit vectors (benchmarks/search.py's recipe)
written through clipxfer's store API, so the server loads it like any index and encodes real
text queries with lite. Each phase is bounded (a fixed number of requests, and a time limit).

Closed loop: N clients, each sending its next request when the last is answered; interleaves rounds
of ``/api/health`` (the same HTTP stack with no search) as the in-process baseline. Open loop: cached
text queries arriving at fixed rates (``--rates``), each sent on schedule whatever the server's
state, latency counted from the scheduled time (so queueing shows); the rates stop rising once the
server falls behind (saturation). Image uploads are measured closed-loop on their own. Reports
q/s, p50, p99, errors and the server's resident memory (all workers). Prints JSON.

    python benchmarks/serve_load.py --size 100000 --clients 50 --requests 2000 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CACHED_QUERIES = [f"a photo of a {w}" for w in ("cat", "dog", "car", "tree", "house", "boat", "bird", "cup",
                                                   "shoe", "clock", "rocket", "coffee", "bicycle", "horse",
                                                   "flower", "chair", "phone", "book", "guitar", "pizza")]


def build_index(folder: Path, size: int, seed: int = 0) -> Path:
    """A ``size``-vector HNSW index with lite's model id (reused when already built)."""
    import time as _time

    from search import synthetic

    from clipxfer.encoders import load_encoder
    from clipxfer.encoders.ids import spec_for_id
    from clipxfer.index import store, vectors
    from clipxfer.index.layout import DB_FILE

    if (folder / DB_FILE).is_file() and list(folder.glob("vectors-*.faiss")):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder("lite", device="cpu")
    conn = store.connect(folder / DB_FILE, create=True)
    store.set_metadata(conn, schema=store.SCHEMA_VERSION, model_id=encoder.id, model_spec=spec_for_id(encoder.id),
                   dim=encoder.dim, feature_dim=encoder.feature_dim, store_features=0, index_type="hnsw",
                   root=str(folder / "images"), created=_time.time())
    data = synthetic(size, encoder.dim, seed)
    ids = []
    for i, row in enumerate(data):
        values = {"path": f"synthetic/{i:07d}.jpg", "size": 0, "mtime_ns": 0, "sha256": f"{i:064x}",
                  "width": 1, "height": 1}
        ids.append(store.insert(conn, values, row, None))
    version = store.bump_version(conn)
    conn.commit()
    generation = store.get_metadata(conn)["generation"]
    conn.close()
    index = vectors.build(vectors.factory_string("hnsw", size, encoder.dim), data, np.asarray(ids), encoder.dim)
    vectors.save(index, folder / f"vectors-{version}.faiss", generation)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of ``pid`` in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def children(pid: int) -> list[int]:
    """The worker processes of ``pid`` (uvicorn --workers), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


async def run_phase(url: str, clients: int, total: int, make_request, time_limit: float) -> dict:
    """``total`` requests spread over ``clients`` concurrent workers (stopping at ``time_limit``)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}
    counter = iter(range(total))
    deadline = time.perf_counter() + time_limit

    async def worker(client):
        nonlocal errors
        for i in counter:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            try:
                response = await make_request(client, i)
                kind = None if response.status_code == 200 else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                kind = type(exc).__name__
            latencies.append(time.perf_counter() - start)
            if kind:
                errors += 1
                kinds[kind] = kinds.get(kind, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "errors": errors, "error_kinds": kinds, "seconds": round(elapsed, 2),
            "qps": round(len(ms) / elapsed, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


async def run_open_loop(url: str, rate: float, seconds: float, make_request) -> dict:
    """Requests sent at ``rate`` per second for ``seconds``, on schedule (open loop)."""
    import httpx

    latencies: list[float] = []
    kinds: dict[str, int] = {}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        start = time.perf_counter()

        async def one(i: int):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                response = await make_request(client, i)
                kind = None if response.status_code == 200 else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                kind = type(exc).__name__
            latencies.append(time.perf_counter() - due)
            if kind:
                kinds[kind] = kinds.get(kind, 0) + 1

        await asyncio.gather(*(one(i) for i in range(int(rate * seconds))))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"rate": rate, "requests": len(ms), "errors": sum(kinds.values()), "error_kinds": kinds,
            "seconds": round(elapsed, 2), "qps": round(len(ms) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def sample_jpegs() -> list[bytes]:
    from PIL import Image

    from clipxfer.sample_photos import SAMPLE_PHOTOS, sample_photo

    out = []
    for name in list(SAMPLE_PHOTOS)[:6]:
        buffer = io.BytesIO()
        Image.fromarray(sample_photo(name)).convert("RGB").save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


async def benchmark(url: str, pid: int, args) -> dict:
    import httpx

    async def health(client, i):
        return await client.get("/api/health")

    async def cached(client, i):
        return await client.get("/api/search", params={"q": CACHED_QUERIES[i % len(CACHED_QUERIES)], "k": 20})

    run_id = int(time.time())

    async def uncached(client, i):
        return await client.get("/api/search", params={"q": f"query {run_id} number {i} of a thing", "k": 20})

    photos = sample_jpegs()

    async def upload(client, i):
        return await client.post("/api/search/image", params={"k": 20},
                                 files={"file": (f"{i}.jpg", photos[i % len(photos)], "image/jpeg")})

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:  # warm the caches of the cached phase
        for q in CACHED_QUERIES:
            assert (await client.get("/api/search", params={"q": q})).status_code == 200
    results: dict = {"rounds": []}
    for round_no in range(args.rounds):  # interleaved: baseline, cached text
        base = await run_phase(url, args.clients, args.requests, health, args.time_limit)
        text = await run_phase(url, args.clients, args.requests, cached, args.time_limit)
        results["rounds"].append({"round": round_no + 1, "health": base, "cached_text": text})
    results["open_loop_cached_text"] = []
    for rate in args.rates:
        phase = await run_open_loop(url, rate, args.rate_seconds, cached)
        results["open_loop_cached_text"].append(phase)
        if phase["qps"] < 0.9 * rate or phase["p99_ms"] > 5000:
            break  # saturated: higher rates only queue longer
    results["uncached_text"] = await run_phase(url, args.clients, args.uncached_requests, uncached, args.time_limit)
    results["image_upload"] = await run_phase(url, args.upload_clients, args.upload_requests, upload, args.time_limit)
    pids = [pid, *children(pid)]
    results["server_rss_mib"] = round(sum(rss_mib(p)[0] for p in pids))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--index", default="/tmp/clipxfer-serve-bench/index", help="Where the synthetic index is kept.")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=2000, help="Requests per cached/health round.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--uncached-requests", type=int, default=300)
    parser.add_argument("--upload-clients", type=int, default=8)
    parser.add_argument("--upload-requests", type=int, default=100)
    parser.add_argument("--time-limit", type=float, default=120.0, help="Seconds per phase at most.")
    parser.add_argument("--rates", type=lambda text: [float(r) for r in text.split(",")],
                        default=[50, 100, 200, 400, 800, 1600], help="Open-loop arrival rates (q/s), comma-separated.")
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="Seconds per open-loop rate.")
    parser.add_argument("--workers", type=int, default=1, help="clipxfer serve --workers.")
    args = parser.parse_args()

    index = build_index(Path(args.index), args.size)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    labels = Path(args.index).parent / "labels.json"
    server = subprocess.Popen([sys.executable, "-m", "clipxfer", "serve", "--index", str(index), "--host", "127.0.0.1",
                               "--port", str(port), "--labels", str(labels), "--workers", str(args.workers)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        started = time.time()
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() - started > 300:
                raise SystemExit("server did not start")
            time.sleep(0.5)
        startup = time.time() - started
        results = asyncio.run(benchmark(url, server.pid, args))
    finally:
        server.terminate()
        server.wait(timeout=30)
    flags = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
             if f in Path("/proc/cpuinfo").read_text()]
    print(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, flags {' '.join(flags)}",
        "load_average": os.getloadavg(),
        "size": args.size, "clients": args.clients, "workers": args.workers, "server_startup_s": round(startup, 1),
        **results,
    }, indent=1))


if __name__ == "__main__":
    main()
