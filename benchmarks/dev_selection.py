"""Settings chosen on validation, checked on dev images: the probe's L2 rule (validation loss vs accuracy)
and CLAP's feature weight (fixed 2 vs chosen on validation loss), with lite.

Dev images are 500 training-pool images per dataset that no draw uses (never the test split); the draws
are the bench's (same seeds, same validation images).

    python benchmarks/dev_selection.py --data fashion-mnist,digits,mnist-5k --shots 16
"""

from __future__ import annotations

import argparse

import numpy as np

from clipxfer.datasets.features import encode_dataset, take
from clipxfer.datasets.labelled import load_dataset
from clipxfer.datasets.prompts import load_templates
from clipxfer.datasets.splits import draw_few_shot, held_out_test
from clipxfer.encoders.registry import load_encoder
from clipxfer.heads.base import FewShotData
from clipxfer.heads.fitting import fit_head
from clipxfer.heads.zeroshot import fit_zeroshot

DEV_IMAGES = 500
DEV_SEED = 99
VARIANTS = {
    "probe, L2 by validation accuracy": ("probe", {"select": "accuracy"}),
    "probe, L2 by validation loss": ("probe", {"select": "loss"}),
    "clap, feature weight 2": ("clap", {"feature_weight": 2.0}),
    "clap, feature weight by validation loss": ("clap", {}),
}


def dev_accuracies(name: str, shots: int, seeds: list[int], encoder) -> dict[str, list[float]]:
    """Dev accuracy per variant and seed on dataset ``name``."""
    dataset = load_dataset(name)
    splits = {seed: draw_few_shot(dataset, shots, seed) for seed in seeds}
    pool, _ = held_out_test(dataset)
    drawn = np.concatenate([np.concatenate([s.train, s.val]) for s in splits.values()])
    dev = np.sort(np.random.default_rng(DEV_SEED).choice(np.setdiff1d(pool, drawn), DEV_IMAGES, replace=False))
    needed = np.unique(np.concatenate([drawn, dev]))
    encoding = encode_dataset(encoder, dataset.subset(needed))
    row = {int(i): r for r, i in enumerate(needed)}

    def rows(indices):
        return take(encoding, np.array([row[int(i)] for i in indices], dtype=np.int64))

    zeroshot = fit_zeroshot(encoder, dataset.classnames, load_templates("simple"))
    dev_encoding, dev_labels = rows(dev), dataset.labels[dev]
    scores: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for seed, split in splits.items():
        data = FewShotData(encoder, dataset.classnames, rows(split.train), dataset.labels[split.train],
                           rows(split.val), dataset.labels[split.val], zeroshot, shots, seed)
        for variant, (method, options) in VARIANTS.items():
            head = fit_head(method, data, **options)
            scores[variant].append(float((head.predict(dev_encoding) == dev_labels).mean()))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist,digits,mnist-5k")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--model", default="lite")
    args = parser.parse_args()
    encoder = load_encoder(args.model)
    names = args.data.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {name: dev_accuracies(name, args.shots, seeds, encoder) for name in names}
    print(f"| dev accuracy, {args.shots} shots, mean (per seed) | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for variant in VARIANTS:
        cells = [f"{np.mean(results[n][variant]):.3f} ({' '.join(f'{v:.3f}' for v in results[n][variant])})"
                 for n in names]
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
