"""Ray's overhead on one node: ``clipxfer embed`` with the local engine vs a local Ray instance.

    python benchmarks/embed_engines.py [--model ViT-B-32:random] [--images 256] [--rounds 2] --json

Writes ``--images`` synthetic 500x375 JPEGs as 4 webdataset tar shards, starts one local Ray
instance (its start-up time is reported separately, not counted), then runs ``embed`` (model
loading included: in this process for local, in the driver and the actor for Ray) on the
same shards with ``engine=local`` and ``engine=ray`` in interleaved rounds (local, ray, local,
ray, ...) into fresh output folders, so both see the same machine load. Reports images/s per
run, the medians, and ``ray_over_local`` = median Ray images/s / median local images/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipxfer.embed import embed  # noqa: E402
from clipxfer.embed.ray_engine import start_ray  # noqa: E402
from clipxfer.encoders import load_encoder  # noqa: E402


def write_shards(folder: Path, count: int, shards: int = 4) -> None:
    rng = np.random.default_rng(0)
    per_shard = -(-count // shards)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:06d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                # smooth random colour fields: JPEG-compressible like photos, unlike noise
                small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                img.save(buffer, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-32:random")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    encoder = load_encoder(args.model, "cpu", None)
    results: dict = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "shards").mkdir()
        write_shards(tmp / "shards", args.images)
        started = time.perf_counter()
        start_ray(num_cpus=os.cpu_count())
        ray_startup_s = time.perf_counter() - started
        for round_number in range(args.rounds):
            for engine in ("local", "ray"):
                out = tmp / f"{engine}-{round_number}"
                began = time.perf_counter()
                # End to end, model loading included for both (the local process and the Ray actors).
                report = embed(tmp / "shards", out, args.model, engine=engine, batch_size=args.batch_size, device="cpu")
                seconds = time.perf_counter() - began
                assert report.embedded == args.images, report
                results[engine].append(args.images / seconds)
        import ray

        ray.shutdown()
    local, distributed = statistics.median(results["local"]), statistics.median(results["ray"])
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": encoder.id,
        "precision": str(encoder.dtype),
        "images": args.images,
        "image_size": "500x375 JPEG, 4 tar shards",
        "ray_startup_s": round(ray_startup_s, 1),
        "local_images_per_s": [round(v, 1) for v in results["local"]],
        "ray_images_per_s": [round(v, 1) for v in results["ray"]],
        "local_median": round(local, 1),
        "ray_median": round(distributed, 1),
        "ray_over_local": round(distributed / local, 3),
    }
    print(json.dumps(summary, indent=2) if args.json else summary)


if __name__ == "__main__":
    main()
