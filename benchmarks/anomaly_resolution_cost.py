"""The cost of a working resolution: scoring speed (parts/s) of a 16-shot fused detector (patchcore +
gaussian) on 250x250 parts at each resolution, with its tile count, feature grid and memory bank, in
interleaved rounds in one process so the machine's load affects all alike. Run it on a quiet machine.

    PYTHONPATH=. python benchmarks/anomaly_resolution_cost.py /tmp/zoo/brick --resolutions 224,256,384,448 --rounds 3
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from clipxfer.anomaly import build_detector
from clipxfer.anomaly.detector import split_good
from clipxfer.anomaly.patches import encode_dense
from clipxfer.anomaly.tiling import feature_strides, tile_starts, working_resolution
from clipxfer.encoders import load_encoder
from clipxfer.images import find_images


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("category", help="an anomaly set category (train/good, test/)")
    parser.add_argument("--model", default="lite")
    parser.add_argument("--resolutions", default="224,256,384,448")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    category = Path(args.category)
    encoder = load_encoder(args.model, "cpu")
    good = list(find_images(category / "train" / "good"))
    fit_rows, _ = split_good(len(good), 16, seed=1)
    test = list(find_images(category / "test"))[: args.images]
    detectors = {}
    for value in args.resolutions.split(","):
        size = working_resolution(encoder, int(value))
        shots = encode_dense(encoder, [good[i] for i in fit_rows], resolution=size)
        # Speed does not depend on the thresholds; the median stands in for them.
        detector = build_detector(encoder, shots, "fused", seed=1, members=["patchcore", "gaussian"], resolution=size)
        outputs = detector.member_outputs(shots)
        detector.config["member_calibration"] = {
            m: {"threshold": float(np.max(s)) + 1.0, "median": float(np.median(s))} for m, (s, _) in outputs.items()
        }
        detectors[size] = detector
        detector.score(encode_dense(encoder, test[:4], resolution=size))  # warm-up
    rates = {size: [] for size in detectors}
    for _ in range(args.rounds):
        for size, detector in detectors.items():
            started = time.perf_counter()
            detector.score(encode_dense(encoder, test, batch_size=16, resolution=size))
            rates[size].append(len(test) / (time.perf_counter() - started))
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {encoder.id} ({encoder.runtime} {encoder.precision})")
    print(f"parts: {len(test)} of {category}, batch 16, {args.rounds} interleaved rounds, fused patchcore+gaussian, 16 shots")
    print("| resolution | tiles | feature grid | bank patches | parts/s (median) | rounds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size, detector in detectors.items():
        # The tiles encode_tiled cuts: their starts step in whole cells of both feature grids.
        step = math.lcm(*feature_strides(encoder))
        tiles = 1 if size == encoder.input_size else len(tile_starts(size, encoder.input_size, step)) ** 2
        grid = detector.config["feature_grid"]
        print(f"| {size} | {tiles} | {grid[0]}x{grid[1]} | {detector.config['bank_size']} | "
              f"{np.median(rates[size]):.1f} | {', '.join(f'{v:.1f}' for v in rates[size])} |")


if __name__ == "__main__":
    main()
