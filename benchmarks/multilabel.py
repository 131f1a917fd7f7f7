"""Multi-label on mosaics of real images: zero-shot vs the per-label sigmoid probe (mAP, micro/macro F1).

Usage: python benchmarks/multilabel.py --data fashion-mnist,digits --shots 16 --seeds 1,2,3 --model lite
"""

from __future__ import annotations

import argparse

import numpy as np

from clipxfer.encoders import load_encoder
from clipxfer.fewshot.multilabel import run_multilabel_mosaics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist,digits")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--model", default="lite")
    parser.add_argument("--test", type=int, default=500, help="Test mosaics.")
    args = parser.parse_args()
    encoder = load_encoder(args.model)
    print("| data | seed | zero-shot mAP | probe mAP | zero-shot micro/macro F1 | probe micro/macro F1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.data.split(","):
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run_multilabel_mosaics(name, args.shots, seed, encoder=encoder, test_count=args.test)
            z, p = r["zeroshot"], r["probe"]
            rows.append([z["map"], p["map"], z["micro_f1"], z["macro_f1"], p["micro_f1"], p["macro_f1"]])
            print(f"| {r['dataset']} | {seed} | {z['map']:.3f} | {p['map']:.3f} | {z['micro_f1']:.3f} / "
                  f"{z['macro_f1']:.3f} | {p['micro_f1']:.3f} / {p['macro_f1']:.3f} |", flush=True)
        m = np.mean(rows, axis=0)
        print(f"| {name} mean | | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} / {m[3]:.3f} | {m[4]:.3f} / {m[5]:.3f} |")


if __name__ == "__main__":
    main()
