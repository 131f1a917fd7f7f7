"""One detector for many part types against one detector per type, on the defect zoo.

For each seed, each type (a category of the zoo: brick, grass, gravel) gets its own detector
(``fit_detector`` on its ``train/good`` with the seed: shots drawn, settings chosen on held-out goods,
threshold calibrated on the rest); the routed detector (``fit_routed_detector``, what ``anomaly fit DIR``
fits for one subfolder per type) holds the same per-type detectors (refitted at one common resolution
when the types chose different ones) and routes each test part to a type by its pooled patch features.
Every test part of every type (goods and defects) is scored by both; reported: image AUROC per type,
false-alarm rate on the test goods, and routing accuracy (share of test parts routed to their own type).

    PYTHONPATH=. python benchmarks/anomaly_routed.py /tmp/zoo --shots 16 --seeds 1,2,3 --out benchmarks/results/anomaly_routed.csv
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from clipxfer.anomaly import fit_detector, fit_routed_detector
from clipxfer.anomaly.evaluate import load_labelled_folder
from clipxfer.anomaly.patches import encode_dense
from clipxfer.encoders import cached_encoder
from clipxfer.images import find_images


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("zoo", help="a folder of anomaly categories (clipxfer anomaly textures OUT)")
    parser.add_argument("--model", default="lite")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--false-alarm-rate", type=float, default=0.05)
    parser.add_argument("--out", default="benchmarks/results/anomaly_routed.csv")
    args = parser.parse_args()
    encoder = cached_encoder(args.model, "cpu", "fp32")
    zoo = Path(args.zoo)
    names = sorted(p.name for p in zoo.iterdir() if (p / "train" / "good").is_dir())
    good = {name: list(find_images(zoo / name / "train" / "good")) for name in names}
    tests = {name: load_labelled_folder(zoo / name / "test") for name in names}
    rows = []
    for seed in map(int, args.seeds.split(",")):
        own = {name: fit_detector(encoder, good[name], args.shots, args.false_alarm_rate, object_name=name, seed=seed)
               for name in names}  # fmt: skip
        routed = fit_routed_detector(encoder, good, args.shots, args.false_alarm_rate, seed=seed, fitted=own)
        for row, name in enumerate(names):
            test = tests[name]
            truth = np.asarray(test.is_defect, bool)
            alone = own[name].score(encode_dense(encoder, test.paths, resolution=own[name].map_size)).scores
            patches = encode_dense(encoder, test.paths, resolution=routed.map_size)
            together = routed.score(patches).scores
            routes, margins = routed.routes(patches)
            for detector, scores, flagged in (("per-type", alone, own[name].decide(alone)),
                                              ("routed", together, routed.decide(together))):  # fmt: skip
                rows.append({
                    "type": name, "seed": seed, "shots": args.shots, "detector": detector,
                    "resolution": own[name].map_size if detector == "per-type" else routed.map_size,
                    "members": "+".join((own[name] if detector == "per-type" else routed.types[name]).members),
                    "image_auroc": roc_auc_score(truth, scores), "false_alarm_rate": float(flagged[~truth].mean()),
                    "miss_rate": float((~flagged[truth]).mean()),
                    "routing_accuracy": float(np.mean(np.asarray(routes) == name)) if detector == "routed" else None,
                    "median_margin": float(np.median(margins)) if detector == "routed" else None,
                    "fit_routing_accuracy": routed.config["routing"]["held_out_accuracy"], "model_id": encoder.id,
                })  # fmt: skip
            print(rows[-2], rows[-1], sep="\n", flush=True)
    table = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    summary = table.groupby(["type", "detector"])[["image_auroc", "false_alarm_rate", "miss_rate", "routing_accuracy"]]
    print(f"{datetime.date.today()} {platform.machine()} {encoder.id}, {args.shots} shots, seeds {args.seeds}")
    print(summary.agg(["mean", "std"]).round(3).to_markdown())


if __name__ == "__main__":
    main()
