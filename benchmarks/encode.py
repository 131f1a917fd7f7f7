"""Indexing throughput against a naive open_clip loop, in one process, on the same files.

    python benchmarks/encode.py --model ViT-B-32 --pretrained random [--images DIR] \
        [--device cpu|cuda] [--runtime auto|torch|openvino] [--precision auto|fp32|bf16|int8] --json
    python benchmarks/encode.py --compare torch:auto,openvino:fp32,openvino:int8 --sets photo_500x375 \
        --rounds 3 --json
    python benchmarks/encode.py --compare openvino:int8 --splits 1:1,1:2,2:1,2:2 --sets photo_500x375 --json

Measures, per image set and per runtime:precision:
- ``images_per_s``: ``Index.update`` on the folder into a fresh index, i.e. the exact code path of
  ``clipxfer index`` (discovery, parallel decode, preprocessing, encoding, SQLite + FAISS writes);
- ``naive_images_per_s``: PIL open -> open_clip's own preprocess -> fp32 torch model, batches of 32;
- ``raw_forward_images_per_s``: the encoder alone on ready uint8 batches (no decoding);
- ``ratio`` = images_per_s / naive_images_per_s and ``fraction_of_raw`` = images_per_s / raw.

With ``--compare`` every listed runtime:precision is loaded once (OpenVINO models are built or read
from the cache before timing) and the measurements run in ``--rounds`` interleaved rounds (naive,
then each runtime's index and raw forward), so load from other processes hits all of them alike;
the figures are medians over rounds. Each row carries the CPU flags that decide the runtime.

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
from clipxfer.encoders.pipeline import device_decode_default  # noqa: E402
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


def warm_up(encoder, batch_size: int) -> None:
    """One untimed batch: the first call of a model pays for kernel selection and allocation
    (and, for OpenVINO, for building or reading the cached model), which would otherwise weigh
    on whichever measurement comes first."""
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


def cpu_flag_summary() -> str:
    """The CPU flags that decide the runtime and precision (see clipxfer.device)."""
    from clipxfer.device import BF16_FLAGS, INT8_FLAGS, cpu_flags

    found = sorted((BF16_FLAGS | INT8_FLAGS | {"amx_tile"}) & cpu_flags())
    return "+".join(found) or "none of amx/avx512_bf16/vnni"


def load_encoders(args) -> dict:
    """label -> (encoder, decode workers), each warmed up (OpenVINO models built before timing).

    With ``--splits W:S,...`` every runtime:precision is measured once per split of the cores
    between W decode workers and S OpenVINO inference streams (torch ignores S)."""
    from clipxfer.device import join_compute

    requests = args.compare.split(",") if args.compare else [join_compute(args.runtime, args.precision)]
    splits = [tuple(int(v) for v in split.split(":")) for split in args.splits.split(",")] if args.splits else [
        (args.workers, args.streams)]
    encoders = {}
    for request in requests:
        for workers, streams in splits:
            encoder = load_encoder(f"{args.model}:{args.pretrained}", device=args.device, precision=request)
            if streams and getattr(encoder, "image_runtime", None) is not None:
                encoder.image_runtime.streams = streams  # read when the model is compiled, at warm-up
            label = f"{encoder.runtime}:{encoder.precision}"
            if args.splits:
                label += f" workers={workers} streams={streams if encoder.runtime == 'openvino' else '-'}"
            encoders[label] = (encoder, workers)
    return encoders


def measure_set(images: Path, args, encoders: dict) -> dict:
    """Interleaved rounds of the naive loop and each encoder's index + raw forward; medians."""
    paths = sorted(find_images(images))
    naive_paths = paths[: args.naive_limit] if args.naive_limit else paths
    first = next(iter(encoders.values()))[0]
    naive_model = NaiveModel(args.model, args.pretrained, first.device, naive_paths[:32])
    rates: dict[str, list[float]] = {"naive": []}
    for label in encoders:
        rates[f"{label} index"], rates[f"{label} raw"] = [], []
    count = len(paths)
    for _ in range(args.rounds):
        rates["naive"].append(len(naive_paths) / naive_model.time(naive_paths))
        for label, (encoder, workers) in encoders.items():
            seconds, count = time_index(images, encoder, workers, args.batch_size)
            rates[f"{label} index"].append(count / seconds)
            rates[f"{label} raw"].append(time_raw_forward(encoder, args.batch_size, max(2, min(8, count // args.batch_size))))
    naive = float(np.median(rates["naive"]))
    flags = cpu_flag_summary()
    rows = {}
    for label, (encoder, workers) in encoders.items():
        ours, raw = float(np.median(rates[f"{label} index"])), float(np.median(rates[f"{label} raw"]))
        rows[label] = {
            "model": encoder.id,
            "decode_workers": workers,
            "streams": getattr(getattr(encoder, "image_runtime", None), "streams", None),
            "infer_requests": getattr(getattr(encoder, "image_runtime", None), "requests", None),
            "cpu_flags": flags,
            "images": count,
            "images_per_s": round(ours, 2),
            "naive_images_per_s": round(naive, 2),
            "naive_images": len(naive_paths),
            "ratio": round(ours / naive, 2),
            "raw_forward_images_per_s": round(raw, 2),
            "raw_ratio": round(raw / naive, 2),
            "fraction_of_raw": round(ours / raw, 3),
            "rounds": {key: [round(v, 2) for v in values] for key, values in rates.items() if key.startswith(label)},
        }
    rows["naive rounds"] = [round(v, 2) for v in rates["naive"]]
    return rows


class NaiveModel:
    """The loop a user writes first: PIL + open_clip preprocess + fp32 torch model, batch 32."""

    def __init__(self, model_name: str, pretrained: str, device: torch.device, warm_paths: list[Path]):
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None if pretrained == "random" else pretrained
        )
        self.model = self.model.eval().to(device)
        self.device = device
        self.time(warm_paths)  # untimed warm-up batch, as for the other measurements

    def time(self, paths: list[Path]) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(paths), 32):
                batch = torch.stack([self.preprocess(Image.open(p)) for p in paths[start : start + 32]])
                self.model.encode_image(batch.to(self.device)).cpu()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="random", help="open_clip tag, checkpoint path, or random")
    parser.add_argument("--images", type=Path, help="a folder of images; default: synthetic JPEG sets")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"])
    parser.add_argument("--compare", default=None, help="runtime:precision list measured in one process, e.g. "
                        "torch:auto,openvino:fp32,openvino:int8 (overrides --runtime/--precision)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved measurement rounds (medians reported)")
    parser.add_argument("--workers", type=int, default=None, help="decode worker processes (default: automatic)")
    parser.add_argument("--streams", type=int, default=None, help="OpenVINO inference streams (default: its THROUGHPUT hint)")
    parser.add_argument("--splits", default=None, help="decode workers:inference streams pairs measured side by side, "
                        "e.g. 1:1,1:2,2:2 (0 streams: OpenVINO's own choice)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--count", type=int, default=None, help="images per synthetic set (default: per set)")
    parser.add_argument("--naive-limit", type=int, default=None, help="time the naive loop on at most N images")
    parser.add_argument("--sets", default=",".join(SYNTHETIC_SETS), help="synthetic sets to run")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "clipxfer-bench-images")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    encoders = load_encoders(args)
    first = next(iter(encoders.values()))[0]
    cuda = first.device.type == "cuda"
    args.batch_size = args.batch_size or (512 if cuda else 64)
    for encoder, _ in encoders.values():
        warm_up(encoder, args.batch_size)
    if args.images:
        sets = {args.images.name: args.images}
    else:
        sets = {}
        for name in args.sets.split(","):
            width, height, cpu_count, cuda_count = SYNTHETIC_SETS[name]
            count = args.count or (cuda_count if cuda else cpu_count)
            sets[name] = make_set(args.data_dir / (f"{name}-{count}" if args.count else name), width, height, count)
    results = {name: measure_set(folder, args, encoders) for name, folder in sets.items()}
    headline = results.get("photo_500x375") or next(iter(results.values()))
    report = {
        "device": str(first.device),
        # JPEGs decoded on the GPU (nvjpeg) by the index path; CLIPXFER_DEVICE_DECODE=0 turns it off.
        "device_decode": device_decode_default(first),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, flags {cpu_flag_summary()}"
        + (f", {torch.cuda.get_device_name()}" if cuda else ""),
        "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "runtimes": {label: {key: row[key] for key in ("images_per_s", "ratio", "raw_forward_images_per_s", "fraction_of_raw")}
                     for label, row in headline.items() if isinstance(row, dict)},
        "sets": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, rows in results.items():
            for label, row in rows.items():
                if isinstance(row, dict):
                    print(f"{name} {label}: {row['images_per_s']} img/s vs naive {row['naive_images_per_s']} "
                          f"({row['ratio']}x), raw forward {row['raw_forward_images_per_s']} ({row['fraction_of_raw']:.0%})")


if __name__ == "__main__":
    main()
