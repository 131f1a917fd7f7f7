"""Running a benchmark: every dataset x method x shots x seed cell on one cached feature set,
resumable (finished cells in results.csv are skipped when they were made from the same data and
settings, refused when not), with a leakage guard relative to the data."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..autofit import fit_auto
from ..autofit.combine import fit_finetune_then
from ..datasets.features import encode_dataset, take
from ..datasets.labelled import LabelledImages, check_classes, load_dataset
from ..datasets.prompts import load_templates
from ..datasets.splits import FewShotSplit, draw_few_shot, held_out_test
from ..encoders import Encoder, ImageEncoding
from ..encoders.registry import load_encoder_for_results
from ..errors import ClipxferError
from ..finetune import fit_finetune_head
from ..heads import HEAD_TYPES, Head
from ..heads.base import FewShotData
from ..heads.fitting import fit_head
from ..heads.zeroshot import fit_zeroshot
from ..metrics import classification_report
from ..paths import atomic_write_bytes, safe_filename
from ..vector_math import l2_normalize
from .config import METHODS, BenchConfig, DatasetSpec

CSV_COLUMNS = [
    "dataset", "method", "shots", "seed", "accuracy", "balanced_accuracy", "macro_f1", "ece",
    "fit_seconds", "val_accuracy", "n_test", "model_id", "manifest_hash", "fingerprint", "chosen",
]  # fmt: skip
#: Columns a results.csv of an older clipxfer may lack (filled in when read).
OPTIONAL_COLUMNS = {"chosen": ""}
CELL_KEY = ["dataset", "method", "shots", "seed"]


@dataclass
class PreparedDataset:
    """A dataset with every split its cells need, encoded once."""

    spec: DatasetSpec
    dataset: LabelledImages
    splits: dict[tuple[int, int], FewShotSplit]
    test: np.ndarray  # the shared test set of every cell
    encoding: ImageEncoding
    row_of: dict[int, int]  # dataset index -> row in ``encoding``
    zeroshot: Head

    def rows(self, indices: np.ndarray) -> ImageEncoding:
        return take(self.encoding, np.array([self.row_of[i] for i in indices], dtype=np.int64))


def load_spec(spec: DatasetSpec) -> LabelledImages:
    """The dataset of ``spec`` with its class names for prompts."""
    dataset = load_dataset(spec.source)
    if spec.classes:
        if len(spec.classes) != len(dataset.classnames):
            raise ClipxferError(
                f"dataset '{spec.label}': {len(spec.classes)} class names given for {len(dataset.classnames)} classes "
                f"({', '.join(dataset.classnames)})"
            )
        dataset.classnames = list(spec.classes)
    check_classes(dataset.classnames, spec.label)
    return dataset


def data_fingerprint(dataset: LabelledImages, spec: DatasetSpec) -> str:
    """A short hash of exactly what a cell of ``spec`` is scored on: every item (key, label,
    split; size and mtime of files, the bytes of in-memory images), the class names and the
    dataset settings (templates, max_test)."""
    digest = hashlib.sha256(json.dumps([dataset.classnames, spec.templates, spec.max_test]).encode())
    for key, source, label, split in zip(dataset.keys, dataset.sources, dataset.labels, dataset.splits):
        digest.update(f"\0{key}\0{label}\0{split}\0".encode("utf-8", "surrogateescape"))
        if isinstance(source, (str, os.PathLike)):
            stat = os.stat(source)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            digest.update(np.ascontiguousarray(source).tobytes())
    return digest.hexdigest()[:12]


def options_fingerprint(method: str, options: dict) -> str:
    """A short hash of the fit options a bench method runs with."""
    head_method, defaults = METHODS[method]
    settings = {"head": head_method, **defaults, **options.get(method, {})}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def prepare_dataset(spec: DatasetSpec, config: BenchConfig, encoder: Encoder,
                    dataset: LabelledImages | None = None) -> PreparedDataset:
    """Load, draw every (shots, seed) split, encode the union of drawn items once (cached)."""
    dataset = dataset if dataset is not None else load_spec(spec)
    _, test = held_out_test(dataset, spec.max_test)
    splits = {(k, s): draw_few_shot(dataset, k, s, max_test=spec.max_test)
              for k in config.shots if k > 0 for s in config.seeds}  # fmt: skip
    needed = np.unique(np.concatenate([test, *(np.concatenate([sp.train, sp.val]) for sp in splits.values())]))
    encoding = encode_dataset(encoder, dataset.subset(needed), progress=True)
    zeroshot = fit_zeroshot(encoder, dataset.classnames, load_templates(spec.templates))
    return PreparedDataset(spec, dataset, splits, test, encoding, {int(i): r for r, i in enumerate(needed)}, zeroshot)


#: A test image leaks when it is closer to a drawn training image than LEAKAGE_MARGIN times the
#: LEAKAGE_QUANTILE of the training images' own nearest-neighbour distances (1 - cosine):
#: clearly closer than training images of the same data come to each other, however alike the
#: domain makes them look. Identical images (distance below EXACT_DISTANCE) always leak.
LEAKAGE_QUANTILE = 0.01
LEAKAGE_MARGIN = 0.5
EXACT_DISTANCE = 1e-6


def near_duplicate_pairs(test: ImageEncoding, train: ImageEncoding) -> tuple[list[tuple[int, int, float]], float]:
    """``([(test row, train row, cosine), ...], cosine limit)`` for the pairs that leak (see
    :data:`LEAKAGE_QUANTILE`), in probe-feature space."""
    if not len(test.features) or not len(train.features):
        return [], 1.0
    reference = l2_normalize(train.features)
    limit = EXACT_DISTANCE
    if len(reference) > 1:
        own = reference @ reference.T
        np.fill_diagonal(own, -np.inf)
        nearest = 1.0 - own.max(axis=1)
        limit = max(LEAKAGE_MARGIN * float(np.quantile(nearest, LEAKAGE_QUANTILE)), EXACT_DISTANCE)
    similarity = l2_normalize(test.features) @ reference.T
    test_rows, train_rows = np.nonzero(1.0 - similarity <= limit)
    return [(int(a), int(b), float(similarity[a, b])) for a, b in zip(test_rows, train_rows)], 1.0 - limit


def check_leakage(prepared: PreparedDataset, split: FewShotSplit) -> list[dict]:
    """The test images that nearly duplicate images drawn for training or validation in ``split``
    (see :func:`near_duplicate_pairs`), as rows for leakage.csv."""
    drawn = np.concatenate([split.train, split.val])
    pairs, limit = near_duplicate_pairs(prepared.rows(split.test), prepared.rows(drawn))
    keys = prepared.dataset.keys
    return [
        {"dataset": prepared.spec.label, "shots": split.shots, "seed": split.seed,
         "test": keys[split.test[a]], "train": keys[drawn[b]], "cosine": round(c, 6), "limit": round(limit, 6)}
        for a, b, c in pairs
    ]  # fmt: skip


def report_leakage(leaks: list[dict], label: str, csv_path: Path, shown: int = 3) -> None:
    """One warning line per dataset: how many test images leak, the closest few pairs, and where
    the rest are listed."""
    if not leaks:
        return
    table = pd.DataFrame(leaks).sort_values("cosine", ascending=False)
    closest = table.drop_duplicates(["test", "train"]).head(shown)
    listed = "; ".join(f"{r.test} ~ {r.train} (cosine {r.cosine:.4f})" for r in closest.itertuples())
    print(
        f"WARNING: leakage: {table['test'].nunique()} test image(s) of {label} nearly duplicate images drawn for "
        f"training ({len(table)} pair(s) over {len(table[['shots', 'seed']].drop_duplicates())} draw(s)), "
        f"closer than training images come to each other; closest: {listed}; all pairs in {csv_path}",
        file=sys.stderr,
    )


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
    head_type = HEAD_TYPES.get(head_method)  # None for "auto" (clipxfer.autofit chooses the head)
    if getattr(head_type, "transductive", False):
        fit_options["unlabelled"] = test
    trains_encoder = getattr(head_type, "trains_encoder", False) or head_method == "auto"
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
    chosen = ""
    if trains_encoder:  # fine-tuning (or auto, which may fine-tune): the method needs the images themselves
        sources = prepared.dataset.sources
        images = ([sources[i] for i in split.train], [sources[i] for i in split.val])
        if head_method == "auto":
            result = fit_auto(data, images, seed=seed, log=lambda line: None, **fit_options)
            head, chosen = result.head, result.chosen
        elif "then" in fit_options:
            head = fit_finetune_then(data, images, **fit_options)
        else:
            head = fit_finetune_head(data, images, **fit_options)
    else:
        head = fit_head(head_method, data, **fit_options)
    fit_seconds = time.perf_counter() - started
    adapted = hasattr(head, "encoder")  # a fine-tuned encoder came with the head
    val_accuracy = (
        float((head.predict(data.val) == data.val_labels).mean()) if len(split.val) and not adapted else float("nan")
    )
    if adapted:  # the cell re-encodes with the adapted encoder (cached under its own id)
        test = encode_dataset(head.encoder, prepared.dataset.subset(split.test))
        val_accuracy = float(head.config.get("val_accuracy", float("nan")))
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
        "chosen": chosen,
    }


def label_free_split(prepared: PreparedDataset) -> FewShotSplit:
    """No training or validation images, the shared test set: the split of a 0-shot cell."""
    empty = np.zeros(0, dtype=np.int64)
    return FewShotSplit(empty, empty, prepared.test, 0, 0)


def plan_cells(config: BenchConfig) -> list[tuple[DatasetSpec, str, int, int]]:
    """Every cell of the run; zero-shot needs no shots, so it is one cell (shots 0, seed 0);
    transductive methods also get that label-free cell beside their shots. Shots 0 in the list
    adds nothing more: methods that learn from labels have no 0-shot form (zero-shot is theirs)."""
    cells = []
    for spec in config.datasets:
        for method in config.methods:
            if method == "zeroshot":
                cells.append((spec, method, 0, 0))
            else:
                head_method, options = METHODS[method]
                # Label-free cell: methods that adapt to the test images, and TransCLIP on zero-shot.
                if getattr(HEAD_TYPES.get(head_method), "transductive", False) or options.get("base") == "zeroshot":
                    cells.append((spec, method, 0, 0))
                cells.extend((spec, method, k, s) for k in config.shots if k > 0 for s in config.seeds)
    return cells


def read_results(path: Path) -> pd.DataFrame:
    """Rows already in results.csv (empty frame with the schema when there is none)."""
    if not path.is_file():
        return pd.DataFrame(columns=CSV_COLUMNS)
    table = pd.read_csv(path, dtype={"fingerprint": str, "manifest_hash": str})
    for column, value in OPTIONAL_COLUMNS.items():
        if column not in table.columns:
            table[column] = value
    missing = set(CSV_COLUMNS) - set(table.columns)
    if missing == {"fingerprint"}:
        raise ClipxferError(
            f"{path}: made by an older clipxfer that did not record which data each cell came from, so "
            "resuming could mix in other data; use another --out"
        )
    if missing:
        raise ClipxferError(
            f"{path}: not a clipxfer results file (missing {', '.join(sorted(missing))}); use another --out"
        )
    table = table[CSV_COLUMNS].copy()
    table["fingerprint"] = table["fingerprint"].fillna("")
    table["chosen"] = ["" if pd.isna(value) else str(value) for value in table["chosen"]]
    return table


def write_results(table: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, table[CSV_COLUMNS].to_csv(index=False).encode())


def check_resumable(table: pd.DataFrame, spec: DatasetSpec, fingerprint: str, methods, options: dict,
                    results_path: Path) -> None:
    """Refuse to resume when the finished cells of ``spec``'s dataset came from other data, other
    dataset settings or other method options: their numbers would be reported as this run's."""
    rows = table[table["dataset"].astype(str) == spec.label]
    for stored in rows["fingerprint"].astype(str).unique():
        data_part, _, options_part = stored.partition("-")
        method = rows[rows["fingerprint"].astype(str) == stored]["method"].iloc[0]
        if data_part != fingerprint:
            raise ClipxferError(
                f"{results_path}: the finished cells of dataset '{spec.label}' were made from other data or settings "
                f"(fingerprint {data_part}, this run {fingerprint}); use another --out or give the dataset another name"
            )
        if method in methods and method in METHODS and options_part != options_fingerprint(method, options):
            raise ClipxferError(
                f"{results_path}: the finished '{method}' cells of dataset '{spec.label}' were made with other data or "
                "settings (method_options changed); use another --out"
            )


