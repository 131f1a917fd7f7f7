"""Per-kind tables of a `clipxfer bench --task anomaly` run on the defect zoo: image AUROC per kind at each
shot count (mean over textures and seeds), and at one shot count pixel AUROC, false alarms and misses,
with each texture's image AUROC.

    PYTHONPATH=. python benchmarks/anomaly_zoo_table.py bench-anomaly/anomaly_results.csv --shots 16
"""

from __future__ import annotations

import argparse

import pandas as pd


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results", help="anomaly_results.csv")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--method", default=None, help="only this method (default: all, one table each)")
    args = parser.parse_args()
    table = pd.read_csv(args.results)
    for method in [args.method] if args.method else sorted(table["method"].unique()):
        rows = table[table["method"] == method]
        # mean over textures per seed first, so the std is over seeds
        per_seed = rows.groupby(["group", "shots", "seed"])[["image_auroc", "pixel_auroc", "false_alarm_rate", "miss_rate"]].mean()
        over_seeds = per_seed.groupby(["group", "shots"]).agg(["mean", "std"])
        shots = sorted(rows["shots"].unique())
        textures = sorted(rows["dataset"].unique())
        chosen = rows[rows["shots"] == args.shots]
        settings = chosen.groupby(["resolution", "members"]).size().to_dict() if "members" in chosen else {}
        print(f"### {method}: image AUROC per kind (mean ± std over seeds of the mean over {', '.join(textures)})\n")
        print(f"Settings chosen at {args.shots} shots (cells): " + ", ".join(f"{r} px {m}: {n // max(1, rows['group'].nunique())}" for (r, m), n in settings.items()) + "\n")
        header = ["kind", *[f"{k} shots" for k in shots], f"pixel AUROC ({args.shots})", f"false alarms ({args.shots})",
                  f"miss rate ({args.shots})", *[f"{t} ({args.shots})" for t in textures]]
        print("| " + " | ".join(header) + " |")
        print("|" + " --- |" * len(header))
        kinds = [g for g in rows["group"].unique() if g not in ("local", "global")]
        order = sorted(kinds, key=lambda g: (rows[rows["group"] == g]["pixel_auroc"].isna().all(), g)) + ["local", "global"]
        for group in order:
            cells = []
            for k in shots:
                mean, std = over_seeds.loc[(group, k), ("image_auroc", "mean")], over_seeds.loc[(group, k), ("image_auroc", "std")]
                cells.append(f"{mean:.3f} ± {std:.3f}")
            at = over_seeds.loc[(group, args.shots)]
            pixel = at[("pixel_auroc", "mean")]
            cells += ["" if pd.isna(pixel) else f"{pixel:.3f}", f"{at[('false_alarm_rate', 'mean')]:.3f}", f"{at[('miss_rate', 'mean')]:.3f}"]
            for texture in textures:
                value = chosen[(chosen["dataset"] == texture) & (chosen["group"] == group)]["image_auroc"].mean()
                cells.append(f"{value:.3f}")
            print(f"| {group} | " + " | ".join(cells) + " |")
        kind_means = rows[rows["group"].isin(kinds)].groupby(["shots", "seed"])["image_auroc"].mean().groupby("shots").agg(["mean", "std"])
        print("| mean over kinds | " + " | ".join(f"{kind_means.loc[k, 'mean']:.3f} ± {kind_means.loc[k, 'std']:.3f}" for k in shots) + " |" + " |" * (3 + len(textures)))
        print()


if __name__ == "__main__":
    main()
