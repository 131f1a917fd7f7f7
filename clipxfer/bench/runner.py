"""Running a benchmark: every dataset x method x shots x seed cell on one cached feature set,
resumable (finished cells in results.csv are skipped), with a leakage guard."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import LabelledImages, check_classes, load_dataset
from ..encoders import Encoder, ImageEncoding, l2_normalize, load_encoder
from ..errors import ClipxferError
from ..features import encode_dataset, take
from ..heads import HEAD_TYPES, Head
from ..heads.base import FewShotData
from ..heads.zeroshot import fit_zeroshot
from ..metrics import classification_report
from ..paths import atomic_write_bytes
from ..prompts import load_templates
from ..sampling import FewShotSplit, draw_few_shot
from ..transfer import fit_head
from .config import METHODS, BenchConfig, DatasetSpec

CSV_COLUMNS = [
    "dataset", "method", "shots", "seed", "accuracy", "balanced_accuracy", "macro_f1", "ece",
    "fit_seconds", "val_accuracy", "n_test", "model_id", "manifest_hash",
]  # fmt: skip
CELL_KEY = ["dataset", "method", "shots", "seed"]


@dataclass
class PreparedDataset:
    """A dataset with every split its cells need, encoded once."""

    spec: DatasetSpec
    dataset: LabelledImages
    splits: dict[tuple[int, int], FewShotSplit]
    encoding: ImageEncoding
    row_of: dict[int, int]  # dataset index -> row in ``encoding``
    zeroshot: Head

    def rows(self, indices: np.ndarray) -> ImageEncoding:
        return take(self.encoding, np.array([self.row_of[i] for i in indices], dtype=np.int64))


def prepare_dataset(spec: DatasetSpec, config: BenchConfig, encoder: Encoder) -> PreparedDataset:
    """Load, draw every (shots, seed) split, encode the union of drawn items once (cached)."""
    dataset = load_dataset(spec.source)
    if spec.classes:
        if len(spec.classes) != len(dataset.classnames):
            raise ClipxferError(
                f"dataset '{spec.label}': {len(spec.classes)} class names given for {len(dataset.classnames)} classes "
                f"({', '.join(dataset.classnames)})"
            )
        dataset.classnames = list(spec.classes)
    check_classes(dataset.classnames, spec.label)
    splits = {(k, s): draw_few_shot(dataset, k, s, max_test=spec.max_test) for k in config.shots for s in config.seeds}
    needed = np.unique(np.concatenate([np.concatenate([sp.train, sp.val, sp.test]) for sp in splits.values()]))
    encoding = encode_dataset(encoder, dataset.subset(needed), progress=True)
    zeroshot = fit_zeroshot(encoder, dataset.classnames, load_templates(spec.templates))
    return PreparedDataset(spec, dataset, splits, encoding, {int(i): r for r, i in enumerate(needed)}, zeroshot)


def near_duplicate_pairs(test: ImageEncoding, train: ImageEncoding, threshold: float) -> list[tuple[int, int, float]]:
    """(test row, train row, cosine) for every pair at or above ``threshold`` in probe-feature space."""
    similarity = l2_normalize(test.features) @ l2_normalize(train.features).T
    test_rows, train_rows = np.nonzero(similarity >= threshold)
    return [(int(a), int(b), float(similarity[a, b])) for a, b in zip(test_rows, train_rows)]


def check_leakage(prepared: PreparedDataset, split: FewShotSplit, threshold: float) -> list[dict]:
    """Warn loudly, listing pairs, when test images nearly duplicate drawn training images."""
    pairs = near_duplicate_pairs(prepared.rows(split.test), prepared.rows(split.train), threshold)
    if not pairs:
        return []
    keys = prepared.dataset.keys
    found = [
        {"dataset": prepared.spec.label, "shots": split.shots, "seed": split.seed,
         "test": keys[split.test[a]], "train": keys[split.train[b]], "cosine": round(c, 4)}
        for a, b, c in pairs
    ]  # fmt: skip
    listed = "; ".join(f"{p['test']} ~ {p['train']} ({p['cosine']:.3f})" for p in found[:5])
    more = f" and {len(found) - 5} more (see leakage.csv)" if len(found) > 5 else ""
    print(
        f"WARNING: leakage: {len(found)} test image(s) of {prepared.spec.label} are near-duplicates "
        f"(cosine >= {threshold}) of training images drawn for shots={split.shots} seed={split.seed}: {listed}{more}",
        file=sys.stderr,
    )
    return found


def evaluate(head: Head, encoding: ImageEncoding, labels: np.ndarray, classnames: list[str]) -> dict:
    """The metrics of one head on one labelled set."""
    report = classification_report(labels, head.predict_proba(encoding), classnames)
    return {key: report[key] for key in ("accuracy", "balanced_accuracy", "macro_f1", "ece")}


def run_cell(prepared: PreparedDataset, method: str, shots: int, seed: int, encoder: Encoder, options: dict) -> dict:
    """Fit one method on one draw and score it on the shared test set. Transductive methods
    (a head class with ``transductive = True``) also get the test images, unlabelled; shots 0
    is a label-free cell (no training or validation images)."""
    split = prepared.splits.get((shots, seed)) or label_free_split(prepared)
    labels = prepared.dataset.labels
    test = prepared.rows(split.test)
    head_method, method_options = METHODS[method]
    fit_options = {**method_options, **options.get(method, {})}
    if getattr(HEAD_TYPES[head_method], "transductive", False):
        fit_options["unlabelled"] = test
    data = FewShotData(
        encoder=encoder,
        classnames=prepared.dataset.classnames,
        train=prepared.rows(split.train),
        train_labels=labels[split.train],
        val=prepared.rows(split.val),
        val_labels=labels[split.val],
        zeroshot=prepared.zeroshot,
        shots=shots,
        seed=seed,
        manifest_hash=split.manifest_hash(prepared.dataset),
    )
    started = time.perf_counter()
    head = fit_head(head_method, data, **fit_options)
    fit_seconds = time.perf_counter() - started
    val_accuracy = float((head.predict(data.val) == data.val_labels).mean()) if len(split.val) else float("nan")
    return {
        "dataset": prepared.spec.label,
        "method": method,
        "shots": shots,
        "seed": seed,
        **evaluate(head, test, labels[split.test], prepared.dataset.classnames),
        "fit_seconds": round(fit_seconds, 4),
        "val_accuracy": val_accuracy,
        "n_test": len(split.test),
        "model_id": encoder.id,
        "manifest_hash": data.manifest_hash,
    }


def label_free_split(prepared: PreparedDataset) -> FewShotSplit:
    """No training or validation images, the shared test set: the split of a 0-shot cell."""
    test = next(iter(prepared.splits.values())).test
    empty = np.zeros(0, dtype=np.int64)
    return FewShotSplit(empty, empty, test, 0, 0)


def plan_cells(config: BenchConfig) -> list[tuple[DatasetSpec, str, int, int]]:
    """Every cell of the run; zero-shot needs no shots, so it is one cell (shots 0, seed 0);
    transductive methods also get that label-free cell beside their shots."""
    cells = []
    for spec in config.datasets:
        for method in config.methods:
            if method == "zeroshot":
                cells.append((spec, method, 0, 0))
            else:
                head_method, options = METHODS[method]
                # Label-free cell: methods that adapt to the test images, and TransCLIP on zero-shot.
                if getattr(HEAD_TYPES[head_method], "transductive", False) or options.get("base") == "zeroshot":
                    cells.append((spec, method, 0, 0))
                cells.extend((spec, method, k, s) for k in config.shots for s in config.seeds)
    return cells


def read_results(path: Path) -> pd.DataFrame:
    """Rows already in results.csv (empty frame with the schema when there is none)."""
    if not path.is_file():
        return pd.DataFrame(columns=CSV_COLUMNS)
    table = pd.read_csv(path)
    missing = set(CSV_COLUMNS) - set(table.columns)
    if missing:
        raise ClipxferError(
            f"{path}: not a clipxfer results file (missing {', '.join(sorted(missing))}); use another --out"
        )
    return table[CSV_COLUMNS]


def write_results(table: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, table[CSV_COLUMNS].to_csv(index=False).encode())


def run_bench(config: BenchConfig, out_dir: str | Path, encoder: Encoder | None = None) -> pd.DataFrame:
    """Run (or resume) a benchmark into ``out_dir``: results.csv, summary.md, plot.png,
    the drawn manifests under manifests/, and leakage.csv when near-duplicates were found."""
    from tqdm import tqdm

    from .report import write_report

    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.csv"
    table = read_results(results_path)
    encoder = encoder or load_encoder(config.model)
    if len(table) and set(table["model_id"]) - {encoder.id}:
        raise ClipxferError(
            f"{results_path} holds results of model {', '.join(sorted(set(table['model_id'])))}, not {encoder.id}: "
            "use another --out"
        )
    done = set(map(tuple, table[CELL_KEY].astype(str).to_numpy()))
    cells = plan_cells(config)
    todo = [c for c in cells if (c[0].label, c[1], str(c[2]), str(c[3])) not in done]
    print(f"bench: {len(cells)} cells, {len(cells) - len(todo)} already done in {results_path}", file=sys.stderr)
    leaks: list[dict] = []
    bar = tqdm(total=len(todo), desc="cells", unit="cell", file=sys.stderr)
    for spec in config.datasets:
        spec_todo = [c for c in todo if c[0] == spec]
        if not spec_todo:
            continue
        prepared = prepare_dataset(spec, config, encoder)
        for split in prepared.splits.values():
            split.write_manifest(prepared.dataset, out / "manifests" / f"{spec.label}-k{split.shots}-s{split.seed}.csv")
            leaks.extend(check_leakage(prepared, split, config.leakage_threshold))
        for _, method, shots, seed in spec_todo:
            bar.set_postfix_str(f"{spec.label} {method} k={shots} s={seed}")
            if method == "zeroshot":
                any_split = next(iter(prepared.splits.values()))
                row = {
                    "dataset": spec.label, "method": method, "shots": 0, "seed": 0,
                    **evaluate(prepared.zeroshot, prepared.rows(any_split.test),
                               prepared.dataset.labels[any_split.test], prepared.dataset.classnames),
                    "fit_seconds": 0.0, "val_accuracy": float("nan"), "n_test": len(any_split.test),
                    "model_id": encoder.id, "manifest_hash": "",
                }  # fmt: skip
            else:
                row = run_cell(prepared, method, shots, seed, encoder, config.method_options)
            new_row = pd.DataFrame([row], columns=CSV_COLUMNS)
            table = new_row if table.empty else pd.concat([table, new_row], ignore_index=True)
            write_results(table, results_path)  # after every cell, so a crash loses at most one
            bar.update()
    bar.close()
    if leaks:
        pd.DataFrame(leaks).to_csv(out / "leakage.csv", index=False)
    write_report(table, out)
    return table
