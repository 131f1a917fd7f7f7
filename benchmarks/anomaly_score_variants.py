"""Image scores from a PatchCore map that might resist busy textures, compared on synthetic flaws
(:mod:`clipxfer.anomaly.synthetic`, the validation the detector chooses its settings on) and, only to
confirm, on the zoo's test defects.

Variants (each the maximum of the upsampled, smoothed patch map unless said):
- ``base``: nearest-bank-patch distance, sigma 4 input pixels (today's patchcore member);
- ``sigma2``: the same with half the smoothing (a small flaw's peak is less diluted);
- ``top0.1%``: the mean of the map's top 0.1% pixels instead of its maximum;
- ``density``: the distance divided by the nearest bank patch's own mean distance to its 3 nearest
  bank neighbours (a local-outlier-factor-like ratio: busy good patches live in sparse parts of the
  bank, where every distance is large);
- ``density_sigma2``: both.

    PYTHONPATH=. python benchmarks/anomaly_score_variants.py /tmp/zoo/grass --resolution 384 --seeds 1,2,3 [--test]

Per texture: 16 shots drawn as ``clipxfer bench --task anomaly`` draws them; the validation goods are
the held-out rows ``validation_rows`` picks (never calibration parts), each with every synthetic flaw.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from clipxfer.anomaly.coreset import coreset_size, greedy_coreset
from clipxfer.anomaly.detector import split_good
from clipxfer.anomaly.evaluate import load_labelled_folder
from clipxfer.anomaly.patchcore import CORESET_MIN, CORESET_RATIO
from clipxfer.anomaly.patches import encode_dense
from clipxfer.anomaly.selection import validation_rows
from clipxfer.anomaly.smoothing import SMOOTHING_SIGMA, upsample_and_smooth
from clipxfer.anomaly.synthetic import synthetic_flaw
from clipxfer.anomaly.tiling import working_resolution
from clipxfer.encoders import cached_encoder
from clipxfer.images import find_images

#: Synthetic kinds that are local (the global ones are the gaussian member's business).
LOCAL_FLAWS = ("cutpaste", "speckles", "thin_line", "texture_swap")
DENSITY_NEIGHBOURS = 3


def search(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatL2(base.shape[1])
    index.add(np.ascontiguousarray(base, np.float32))
    distances, rows = index.search(np.ascontiguousarray(queries, np.float32), k)
    return np.sqrt(np.maximum(distances, 0.0)), rows


def variant_scores(local: np.ndarray, bank: np.ndarray, resolution: int, input_size: int) -> dict[str, np.ndarray]:
    n, h, w, c = local.shape
    distances, rows = search(local.reshape(-1, c), bank, 1)
    bank_distances, _ = search(bank, bank, DENSITY_NEIGHBOURS + 1)
    radius = np.maximum(bank_distances[:, 1:].mean(axis=1), 1e-6)
    plain = distances[:, 0].reshape(n, h, w)
    density = (distances[:, 0] / radius[rows[:, 0]]).reshape(n, h, w)

    def pooled(grid, sigma, top=None):
        maps = upsample_and_smooth(grid, resolution, sigma * resolution / input_size).reshape(n, -1)
        if top is None:
            return maps.max(axis=1)
        count = max(1, int(maps.shape[1] * top))
        return np.sort(maps, axis=1)[:, -count:].mean(axis=1)

    return {
        "base": pooled(plain, SMOOTHING_SIGMA), "sigma2": pooled(plain, SMOOTHING_SIGMA / 2),
        "top0.1%": pooled(plain, SMOOTHING_SIGMA, 0.001), "density": pooled(density, SMOOTHING_SIGMA),
        "density_sigma2": pooled(density, SMOOTHING_SIGMA / 2),
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("category", help="a zoo texture folder (train/good, test/)")
    parser.add_argument("--model", default="lite")
    parser.add_argument("--resolution", type=int, default=384)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--test", action="store_true", help="also score the zoo's test defects (confirmation only)")
    args = parser.parse_args()
    encoder = cached_encoder(args.model, "cpu", None)
    resolution = working_resolution(encoder, args.resolution)
    root = Path(args.category)
    train = list(find_images(root / "train" / "good"))
    train_local = encode_dense(encoder, train, resolution=resolution).local
    test = load_labelled_folder(root / "test") if args.test else None
    test_local = encode_dense(encoder, test.paths, resolution=resolution).local if test else None
    results: dict[tuple[str, str, str], list[float]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        fit_rows, held_out = split_good(len(train), args.shots, seed)
        check_rows, _ = validation_rows(held_out, 0)
        flawed = [synthetic_flaw(train[i], kind, int(i)) for kind in LOCAL_FLAWS for i in check_rows]
        flawed_local = encode_dense(encoder, flawed, resolution=resolution).local
        rows = train_local[fit_rows].reshape(-1, train_local.shape[-1])
        bank = rows[greedy_coreset(rows, coreset_size(len(rows), CORESET_RATIO, CORESET_MIN), seed)]
        sets = {"synthetic": (np.concatenate([train_local[check_rows], flawed_local]),
                              np.array(["good"] * len(check_rows) + [k for k in LOCAL_FLAWS for _ in check_rows]))}
        if test is not None:
            sets["zoo"] = (test_local, np.array(test.kinds))
        for name, (local, kinds) in sets.items():
            scores = variant_scores(local, bank, resolution, encoder.input_size)
            for kind in sorted(set(kinds) - {"good"}):
                chosen = (kinds == "good") | (kinds == kind)
                for variant, values in scores.items():
                    auroc = roc_auc_score(kinds[chosen] == kind, values[chosen])
                    results.setdefault((name, kind, variant), []).append(auroc)
    variants = list(dict.fromkeys(key[2] for key in results))
    print(f"{root.name}, {resolution} px, {args.shots} shots, seeds {args.seeds}: image AUROC (mean over seeds)")
    print("| set | kind | " + " | ".join(variants) + " |")
    print("| --- | --- |" + " --- |" * len(variants))
    for name in dict.fromkeys(key[0] for key in results):
        kinds = sorted({key[1] for key in results if key[0] == name})
        for kind in [*kinds, "mean"]:
            cells = []
            for variant in variants:
                if kind == "mean":
                    value = np.mean([np.mean(results[(name, k, variant)]) for k in kinds])
                else:
                    value = np.mean(results[(name, kind, variant)])
                cells.append(f"{value:.3f}")
            print(f"| {name} | {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
