"""``clipxfer bench --task multilabel``: zero-shot against the multi-label probe over shots x seeds, on
seeded mosaics of built-in datasets or on multi-label manifests (:func:`clipxfer.fewshot.run_multilabel`);
writes multilabel_results.csv (one row per dataset, method, shots, seed) and multilabel_summary.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from ..encoders.base import Encoder
from ..fewshot.multilabel import CONFORMAL_ALPHA, run_multilabel
from ..paths import atomic_write_bytes
from .config import BenchConfig

COLUMNS = ["dataset", "method", "shots", "seed", "map", "micro_f1", "macro_f1", "val_map", "conformal_mean_miss",
           "conformal_max_miss", "conformal_set_size", "n_train", "n_test", "model_id"]


def run_multilabel_bench(config: BenchConfig, out_dir: str | Path, encoder: Encoder | None = None) -> pd.DataFrame:
    """Every dataset x shots x seed of ``config`` (its methods: ``zeroshot``, ``probe``); a dataset's
    ``max_test`` is the number of test mosaics. Returns the results table, written after every cell."""
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if encoder is None:
        from ..encoders import load_encoder

        encoder = load_encoder(config.model)
    rows = []
    for spec in config.datasets:
        for shots in config.shots:
            for seed in config.seeds:
                print(f"bench multilabel: {spec.label} k={shots} seed {seed}", file=sys.stderr)
                result = run_multilabel(spec.source, shots, seed, encoder=encoder, save=False,
                                        templates=spec.templates, test_count=spec.max_test or 500)
                for method in config.methods:
                    test, val = result[method], result[f"val_{method}"]
                    conformal = result["conformal"] if method == "probe" else {}  # sets need a calibrated head
                    rows.append({"dataset": spec.label, "method": method, "shots": shots, "seed": seed,
                                 "map": test["map"], "micro_f1": test["micro_f1"], "macro_f1": test["macro_f1"],
                                 "val_map": val["map"], "conformal_mean_miss": conformal.get("mean_miss_rate"),
                                 "conformal_max_miss": conformal.get("max_miss_rate"),
                                 "conformal_set_size": conformal.get("mean_set_size"), "n_train": result["num_train"],
                                 "n_test": result["num_test"], "model_id": encoder.id})
                table = pd.DataFrame(rows, columns=COLUMNS)
                atomic_write_bytes(out / "multilabel_results.csv", table.to_csv(index=False).encode())
    table = pd.DataFrame(rows, columns=COLUMNS)
    atomic_write_bytes(out / "multilabel_summary.md", summary_markdown(table).encode())
    return table


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of mAP and micro/macro F1 per dataset, method and shots."""
    grouped = table.groupby(["dataset", "method", "shots"], as_index=False, sort=False).agg(
        map_mean=("map", "mean"), map_std=("map", "std"), micro_f1=("micro_f1", "mean"),
        macro_f1=("macro_f1", "mean"), miss=("conformal_mean_miss", "mean"), worst=("conformal_max_miss", "max"),
        set_size=("conformal_set_size", "mean"), seeds=("seed", "nunique"), n_test=("n_test", "first"))
    grouped["map_std"] = grouped["map_std"].fillna(0.0)
    return grouped


def summary_markdown(table: pd.DataFrame) -> str:
    """One markdown table: dataset, method, shots, mAP (mean +- std), micro-F1, macro-F1."""
    lines = ["# Multi-label benchmark summary", "",
             f"Model: `{', '.join(sorted(table['model_id'].astype(str).unique()))}`. Test mAP (mean +- std over seeds) "
             "and micro/macro F1 at the per-label thresholds chosen on validation; for the probe, its per-label "
             f"conformal sets at alpha {CONFORMAL_ALPHA} on test: per-label miss rate (mean over labels and seeds, "
             "worst label and seed) and mean set size.", "",
             "| dataset | method | shots | mAP | micro-F1 | macro-F1 | label miss rate (mean / worst) | set size | n_test |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summarize(table).itertuples():
        sets = ("-", "-") if pd.isna(r.miss) else (f"{r.miss:.3f} / {r.worst:.3f}", f"{r.set_size:.2f}")
        lines.append(f"| {r.dataset} | {r.method} | {r.shots} | {r.map_mean:.3f} +- {r.map_std:.3f} | "
                     f"{r.micro_f1:.3f} | {r.macro_f1:.3f} | {sets[0]} | {sets[1]} | {r.n_test} |")
    return "\n".join(lines) + "\n"
