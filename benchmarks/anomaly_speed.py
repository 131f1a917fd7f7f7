"""Scoring speed of a lite PatchCore detector on 250x250 images, as images/s and as a ratio to
plain image embedding (``encoder.encode_images``) of the same files, measured in interleaved
rounds in one process so the machine's load affects both alike. Also the 16-shot memory bank
and detector file sizes.

    PYTHONPATH=. python benchmarks/anomaly_speed.py /tmp/tex/brick --rounds 2 --images 16
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipxfer.anomaly import build_detector
from clipxfer.anomaly.detector import split_good
from clipxfer.anomaly.patches import encode_dense
from clipxfer.encoders import load_encoder
from clipxfer.images import find_images


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("category", help="an anomaly set category (train/good, test/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    category = Path(args.category)
    encoder = load_encoder("lite", "cpu")
    good = list(find_images(category / "train" / "good"))
    fit_rows, _ = split_good(len(good), 16, seed=1)
    # Speed does not depend on the threshold, so the detector is not calibrated here.
    detector = build_detector(encoder, encode_dense(encoder, [good[i] for i in fit_rows]), "patchcore", seed=1)
    bank = detector.arrays["memory_bank"]
    with tempfile.TemporaryDirectory() as tmp:
        file_mb = os.path.getsize(detector.save(Path(tmp) / "det.safetensors")) / 2**20
    test = list(find_images(category / "test"))[: args.images]
    encoder.encode_images(test[:8])  # warm-up of both paths
    detector.score(encode_dense(encoder, test[:8]))
    embed, score = [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        encoder.encode_images(test, batch_size=16)
        embed.append(len(test) / (time.perf_counter() - started))
        started = time.perf_counter()
        detector.score(encode_dense(encoder, test, batch_size=16))
        score.append(len(test) / (time.perf_counter() - started))
    ratio = np.array(score) / np.array(embed)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, lite precision {encoder.dtype}")
    print(f"images: {len(test)} of {category}, 250x250 PNG, batch 16, {args.rounds} interleaved rounds")
    print(f"embed (encode_images):        {np.median(embed):.1f} img/s (rounds: {', '.join(f'{v:.1f}' for v in embed)})")
    print(f"anomaly score (PatchCore):    {np.median(score):.1f} img/s (rounds: {', '.join(f'{v:.1f}' for v in score)})")
    print(f"ratio score/embed:            {np.median(ratio):.2f} (rounds: {', '.join(f'{v:.2f}' for v in ratio)})")
    print(f"16-shot memory bank: {bank.shape[0]} x {bank.shape[1]} float32 = {bank.nbytes / 2**20:.2f} MB; "
          f"detector file {file_mb:.2f} MB; coreset of {detector.config['shot_patches']} patches")


if __name__ == "__main__":
    main()
