"""Conformal prediction sets on real data: coverage, set size and --reject rates of a head calibrated
on its own validation split, measured on the held-out test set.

    python benchmarks/conformal.py [--data fashion-mnist] [--model lite] [--methods zeroshot probe]
        [--shots 16] [--seeds 1 2 3] [--alphas 0.05 0.1 0.2] [--max-test 2000] [--json]

This is exactly what ``predict --conformal ALPHA`` does with a head from ``clipxfer probe``: the
calibration is the validation split drawn with the training shots (never the test set). Coverage
is guaranteed >= 1 - alpha in expectation over draws, so single seeds scatter around it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipxfer.calibrate.sets import calibrate_on, conformal_sets  # noqa: E402
from clipxfer.datasets.labelled import load_dataset
from clipxfer.encoders import load_encoder  # noqa: E402
from clipxfer.fewshot.task import prepare_task
from clipxfer.heads.fitting import fit_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--model", default="lite")
    parser.add_argument("--methods", nargs="+", default=["zeroshot", "probe"])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--scores", nargs="+", default=["aps", "raps", "lac"])
    parser.add_argument("--max-test", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    encoder = load_encoder(args.model)
    dataset = load_dataset(args.data)
    rows = []
    for seed in args.seeds:
        task = prepare_task(encoder, dataset, args.shots, seed, max_test=args.max_test)
        for method in args.methods:
            head = fit_head(method, task.data)
            calibration = calibrate_on(head, task.data.val, task.data.val_labels, "validation split")
            probs = head.predict_proba(task.test)
            accuracy = float((probs.argmax(axis=1) == task.test_labels).mean())
            for score in args.scores:
                for alpha in args.alphas:
                    sets = conformal_sets(probs, calibration, alpha, score, reject=True)
                    rows.append({"method": method, "score": score, "seed": seed, "alpha": alpha, "accuracy": accuracy,
                                 "calibration_size": len(calibration), **sets.evaluate(task.test_labels)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.data}, {args.model}, {args.shots} shots, seeds {args.seeds}, test n={rows[0]['n']}, "
          f"calibration = validation split ({rows[0]['calibration_size']} images)\n")
    print("| method | score | alpha | accuracy | coverage (>= 1-alpha) | mean set size | unknown (--reject) | wrong decisions (<= alpha) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for method, score, alpha in itertools.product(args.methods, args.scores, args.alphas):
        cell = [r for r in rows if (r["method"], r["score"], r["alpha"]) == (method, score, alpha)]

        def stat(key, cell=cell):
            values = np.array([r[key] for r in cell])
            return f"{values.mean():.3f} +- {values.std():.3f}"

        print(f"| {method} | {score} | {alpha} | {stat('accuracy')} | {stat('coverage')} | {stat('mean_set_size')} | "
              f"{stat('unknown_rate')} | {stat('error_rate_of_decisions')} |")


if __name__ == "__main__":
    main()
