"""Indexing throughput against a naive open_clip loop, in one process, on the same files.

    python benchmarks/encode.py --model ViT-B-32 --pretrained random [--images DIR] \
        [--device cpu|cuda] [--precision auto] --json

Measures, per image set:
- ``images_per_s``: ``Index.update`` on the folder into a fresh index, i.e. the exact code path of
  ``clipxfer index`` (discovery, parallel decode, preprocessing, encoding, SQLite + FAISS writes);
- ``naive_images_per_s``: PIL open -> open_clip's own preprocess -> fp32 model, batches of 32;
- ``raw_forward_images_per_s``: the encoder alone on ready uint8 batches (no decoding), in the
  precision the index used;
- ``ratio`` = images_per_s / naive_images_per_s and ``fraction_of_raw`` = images_per_s / raw.

Without ``--images`` it writes synthetic JPEG sets of three sizes (thumbnails, 500x375,
12-megapixel photos). The top-level fields repeat the 500x375 set (or the --images folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipxfer.encoders import load_encoder  # noqa: E402
from clipxfer.images import find_images  # noqa: E402
from clipxfer.index import Index  # noqa: E402

SYNTHETIC_SETS = {  # name -> (width, height, count on CPU, count on CUDA)
    "thumbnail_160x120": (160, 120, 192, 8192),
    "photo_500x375": (500, 375, 192, 8192),
    "camera_4000x3000": (4000, 3000, 24, 512),
}


def synthetic_photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photo-like image (smooth gradients, shapes and mild noise) so JPEG sizes are realistic."""
    small_w, small_h = max(8, width // 16), max(8, height // 16)
    base = rng.integers(0, 256, size=(small_h, small_w, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def make_set(folder: Path, width: int, height: int, count: int, seed: int = 0) -> Path:
    """``count`` distinct JPEGs (quality 90) of one size; kept between runs."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob("*.jpg")))
    rng = np.random.default_rng(seed + existing)
    template = synthetic_photo(width, height, rng)
    for i in range(existing, count):
        # A cheap per-file change keeps every file distinct without regenerating the photo.
        shifted = np.roll(np.asarray(template), shift=(i * 7) % height, axis=0)
        Image.fromarray(shifted).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def time_index(images: Path, encoder, workers: int | None, batch_size: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        report = Index.update(images, model=encoder, path=Path(tmp) / "index", workers=workers, batch_size=batch_size)
        seconds = time.perf_counter() - started
    if report.failed:
        raise SystemExit(f"{len(report.failed)} files failed to index: {report.failed[:3]}")
    return seconds, report.added


def time_naive(paths: list[Path], model_name: str, pretrained: str, device: torch.device) -> float:
    """The loop a user writes first: PIL + open_clip preprocess + fp32 model, batch 32."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=None if pretrained == "random" else pretrained
    )
    model = model.eval().to(device)
    with torch.no_grad():  # untimed warm-up batch, as for the other two measurements
        model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths[:32]]).to(device))
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(paths), 32):
            batch = torch.stack([preprocess(Image.open(p)) for p in paths[start : start + 32]]).to(device)
            model.encode_image(batch).cpu()
    return time.perf_counter() - started


def warm_up(encoder, batch_size: int) -> None:
    """One untimed batch: the first call of a model pays for kernel selection and allocation,
    which would otherwise weigh on whichever measurement comes first."""
    encoder.encode_pixels(np.zeros((batch_size, encoder.input_size, encoder.input_size, 3), np.uint8))


def time_raw_forward(encoder, batch_size: int, batches: int) -> float:
    """Images/s of the encoder on ready uint8 input: the ceiling for the whole pipeline."""
    pixels = np.random.default_rng(0).integers(0, 256, (batch_size, encoder.input_size, encoder.input_size, 3), np.uint8)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(batches):
        encoder.encode_pixels(pixels)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * batches / (time.perf_counter() - started)


def measure_set(images: Path, args, encoder) -> dict:
    paths = sorted(find_images(images))
    warm_up(encoder, args.batch_size)
    seconds, count = time_index(images, encoder, args.workers, args.batch_size)
    naive_paths = paths[: args.naive_limit] if args.naive_limit else paths
    naive_seconds = time_naive(naive_paths, args.model, args.pretrained, encoder.device)
    raw = time_raw_forward(encoder, args.batch_size, max(2, min(8, count // args.batch_size)))
    ours, naive = count / seconds, len(naive_paths) / naive_seconds
    return {
        "images": count,
        "images_per_s": round(ours, 2),
        "naive_images_per_s": round(naive, 2),
        "naive_images": len(naive_paths),
        "ratio": round(ours / naive, 2),
        "raw_forward_images_per_s": round(raw, 2),
        "fraction_of_raw": round(ours / raw, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="random", help="open_clip tag, checkpoint path, or random")
    parser.add_argument("--images", type=Path, help="a folder of images; default: synthetic JPEG sets")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="decode worker processes (default: automatic)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--naive-limit", type=int, default=None, help="time the naive loop on at most N images")
    parser.add_argument("--sets", default=",".join(SYNTHETIC_SETS), help="synthetic sets to run")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "clipxfer-bench-images")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    encoder = load_encoder(f"{args.model}:{args.pretrained}", device=args.device, precision=args.precision)
    cuda = encoder.device.type == "cuda"
    args.batch_size = args.batch_size or (512 if cuda else 64)
    if args.images:
        sets = {args.images.name: args.images}
    else:
        sets = {}
        for name in args.sets.split(","):
            width, height, cpu_count, cuda_count = SYNTHETIC_SETS[name]
            sets[name] = make_set(args.data_dir / name, width, height, cuda_count if cuda else cpu_count)
    results = {name: measure_set(folder, args, encoder) for name, folder in sets.items()}
    headline = results.get("photo_500x375") or next(iter(results.values()))
    report = {
        "model": encoder.id,
        "device": str(encoder.device),
        "precision": str(encoder.dtype).removeprefix("torch."),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if cuda else ""),
        "date": time.strftime("%Y-%m-%d"),
        **{key: headline[key] for key in ("images_per_s", "naive_images_per_s", "ratio", "raw_forward_images_per_s")},
        "sets": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, row in results.items():
            print(f"{name}: {row['images_per_s']} img/s vs naive {row['naive_images_per_s']} "
                  f"({row['ratio']}x), raw forward {row['raw_forward_images_per_s']} ({row['fraction_of_raw']:.0%})")


if __name__ == "__main__":
    main()
