"""PaDiM-style per-position Gaussians (Defard et al., ICPR 2020) against PatchCore on the defect zoo: does a
``padim`` member earn its place in ``anomaly/``?

Both read the same lite patch features of the same 16 shots at one working size. PaDiM fits, at every grid
position, a Gaussian of the shots' features there (mean and Ledoit-Wolf shrinkage covariance, scikit-learn:
16 shots cannot estimate a full covariance alone); a patch's score is its Mahalanobis distance to its own
position's Gaussian. PatchCore is :mod:`clipxfer.anomaly.patchcore` (nearest patch anywhere). The image score
of both is the maximum of the smoothed map, image AUROC per kind against the test good parts.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/anomaly_padim.py /tmp/zoo/brick --seed 1 --resolution 224
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from clipxfer.anomaly.detector import split_good
from clipxfer.anomaly.patchcore import fit_patchcore, patchcore_grid
from clipxfer.anomaly.patches import encode_dense
from clipxfer.anomaly.smoothing import SMOOTHING_SIGMA, upsample_and_smooth
from clipxfer.anomaly.textures import LOCAL_DEFECTS
from clipxfer.encoders import cached_encoder
from clipxfer.images import find_images


def padim_grid(shots: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """``(n, h, w)`` Mahalanobis distance of each part's patch to the shots' Gaussian at its position."""
    _, height, width, _ = shots.shape
    grid = np.zeros(parts.shape[:3])
    for y in range(height):
        for x in range(width):
            fitted = LedoitWolf().fit(shots[:, y, x].astype(np.float64))
            centred = parts[:, y, x].astype(np.float64) - fitted.location_
            grid[:, y, x] = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, fitted.precision_, centred), 0.0))
    return grid


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("texture", help="one texture of 'clipxfer anomaly textures' (train/good, test/KIND)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    root = Path(args.texture)
    train = list(find_images(root / "train" / "good"))
    shots = [train[i] for i in split_good(len(train), args.shots, args.seed)[0]]
    kinds = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and p.name != "good")
    tests = [(path, kind) for kind in ["good", *kinds] for path in find_images(root / "test" / kind)]
    encoder = cached_encoder("lite", "cpu", None)
    shot_local = encode_dense(encoder, shots, resolution=args.resolution).local
    test_local = encode_dense(encoder, [path for path, _ in tests], resolution=args.resolution).local
    sigma = SMOOTHING_SIGMA * args.resolution / encoder.input_size
    grids = {"padim": padim_grid(shot_local, test_local),
             "patchcore": patchcore_grid(test_local, fit_patchcore(shot_local, args.seed)[0]["memory_bank"])}  # fmt: skip
    labels = np.array([kind for _, kind in tests])
    for name, grid in grids.items():
        scores = upsample_and_smooth(grid, args.resolution, sigma).reshape(len(tests), -1).max(axis=1)
        good = scores[labels == "good"]
        auroc = {kind: roc_auc_score(np.r_[np.zeros(len(good)), np.ones((labels == kind).sum())],
                                     np.r_[good, scores[labels == kind]]) for kind in kinds}  # fmt: skip
        local = np.mean([auroc[k] for k in kinds if k in LOCAL_DEFECTS])
        other = np.mean([auroc[k] for k in kinds if k not in LOCAL_DEFECTS])
        print(f"{root.name} seed {args.seed} {args.resolution} px {name}: local {local:.3f} global {other:.3f} "
              f"all {np.mean(list(auroc.values())):.3f} | " + " ".join(f"{k} {v:.3f}" for k, v in auroc.items()), flush=True)


if __name__ == "__main__":
    main()
