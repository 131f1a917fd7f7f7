"""The ``anomaly`` task of ``clipxfer bench``: detection quality over good shots x seeds.

A dataset is an MVTec-style category (``train/good/``, ``test/good/``, ``test/<defect>/``,
optional ``ground_truth/``) or a folder of such categories (the texture set). Each category is
encoded once; every (shots, seed) cell draws its shots from ``train/good`` with the seed,
calibrates the threshold on the remaining ``train/good`` images, and scores ``test/``. Defect
kinds with masks are reported as ``local`` (image and pixel metrics), kinds without masks as
``global`` (image metrics only); the test images are never used to choose anything.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..anomaly.detector import DEFAULT_FALSE_ALARM_RATE, build_detector, split_good
from ..anomaly.evaluate import detection_metrics, load_labelled_folder, read_mask
from ..anomaly.patches import encode_dense, take_patches
from ..encoders import Encoder
from ..errors import ClipxferError
from ..images import find_images
from ..paths import atomic_write_bytes

DEFAULT_SHOTS = (1, 4, 16)
DEFAULT_SEEDS = (1, 2, 3)
COLUMNS = [
    "dataset", "method", "shots", "seed", "group", "image_auroc", "image_ap", "pixel_auroc", "aupro",
    "false_alarm_rate", "miss_rate", "threshold", "calibration_size", "bank_size", "bank_mb", "fit_seconds",
    "n_good", "n_defect", "model_id",
]  # fmt: skip
CELL_KEY = ["dataset", "method", "shots", "seed"]


def find_categories(root: str | Path) -> list[Path]:
    """``root`` itself when it is a category (has ``train/good``), else its category subfolders."""
    root = Path(root)
    if (root / "train" / "good").is_dir():
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "train" / "good").is_dir()) if root.is_dir() else []
    if not found:
        raise ClipxferError(f"{root}: no anomaly dataset here (expected train/good/ and test/, or folders of them; "
                            "'clipxfer anomaly textures OUT' builds one)")
    return found


def run_anomaly_bench(
    data: str | Path,
    out_dir: str | Path,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    model: str | None = None,
    method: str = "auto",
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    encoder: Encoder | None = None,
) -> pd.DataFrame:
    """Run (or resume) the anomaly benchmark into ``out_dir``: results.csv and summary.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "anomaly_results.csv"
    table = pd.read_csv(results_path) if results_path.is_file() else pd.DataFrame(columns=COLUMNS)
    if encoder is None:
        from ..encoders.registry import load_encoder_for_results

        encoder = load_encoder_for_results(model, table["model_id"])
    if len(table) and set(table["model_id"]) - {encoder.id}:
        raise ClipxferError(f"{results_path} holds results of another model than {encoder.id}: use another --out")
    done = set(map(tuple, table[CELL_KEY].astype(str).to_numpy()))
    for category in find_categories(data):
        todo = [(k, s) for k in shots for s in seeds if (category.name, method, str(k), str(s)) not in done]
        if not todo:
            continue
        train = list(find_images(category / "train" / "good"))
        test = load_labelled_folder(category / "test")
        print(f"bench anomaly: {category.name}: encoding {len(train)} good + {len(test.paths)} test images", file=sys.stderr)
        train_patches = encode_dense(encoder, train)
        test_patches = encode_dense(encoder, test.paths)
        size = encoder.input_size
        masks = np.stack([read_mask(m, size) for m in test.masks])
        has_mask = np.array([m is not None for m in test.masks])
        groups = {
            "local": np.array([k == "good" or has_mask[i] for i, k in enumerate(test.kinds)]),
            "global": np.array([k == "good" or not has_mask[i] for i, k in enumerate(test.kinds)]),
        }
        for k, seed in todo:
            started = time.perf_counter()
            fit_rows, calibration_rows = split_good(len(train), k, seed)
            detector = build_detector(encoder, take_patches(train_patches, fit_rows), method, category.name, seed)
            detector.calibrate(take_patches(train_patches, calibration_rows), false_alarm_rate)
            fit_seconds = time.perf_counter() - started
            result = detector.score(test_patches)
            bank = detector.arrays.get("memory_bank")
            common = {
                "dataset": category.name, "method": method, "shots": k, "seed": seed,
                "calibration_size": detector.config["calibration_size"],
                "bank_size": 0 if bank is None else len(bank),
                "bank_mb": sum(a.nbytes for a in detector.arrays.values()) / 2**20,
                "fit_seconds": fit_seconds, "model_id": encoder.id,
            }  # fmt: skip
            rows = []
            for group, chosen in groups.items():
                is_defect = test.is_defect[chosen]
                if not is_defect.any():
                    continue
                pixel = group == "local"
                metrics = detection_metrics(
                    result.scores[chosen], is_defect, detector.threshold,
                    result.maps[chosen] if pixel else None, masks[chosen] if pixel else None,
                )  # fmt: skip
                rows.append({**common, "group": group, **{c: metrics.get(c) for c in COLUMNS if c in metrics}})
            table = pd.concat([table, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True) if len(table) else pd.DataFrame(rows, columns=COLUMNS)
            atomic_write_bytes(results_path, table[COLUMNS].to_csv(index=False).encode())
    atomic_write_bytes(out / "anomaly_summary.md", summary_markdown(table).encode())
    return table


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per dataset x shots x group, plus the mean over datasets."""
    metrics = ["image_auroc", "image_ap", "pixel_auroc", "aupro", "false_alarm_rate", "miss_rate", "bank_mb"]
    table = table.copy()
    table[metrics] = table[metrics].astype(float)
    per_dataset = table.groupby(["dataset", "method", "group", "shots"])[metrics].agg(["mean", "std"])
    overall = table.groupby(["method", "group", "shots", "seed"])[metrics].mean().groupby(["method", "group", "shots"]).agg(["mean", "std"])
    overall = pd.concat({"(mean)": overall}, names=["dataset"]).reorder_levels(["dataset", "method", "group", "shots"])
    return pd.concat([per_dataset, overall])


def summary_markdown(table: pd.DataFrame) -> str:
    """Markdown table of :func:`summarize`, ``mean ± std`` over seeds."""
    if table.empty:
        return "no results\n"
    summary = summarize(table)
    names = [c for c in summary.columns.get_level_values(0).unique()]
    lines = ["| dataset | method | group | shots | " + " | ".join(names) + " |", "|" + " --- |" * (4 + len(names))]
    for key, row in summary.iterrows():
        cells = []
        for name in names:
            mean, std = row[(name, "mean")], row[(name, "std")]
            cells.append("" if pd.isna(mean) else f"{mean:.3f}" + ("" if pd.isna(std) else f" ± {std:.3f}"))
        lines.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
