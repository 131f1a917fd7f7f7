"""What precision an int8 graph's unquantized layers should run in: f32 or bf16.

    python benchmarks/int8_remainder.py --model ViT-B-32:random --images 512 --rounds 3
    python benchmarks/int8_remainder.py --model lite --images 512 --rounds 3

nncf leaves some layers of an int8 graph in float (a ViT's layer norms, softmax and GELU; lite's
stem and depthwise convolutions). OpenVINO runs them in its inference precision hint. This script
encodes the first ``--images`` Fashion-MNIST test images (real images, scaled to the model's input)
with torch fp32 (the reference) and with the cached OpenVINO int8 graph compiled with each hint, and
reports the cosine of each to the reference and the raw forward rate of each (batches of 64,
interleaved rounds, medians) on this CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipxfer.datasets.labelled import load_dataset
from clipxfer.device import cpu_flags  # noqa: E402
from clipxfer.encoders import load_encoder  # noqa: E402
from clipxfer.encoders.openvino_runtime import OpenVinoImageTower  # noqa: E402
from clipxfer.images import load_model_input  # noqa: E402

HINTS = ("f32", "bf16")


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def encode(encoder, pixels: np.ndarray, batch: int = 64):
    parts = [encoder.encode_pixels(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]
    return (np.concatenate([p.embeddings for p in parts]), np.concatenate([p.features for p in parts]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32:random")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    reference = load_encoder(args.model, device="cpu", precision="torch:fp32")
    candidate = load_encoder(args.model, device="cpu", precision="openvino:int8")
    dataset = load_dataset("fashion-mnist")
    sources = [dataset.sources[i] for i in np.flatnonzero(dataset.splits == "test")[: args.images]]
    pixels = np.stack([load_model_input(item, reference.input_size) for item in sources])
    expected = encode(reference, pixels)

    towers = {hint: OpenVinoImageTower(candidate, "int8", inference_hint=hint) for hint in HINTS}
    report = {"model": candidate.id, "cpu_flags": sorted(f for f in cpu_flags() if "bf16" in f or "vnni" in f
                                                          or f.startswith("amx")),
              "images": len(pixels), "date": time.strftime("%Y-%m-%d %H:%M")}
    for hint, tower in towers.items():
        candidate.image_runtime = tower
        got = encode(candidate, pixels)
        row = {}
        for name, ref, out in zip(("embeddings", "features"), expected, got):
            cos = cosine_rows(ref, out)
            row[f"{name}_cosine"] = {"mean": round(float(cos.mean()), 4), "min": round(float(cos.min()), 4),
                                     "p01": round(float(np.quantile(cos, 0.01)), 4)}
        report[hint] = row

    batch = pixels[:64] if len(pixels) >= 64 else np.resize(pixels, (64, *pixels.shape[1:]))
    rates: dict[str, list[float]] = {hint: [] for hint in HINTS}
    for _ in range(args.rounds):
        for hint, tower in towers.items():
            candidate.image_runtime = tower
            started = time.perf_counter()
            for _ in range(4):
                candidate.encode_pixels(batch)
            rates[hint].append(round(4 * len(batch) / (time.perf_counter() - started), 1))
    for hint in HINTS:
        report[hint]["raw_forward_rounds"] = rates[hint]
        report[hint]["raw_forward_images_per_s"] = float(np.median(rates[hint]))
    report["bf16_speedup"] = round(report["bf16"]["raw_forward_images_per_s"] / report["f32"]["raw_forward_images_per_s"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