def run_bench(config: BenchConfig, out_dir: str | Path, encoder: Encoder | None = None) -> pd.DataFrame:
    """Run (or resume) a benchmark into ``out_dir``: results.csv, summary.md, plot.png,
    the drawn manifests under manifests/, and leakage.csv when near-duplicates were found.
    Finished cells are skipped when they came from the same data and settings; a results.csv
    of other data under the same dataset name is refused."""
    from tqdm import tqdm

    from .report import write_report

    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.csv"
    table = read_results(results_path)
    encoder = encoder or load_encoder_for_results(config.model, table["model_id"])
    if len(table) and set(table["model_id"]) - {encoder.id}:
        raise ClipxferError(
            f"{results_path} holds results of model {', '.join(sorted(set(table['model_id'])))}, not {encoder.id}: "
            "use another --out"
        )
    datasets, fingerprints = {}, {}
    for spec in config.datasets:
        datasets[spec] = load_spec(spec)
        fingerprints[spec] = data_fingerprint(datasets[spec], spec)
        check_resumable(table, spec, fingerprints[spec], config.methods, config.method_options, results_path)
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
        prepared = prepare_dataset(spec, config, encoder, datasets[spec])
        spec_leaks = []
        for split in prepared.splits.values():
            name = f"{safe_filename(spec.label)}-k{split.shots}-s{split.seed}.csv"
            split.write_manifest(prepared.dataset, out / "manifests" / name)
            spec_leaks.extend(check_leakage(prepared, split))
        report_leakage(spec_leaks, spec.label, out / "leakage.csv")
        leaks.extend(spec_leaks)
        for _, method, shots, seed in spec_todo:
            bar.set_postfix_str(f"{spec.label} {method} k={shots} s={seed}")
            if method == "zeroshot":
                row = {
                    "dataset": spec.label, "method": method, "shots": 0, "seed": 0,
                    **evaluate(prepared.zeroshot, prepared.rows(prepared.test),
                               prepared.dataset.labels[prepared.test], prepared.dataset.classnames),
                    "fit_seconds": 0.0, "val_accuracy": float("nan"), "n_test": len(prepared.test),
                    "model_id": encoder.id, "manifest_hash": "",
                }  # fmt: skip
            else:
                row = run_cell(prepared, method, shots, seed, encoder, config.method_options)
            row["fingerprint"] = f"{fingerprints[spec]}-{options_fingerprint(method, config.method_options)}"
            new_row = pd.DataFrame([row], columns=CSV_COLUMNS)
            table = new_row if table.empty else pd.concat([table, new_row], ignore_index=True)
            write_results(table, results_path)  # after every cell, so a crash loses at most one
            bar.update()
    bar.close()
    if leaks:
        atomic_write_bytes(out / "leakage.csv", pd.DataFrame(leaks).to_csv(index=False).encode())
    write_report(table, out)
    return table
