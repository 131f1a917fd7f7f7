"""Richer lite features for the few-shot probe, checked on dev images (never the test split): pooled
intermediate EfficientNet stages beside the 1280-d features, horizontal-flip test-time averaging and
flip augmentation of the shots, power transform and standardisation. lite in torch fp32.

Dev images: 500 training-pool images no draw uses. The probe is the L2 logistic regression of
``heads/probe.py`` (no prior), its L2 chosen over 13 values by validation loss on the draw's validation images.

    python benchmarks/lite_feature_variants.py --data fashion-mnist --shots 16
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from clipxfer.datasets.labelled import load_dataset
from clipxfer.datasets.splits import draw_few_shot, held_out_test
from clipxfer.encoders.registry import load_encoder
from clipxfer.heads.linear import cross_entropy
from clipxfer.heads.probe import fit_logistic
from clipxfer.images import load_model_input

DEV_IMAGES = 500
DEV_SEED = 99
#: Output widths of EfficientNet-Lite0's seven stages and the 1280-d head convolution (index 7).
WIDTHS = [16, 24, 40, 80, 112, 192, 320, 1280]
STAGE_SETS = {"final": [7], "final + stage 5": [5, 7], "final + stages 4-6": [4, 5, 6, 7],
              "final + stages 3-6": [3, 4, 5, 6, 7]}
L2_VALUES = np.logspace(-5, 1, 13)[::-1]


def pooled_stages(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """Global-average-pooled output of every stage and of the head convolution, concatenated."""
    model = encoder.image_model
    x = model.bn1(model.conv_stem(pixels))
    pools = []
    for stage in model.blocks:
        x = stage(x)
        pools.append(x.mean((2, 3)))
    pools.append(model.bn2(model.conv_head(x)).mean((2, 3)))
    return torch.cat(pools, 1).float()


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def stage_block(features: np.ndarray, stages: list[int]) -> np.ndarray:
    """The chosen stages, each L2-normalised, concatenated (unit rows)."""
    offsets = np.cumsum([0] + WIDTHS)
    parts = [unit(features[:, offsets[s]:offsets[s + 1]]) for s in stages]
    return np.concatenate(parts, 1) / np.sqrt(len(parts))


def transform(kind: str, train: np.ndarray, rows: np.ndarray) -> np.ndarray:
    if kind == "sqrt":
        return unit(np.sqrt(np.abs(rows)))
    if kind == "standardise":
        return unit((rows - train.mean(0)) / (train.std(0) + 1e-6))
    return unit(rows)


def probe_accuracy(x_train, y_train, x_val, y_val, x_dev, y_dev, num_classes) -> float:
    """Dev accuracy of the probe whose L2 has the lowest validation loss."""
    best = None
    for l2 in L2_VALUES:
        params = fit_logistic(x_train, y_train, num_classes, float(l2))
        w, b = params["W"].numpy(), params["b"].numpy()
        loss = cross_entropy(x_val @ w.T + b, y_val)
        if best is None or loss < best[0]:
            best = (loss, w, b)
    return float(((x_dev @ best[1].T + best[2]).argmax(1) == y_dev).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", default="1,2,3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = load_dataset(args.data)
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = {seed: draw_few_shot(dataset, args.shots, seed) for seed in seeds}
    pool, _ = held_out_test(dataset)
    drawn = np.concatenate([np.concatenate([s.train, s.val]) for s in splits.values()])
    dev = np.sort(np.random.default_rng(DEV_SEED).choice(np.setdiff1d(pool, drawn), DEV_IMAGES, replace=False))
    needed = np.unique(np.concatenate([drawn, dev]))
    encoder = load_encoder("lite", precision="torch:fp32")
    original, flipped = [], []
    with torch.inference_mode():
        for start in range(0, len(needed), 64):
            batch = needed[start:start + 64]
            pixels = encoder.pixels_to_tensor(np.stack([load_model_input(dataset.sources[i], 224) for i in batch]))
            original.append(pooled_stages(encoder, pixels).numpy())
            flipped.append(pooled_stages(encoder, torch.flip(pixels, dims=[3])).numpy())
    original, flipped = np.concatenate(original), np.concatenate(flipped)
    row = {int(i): r for r, i in enumerate(needed)}
    labels = dataset.labels[needed]
    num_classes = len(dataset.classnames)

    def rows(indices):
        return np.array([row[int(i)] for i in indices])

    dev_rows = rows(dev)
    results: dict[str, list[float]] = {}
    for seed, split in splits.items():
        train, val = rows(split.train), rows(split.val)
        y_train, y_val, y_dev = labels[train], labels[val], labels[dev_rows]
        final = original[:, -1280:]
        for kind in ("L2-normalised", "sqrt", "standardise"):
            x = [transform(kind, final[train], final[r]) for r in (train, val, dev_rows)]
            results.setdefault(f"final, {kind}", []).append(
                probe_accuracy(x[0], y_train, x[1], y_val, x[2], y_dev, num_classes))
        for flip in ("none", "test-time average", "augment shots + test-time average"):
            for name, stages in STAGE_SETS.items():
                def feats(r, average):
                    return stage_block((original[r] + flipped[r]) / 2 if average else original[r], stages)

                x_train, y_fit = feats(train, False), y_train
                if flip.startswith("augment"):
                    x_train = np.concatenate([x_train, stage_block(flipped[train], stages)])
                    y_fit = np.concatenate([y_train, y_train])
                average = flip != "none"
                results.setdefault(f"{name}, flip {flip}", []).append(probe_accuracy(
                    x_train, y_fit, feats(val, average), y_val, feats(dev_rows, average), y_dev, num_classes))
    print(f"| {args.data}, {args.shots} shots, dev accuracy | mean | per seed |")
    print("| --- | --- | --- |")
    for name, values in results.items():
        print(f"| {name} | {np.mean(values):.3f} | {' '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()
