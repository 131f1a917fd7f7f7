"""Defect-type classification on the defect zoo: the defect-type head (anomaly-map statistics and
patch features through a detector fitted on good parts; ``clipxfer anomaly fit-types``) against the
pooled probe (logistic regression on the pooled image features, what ``clipxfer probe`` fits).

Per texture and seed: the detector (fused patchcore + gaussian at ``--resolution``) is fitted on 16
shots of ``train/good`` drawn with the seed. The classes are ``good`` and every defect kind of
``test/``; each class's images are shuffled with the seed, the first K are the labelled shots and the
last ``--test-per-class`` the test images (the same test images for every K of a seed). Both
classifiers are the same multinomial logistic regression with the L2 strength chosen by stratified
cross-validation on the shots (:func:`clipxfer.anomaly.defect_types.fit_linear`); they differ only in
their inputs, and the defect-type head chooses which of its feature groups to read by the same
cross-validation (:func:`clipxfer.anomaly.defect_types.fit_on_groups`, what ``anomaly fit-types`` does). Reported: accuracy overall and per class, K x seeds.

    PYTHONPATH=. python benchmarks/anomaly_types.py /tmp/i23type_zoo32 --shots 4,16 --seeds 1,2,3 \\
        --out benchmarks/results/anomaly_types.csv
(the zoo: ``clipxfer anomaly textures /tmp/i23type_zoo32 --train-good 60 --test-good 32 --per-defect 32``)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from clipxfer.anomaly.defect_types import GROUPS, design_matrix, fit_linear, fit_on_groups, type_features
from clipxfer.anomaly.detector import build_detector, split_good
from clipxfer.anomaly.patches import encode_dense, take_patches
from clipxfer.anomaly.tiling import working_resolution
from clipxfer.encoders import cached_encoder
from clipxfer.heads.linear import probe_inputs
from clipxfer.images import find_images

#: The zoo's small flaws: point defects 1-5% of the side and thin low-contrast scratches.
SMALL_FLAWS = ("speckle", "faint_scratch")
BATCH = 32


def accuracy_rows(predicted, truth, classes, base: dict) -> list[dict]:
    rows = [{**base, "class": "all", "accuracy": float((predicted == truth).mean())}]
    for i, name in enumerate(classes):
        rows.append({**base, "class": name, "accuracy": float((predicted[truth == i] == i).mean())})
    small = np.isin(truth, [classes.index(name) for name in SMALL_FLAWS if name in classes])
    rows.append({**base, "class": "small_flaws", "accuracy": float((predicted[small] == truth[small]).mean())})
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("zoo")
    parser.add_argument("--model", default="lite")
    parser.add_argument("--shots", default="4,16")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--detector-shots", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=384)
    parser.add_argument("--test-per-class", type=int, default=16)
    parser.add_argument("--textures", default=None, help="comma-separated subset of the zoo's categories")
    parser.add_argument("--out", default="benchmarks/results/anomaly_types.csv")
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    encoder = cached_encoder(args.model, "cpu", "fp32")
    size = working_resolution(encoder, args.resolution)
    shots, seeds = [int(v) for v in args.shots.split(",")], [int(v) for v in args.seeds.split(",")]
    zoo = Path(args.zoo)
    textures = args.textures.split(",") if args.textures else sorted(p.name for p in zoo.iterdir() if (p / "train").is_dir())
    rows = []
    for texture in textures:
        root = zoo / texture
        classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
        paths = {name: list(find_images(root / "test" / name)) for name in classes}
        images = [path for name in classes for path in paths[name]]
        labels = np.array([i for i, name in enumerate(classes) for _ in paths[name]])
        good = list(find_images(root / "train" / "good"))
        print(f"{texture}: {len(classes)} classes, {len(images)} images; encoding at {size} px", file=sys.stderr, flush=True)
        train_good = encode_dense(encoder, good, resolution=size)
        detectors = {seed: build_detector(encoder, take_patches(train_good, split_good(len(good), args.detector_shots, seed)[0]),
                                          "fused", texture, seed, members=["patchcore", "gaussian"], resolution=size)
                     for seed in seeds}  # fmt: skip
        del train_good
        features = {seed: {name: [] for name in GROUPS} for seed in seeds}
        for start in range(0, len(images), BATCH):
            patches = encode_dense(encoder, images[start : start + BATCH], resolution=size)
            for seed, detector in detectors.items():
                for name, value in type_features(detector, patches).items():
                    features[seed][name].append(value)
        features = {seed: {name: np.concatenate(parts) for name, parts in groups.items()} for seed, groups in features.items()}
        pooled = probe_inputs(encoder.embed_images(images)).astype(np.float64)
        for seed in seeds:
            order = {i: np.random.default_rng([seed, i]).permutation(np.flatnonzero(labels == i)) for i in range(len(classes))}
            test = np.concatenate([order[i][-args.test_per_class :] for i in order])
            for k in shots:
                train = np.concatenate([order[i][:k] for i in order])
                assert not set(train) & set(test), "labelled shots and test images overlap"
                groups = {name: value[train] for name, value in features[seed].items()}
                head = fit_on_groups(groups, labels[train], len(classes), seed)
                x_test = design_matrix({name: value[test] for name, value in features[seed].items()}, head["mean"],
                                       head["scale"], head["names"])  # fmt: skip
                base = {"texture": texture, "seed": seed, "shots": k, "resolution": size, "model_id": encoder.id}
                predicted = (x_test @ head["weights"].T + head["bias"]).argmax(axis=1)
                rows += accuracy_rows(predicted, labels[test], classes, {**base, "classifier": "defect-types",
                                      "l2": head["choice"]["l2"], "groups": "+".join(head["names"])})  # fmt: skip
                weights, bias, choice = fit_linear(pooled[train], labels[train], len(classes), seed)
                predicted = (pooled[test] @ weights.T + bias).argmax(axis=1)
                rows += accuracy_rows(predicted, labels[test], classes, {**base, "classifier": "pooled-probe", "l2": choice["l2"]})
                print(texture, seed, k, [(r["classifier"], round(r["accuracy"], 3)) for r in rows[-2 * (len(classes) + 2):]
                                         if r["class"] in ("all", "small_flaws")], file=sys.stderr, flush=True)  # fmt: skip
        pd.DataFrame(rows).to_csv(args.out, index=False)
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False)
    summary = table.pivot_table(index=["shots", "class"], columns="classifier", values="accuracy", aggfunc=["mean", "std"])
    print(f"{datetime.date.today()} {platform.machine()} {encoder.id} at {size} px, seeds {args.seeds}, textures {textures}")
    print(summary.round(3).to_markdown())


if __name__ == "__main__":
    main()
