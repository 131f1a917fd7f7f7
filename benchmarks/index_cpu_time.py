"""Where indexing time goes: CPU time per image (this process and its decode workers) and wall rate
of ``Index.update`` against the encoder's raw forward, in interleaved rounds in one process.

    python benchmarks/index_cpu_time.py --images /tmp/clipxfer-bench-images/photo_500x375-256 \
        --model ViT-B-32:random --precision openvino:int8 --workers 0,1,2 --rounds 3

If the index path's CPU per image minus the raw forward's is the decode/store work, and the cores
are busy (CPU seconds / wall seconds close to the core count), the pipeline overlaps well and only
cheaper decoding can close the rest of the gap to the raw forward.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipxfer.encoders import load_encoder  # noqa: E402
from clipxfer.images import find_images  # noqa: E402
from clipxfer.index import Index  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the decode workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(run, count: int) -> tuple[float, float, float]:
    """(images/s, CPU ms per image, busy cores) of ``run()`` over ``count`` images."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return count / wall, 1000 * cpu / count, cpu / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--model", default="ViT-B-32:random")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", default="0,1,2", help="decode worker counts to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    encoder = load_encoder(args.model, "cpu", args.precision)
    count = len(list(find_images(args.images)))
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch_size, encoder.input_size, encoder.input_size, 3), np.uint8)
    encoder.encode_pixels(pixels)  # untimed: builds or reads the compiled model
    batches = max(1, count // args.batch_size)

    def raw():
        for _ in range(batches):
            encoder.encode_pixels(pixels)

    print(f"{encoder.id} ({encoder.runtime} {encoder.precision}), {count} images, {os.cpu_count()} CPUs")
    for round_number in range(1, args.rounds + 1):
        rate, cpu, busy = measure(raw, batches * args.batch_size)
        print(f"round {round_number} raw forward: {rate:.1f} img/s, {cpu:.1f} CPU ms/img, {busy:.2f} cores busy")
        for workers in (int(w) for w in args.workers.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                rate, cpu, busy = measure(
                    lambda: Index.update(args.images, model=encoder, path=Path(tmp) / "index", workers=workers,
                                         batch_size=args.batch_size), count)
            print(f"round {round_number} index, {workers} decode workers: {rate:.1f} img/s, {cpu:.1f} CPU ms/img, "
                  f"{busy:.2f} cores busy")


if __name__ == "__main__":
    main()
