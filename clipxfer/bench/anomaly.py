"""The ``anomaly`` task of ``clipxfer bench``: detection quality over good shots x seeds.

A dataset is an MVTec-style category (``train/good/``, ``test/good/``, ``test/<defect>/``,
optional ``ground_truth/``) or a folder of such categories (the texture set). Each category is
encoded once; every (shots, seed) cell draws its shots from ``train/good`` with the seed,
calibrates the threshold on the remaining ``train/good`` images, and scores ``test/``. Defect
kinds with masks are reported as ``local`` (image and pixel metrics), kinds without masks as
``global`` (image metrics only), and each kind on its own row (``group`` = the kind). The test
images are never used to choose anything: with ``--method auto`` the working resolution and the
fused detectors are chosen per cell, as ``anomaly fit`` does, on held-out ``train/good`` parts with
synthetic flaws (:mod:`clipxfer.anomaly.synthetic`), and those parts are not calibration parts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..anomaly.detector import DEFAULT_FALSE_ALARM_RATE, DEFAULT_MEMBERS, build_detector, split_good
from ..anomaly.evaluate import detection_metrics, load_labelled_folder, read_mask
from ..anomaly.fitting import parse_resolution, resolution_candidates
from ..anomaly.fusion import MEMBERS
from ..anomaly.patches import DensePatches, encode_dense, take_patches
from ..anomaly.selection import choose_settings, validation_rows
from ..anomaly.synthetic import FLAWS, synthetic_flaw
from ..encoders import Encoder
from ..errors import ClipxferError
from ..images import find_images
from ..paths import atomic_write_bytes

DEFAULT_SHOTS = (1, 4, 16)
DEFAULT_SEEDS = (1, 2, 3)
COLUMNS = [
    "dataset", "method", "shots", "seed", "group", "image_auroc", "image_ap", "pixel_auroc", "aupro",
    "false_alarm_rate", "miss_rate", "threshold", "calibration_size", "bank_size", "bank_mb", "fit_seconds",
    "n_good", "n_defect", "resolution", "members", "model_id",
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
    resolution: str | int = "auto",
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
        candidates = resolution_candidates(encoder, parse_resolution(resolution), train[0], method)
        print(f"bench anomaly: {category.name}: encoding {len(train)} good + {len(test.paths)} test images "
              f"at {', '.join(map(str, candidates))} px", file=sys.stderr)  # fmt: skip
        parts = _CategoryEncodings(encoder, train, test.paths)
        for k, seed in todo:
            started = time.perf_counter()
            fit_rows, held_out = split_good(len(train), k, seed)
            fused = method in ("auto", "fused")
            choose = fused
            # Validation parts drawn with one seed for every cell: their flaws are encoded once per category.
            check_rows, calibration_rows = validation_rows(held_out, 0) if choose else (held_out[:0], held_out)
            if len(check_rows):
                detector = parts.choose(check_rows, fit_rows, candidates, seed, category.name)
            else:
                detector = build_detector(encoder, take_patches(parts.train(candidates[0]), fit_rows), method,
                                          category.name, seed, members=DEFAULT_MEMBERS if fused else None,
                                          resolution=candidates[0])  # fmt: skip
            working = detector.map_size
            train_patches = parts.train(working)
            detector.calibrate(take_patches(train_patches, calibration_rows), false_alarm_rate)
            fit_seconds = time.perf_counter() - started
            result = detector.score(parts.test(working))
            bank = detector.arrays.get("memory_bank")
            common = {
                "dataset": category.name, "method": method, "shots": k, "seed": seed,
                "calibration_size": detector.config["calibration_size"],
                "bank_size": 0 if bank is None else len(bank),
                "bank_mb": sum(a.nbytes for a in detector.arrays.values()) / 2**20,
                "fit_seconds": fit_seconds, "model_id": encoder.id, "resolution": working,
                "members": "+".join(detector.members),
            }  # fmt: skip
            masks = parts.masks(test.masks, working)
            rows = []
            for group, chosen in _groups(test).items():
                is_defect = test.is_defect[chosen]
                pixel = bool(np.any([test.masks[i] is not None for i in np.flatnonzero(chosen & test.is_defect)]))
                metrics = detection_metrics(
                    result.scores[chosen], is_defect, detector.threshold,
                    result.maps[chosen] if pixel else None, masks[chosen] if pixel else None,
                )  # fmt: skip
                rows.append({**common, "group": group, **{c: metrics.get(c) for c in COLUMNS if c in metrics}})
            table = pd.concat([table, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True) if len(table) else pd.DataFrame(rows, columns=COLUMNS)
            atomic_write_bytes(results_path, table[COLUMNS].to_csv(index=False).encode())
    atomic_write_bytes(out / "anomaly_summary.md", summary_markdown(table).encode())
    return table


def _groups(test) -> dict[str, np.ndarray]:
    """Test rows of each reported group: ``local`` and ``global`` (good parts + defects with / without
    masks), then each defect kind (good parts + that kind)."""
    good = np.array([k == "good" for k in test.kinds])
    has_mask = np.array([m is not None for m in test.masks])
    groups = {"local": good | (test.is_defect & has_mask), "global": good | (test.is_defect & ~has_mask)}
    for kind in sorted(set(test.kinds) - {"good"}):
        groups[kind] = good | np.array([k == kind for k in test.kinds])
    return {name: rows for name, rows in groups.items() if (rows & test.is_defect).any()}


class _CategoryEncodings:
    """One category's parts encoded once per working resolution, and the validation flaws (drawn
    from ``train/good`` rows, seeded by row) encoded once per row, kind and resolution."""

    def __init__(self, encoder: Encoder, train: list[Path], test: list[Path]):
        self.encoder, self.train_paths, self.test_paths = encoder, train, test
        self._train: dict[int, DensePatches] = {}
        self._test: dict[int, DensePatches] = {}
        self._flaws: dict[tuple[int, str, int], DensePatches] = {}
        self._masks: dict[int, np.ndarray] = {}

    def train(self, resolution: int) -> DensePatches:
        if resolution not in self._train:
            self._train[resolution] = encode_dense(self.encoder, self.train_paths, resolution=resolution)
        return self._train[resolution]

    def test(self, resolution: int) -> DensePatches:
        if resolution not in self._test:
            self._test[resolution] = encode_dense(self.encoder, self.test_paths, resolution=resolution)
        return self._test[resolution]

    def masks(self, paths: list, resolution: int) -> np.ndarray:
        if resolution not in self._masks:
            self._masks[resolution] = np.stack([read_mask(m, resolution) for m in paths])
        return self._masks[resolution]

    def _encode(self, items: list[tuple], resolution: int) -> DensePatches:
        """Items ``("good", row)`` or ``("flaw", row, kind)`` -> their patches, in order."""
        missing = [item for item in items if item[0] == "flaw" and (item[1], item[2], resolution) not in self._flaws]
        if missing:
            flawed = [synthetic_flaw(self.train_paths[row], kind, row) for _, row, kind in missing]
            encoded = encode_dense(self.encoder, flawed, resolution=resolution)
            for i, (_, row, kind) in enumerate(missing):
                self._flaws[(row, kind, resolution)] = take_patches(encoded, [i])
        pieces = [take_patches(self.train(resolution), [item[1]]) if item[0] == "good" else self._flaws[(item[1], item[2], resolution)]
                  for item in items]  # fmt: skip
        joint = np.concatenate([p.joint for p in pieces]) if pieces[0].joint is not None else None
        return DensePatches(np.concatenate([p.local for p in pieces]), joint, [s for p in pieces for s in p.sizes])

    def choose(self, check_rows, fit_rows, candidates, seed, name):
        """The fused detector (working resolution and members) chosen on synthetic flaws in the
        validation rows, uncalibrated."""
        goods = [("good", int(row)) for row in check_rows]
        flawed = [("flaw", int(row), kind) for kind in FLAWS for row in check_rows]
        kinds = [kind for kind in FLAWS for _ in check_rows]
        has_joint = self.train(candidates[0]).joint is not None
        options = [m for m in MEMBERS if m != "zeroshot" or has_joint]
        detector, _ = choose_settings(self.encoder, self._encode, [("good", int(r)) for r in fit_rows], goods, flawed,
                                      kinds, candidates, options, seed, name)  # fmt: skip
        return detector


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
