"""Multi-label few-shot transfer: zero-shot scores against a per-label sigmoid probe, both scored by mAP,
per-label AP and micro/macro F1 (thresholds per label chosen on validation images), on test images the
probe never saw. The data is a multi-label manifest (label cells ``a|b``, :func:`run_multilabel`) or
seeded mosaics of a single-label set's real images (:mod:`clipxfer.datasets.mosaic`,
:func:`run_multilabel_mosaics`); ``clipxfer probe --multi-label`` and ``bench --task multilabel`` run both."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets.features import encode_dataset
from ..datasets.labelled import BUILTIN_DATASETS, LabelledImages, load_dataset
from ..datasets.mosaic import make_mosaics, write_mosaics
from ..datasets.multilabel_split import draw_multilabel
from ..datasets.prompts import load_templates
from ..datasets.splits import held_out_test
from ..encoders.artifacts import claim_output
from ..encoders.base import Encoder, ImageEncoding
from ..errors import ClipxferError
from ..heads.multilabel import METHOD, MultiLabelProbeHead, best_thresholds, zeroshot_scores
from ..heads.zeroshot import fit_zeroshot
from ..metrics import multilabel_report
from ..paths import safe_filename

#: Validation mosaics per class, and validation positives per label drawn from a manifest (they choose
#: the L2 strength and the thresholds, and calibrate the conformal label sets).
VAL_PER_CLASS = 4
#: The seed of the test mosaics: one test set for every training seed.
TEST_SEED = 999_983
#: The level the reported conformal label sets are checked at on test images.
CONFORMAL_ALPHA = 0.1


def conformal_check(head: MultiLabelProbeHead, probabilities: np.ndarray, targets: np.ndarray,
                    alpha: float = CONFORMAL_ALPHA) -> dict[str, Any]:
    """How the per-label conformal sets at ``alpha`` do on labelled images: each label's miss rate
    (share of its positives left out; at most ``alpha`` in expectation), the worst and mean of them, and
    the mean set size."""
    sets = head.label_sets(probabilities, alpha).astype(bool)
    positives = targets.astype(bool)
    misses = {name: float((positives[:, c] & ~sets[:, c]).sum() / positives[:, c].sum())
              for c, name in enumerate(head.classnames) if positives[:, c].any()}
    return {"alpha": alpha, "per_label_miss_rate": misses, "max_miss_rate": max(misses.values(), default=0.0),
            "mean_miss_rate": float(np.mean(list(misses.values()))) if misses else 0.0,
            "mean_set_size": float(sets.sum(1).mean())}


def fit_and_score(encoder: Encoder, classnames: list[str], parts: dict[str, tuple[ImageEncoding, np.ndarray]],
                  templates: str | list[str] = "simple", l2: float | None = None
                  ) -> tuple[MultiLabelProbeHead, dict[str, Any]]:
    """Fit the multi-label probe on ``parts["train"]`` (encoding, 0/1 targets), choose its settings and
    thresholds on ``parts["val"]`` and report zero-shot and probe on validation and test
    (``zeroshot``, ``probe``, ``val_zeroshot``, ``val_probe``: each :func:`~clipxfer.metrics.multilabel_report`;
    ``conformal``: the probe's label sets on test, :func:`conformal_check`).
    ``l2``: a fixed L2 strength instead of the validation sweep."""
    (train, train_t), (val, val_t), (test, test_t) = parts["train"], parts["val"], parts["test"]
    template_list = load_templates(templates) if isinstance(templates, str) else list(templates)
    zeroshot = fit_zeroshot(encoder, classnames, template_list)
    zs_val = zeroshot_scores(zeroshot, val)
    zs_thresholds = best_thresholds(val_t, zs_val)
    zs_test = zeroshot_scores(zeroshot, test)
    head = MultiLabelProbeHead.fit_multilabel(encoder.id, list(classnames), train, train_t, val, val_t, l2)
    test_probs = head.predict_proba(test)
    report = {
        "zeroshot": multilabel_report(test_t, zs_test, classnames, zs_test >= zs_thresholds),
        "probe": multilabel_report(test_t, test_probs, classnames, head.predict(test)),
        "conformal": conformal_check(head, test_probs, test_t),
        "val_zeroshot": multilabel_report(val_t, zs_val, classnames, zs_val >= zs_thresholds),
        "val_probe": multilabel_report(val_t, head.predict_proba(val), classnames, head.predict(val)),
    }
    return head, report


def _encoder(encoder: Encoder | None, model: str | None, device: str | None, precision: str | None) -> Encoder:
    if encoder is not None:
        return encoder
    from ..encoders import load_encoder

    return load_encoder(model, device=device, precision=precision)


def run_multilabel(
    data: str | os.PathLike | LabelledImages,
    shots: int,
    seed: int = 0,
    model: str | None = None,
    encoder: Encoder | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    save: bool = True,
    templates: str = "simple",
    classes: list[str] | None = None,
    test_count: int = 500,
    device: str | None = None,
    precision: str | None = None,
    progress: bool = False,
    l2: float | None = None,
) -> dict[str, Any]:
    """``clipxfer probe --multi-label``: fit and score the multi-label probe on ``data``.

    ``data`` is a multi-label manifest (label cells ``a|b``; ``classes`` fixes the label list and order)
    or a folder holding one as ``manifest.csv`` (as :func:`build_mosaic_folder` writes),
    a :class:`LabelledImages` with ``targets``, or a built-in single-label dataset, which is trained and
    tested on its seeded mosaics (``test_count`` test mosaics, :func:`run_multilabel_mosaics`). A manifest
    is drawn by :func:`~clipxfer.datasets.multilabel_split.draw_multilabel` (``shots`` positives per label).
    With ``save`` the head is written to ``out`` (default ``multilabel-probe-DATA-Kshot-seedS.safetensors``;
    an existing file needs ``force``, checked before any work). Returns ``dataset, shots, seed, model,
    classes, num_train, num_val, num_test, zeroshot, probe, val_zeroshot, val_probe, conformal, head``."""
    if shots < 1:
        raise ClipxferError(f"--shots must be at least 1, not {shots}")
    mosaics = not isinstance(data, LabelledImages) and str(data) in BUILTIN_DATASETS
    if mosaics or (isinstance(data, LabelledImages) and data.targets is None):
        name = data.name if isinstance(data, LabelledImages) else str(data)
        head_path = _claim(out, f"{name}-mosaic", shots, seed, force) if save else None
        return run_multilabel_mosaics(data, shots, seed, model, encoder, test_count, templates=templates,
                                      out=head_path, save=save, device=device, precision=precision, l2=l2)
    if not isinstance(data, LabelledImages) and Path(data).is_dir():
        if not (Path(data) / "manifest.csv").is_file():
            raise ClipxferError(f"{data}: --multi-label needs a manifest (path,label with a|b labels); this folder "
                                "holds no manifest.csv ('clipxfer mosaics' writes one)")
        folder_name, data = Path(data).resolve().name, Path(data) / "manifest.csv"
    else:
        folder_name = None
    dataset = data if isinstance(data, LabelledImages) else load_dataset(data, classes, multi_label=True)
    dataset.name = folder_name or dataset.name  # a mosaic folder is named by its folder, not 'manifest'
    head_path = _claim(out, dataset.name, shots, seed, force) if save else None
    train, val, test = draw_multilabel(dataset, shots, seed, VAL_PER_CLASS)
    encoder = _encoder(encoder, model, device, precision)
    parts = {name: (encode_dataset(encoder, dataset.subset(rows), progress=progress), dataset.targets[rows])
             for name, rows in (("train", train), ("val", val), ("test", test))}
    head, report = fit_and_score(encoder, list(dataset.classnames), parts, templates, l2)
    return _result(dataset.name, shots, seed, encoder, head, report, (len(train), len(val), len(test)), head_path)


def _claim(out, name: str, shots: int, seed: int, force: bool) -> Path:
    default = f"{METHOD}-{safe_filename(name)}-{shots}shot-seed{seed}.safetensors"
    return claim_output(out if out is not None else default, force)


def _result(name, shots, seed, encoder, head, report, sizes, head_path) -> dict[str, Any]:
    result = {"dataset": name, "shots": shots, "seed": seed, "model": encoder.id, "classes": head.classnames,
              "num_train": sizes[0], "num_val": sizes[1], "num_test": sizes[2], **report, "head": None}
    if head_path is not None:
        result["head"] = str(head.save(head_path))
    return result


def run_multilabel_mosaics(
    data: str | os.PathLike | LabelledImages,
    shots: int,
    seed: int = 0,
    model: str | None = None,
    encoder: Encoder | None = None,
    test_count: int = 500,
    grid: int = 2,
    max_classes: int = 3,
    templates: str = "simple",
    out: str | os.PathLike | None = None,
    force: bool = True,
    save: bool = True,
    device: str | None = None,
    precision: str | None = None,
    l2: float | None = None,
) -> dict[str, Any]:
    """Build seeded mosaics of ``data`` (train and validation mosaics from its training pool, test
    mosaics from its held-out test images), fit the multi-label probe on ``shots x classes``
    training mosaics and report zero-shot and probe (``zeroshot``, ``probe``: each
    :func:`~clipxfer.metrics.multilabel_report`; ``val_*`` the same on validation). ``out``: save the head there."""
    if shots < 1:
        raise ClipxferError(f"--shots must be at least 1, not {shots}")
    dataset = data if isinstance(data, LabelledImages) else load_dataset(data)
    head_path = _claim(out, f"{dataset.name}-mosaic", shots, seed, force) if save and out is not None else None
    encoder = _encoder(encoder, model, device, precision)
    pool, test_pool = held_out_test(dataset)
    num_classes = len(dataset.classnames)
    train = make_mosaics(dataset, shots * num_classes, seed, pool, grid, max_classes)
    val = make_mosaics(dataset, VAL_PER_CLASS * num_classes, seed + 10_000, pool, grid, max_classes)
    test = make_mosaics(dataset, test_count, TEST_SEED, test_pool, grid, max_classes)
    parts = {name: (encoder.embed_images(part.images), part.targets)
             for name, part in (("train", train), ("val", val), ("test", test))}
    head, report = fit_and_score(encoder, list(dataset.classnames), parts, templates, l2)
    return _result(train.name, shots, seed, encoder, head, report, (len(train), len(val), len(test)), head_path)


def build_mosaic_folder(
    data: str | os.PathLike | LabelledImages,
    folder: str | os.PathLike,
    train: int,
    val: int,
    test: int,
    seed: int = 0,
    grid: int = 2,
    max_classes: int = 3,
) -> Path:
    """``clipxfer mosaics``: write seeded ``grid x grid`` mosaics of a single-label set's real images as a
    multi-label folder (PNG files and ``manifest.csv`` with ``train``/``val``/``test`` splits): training and
    validation mosaics from its training pool, test mosaics from its held-out test images only. Returns the
    manifest's path."""
    counts = {"train": train, "val": val, "test": test}
    bad = [f"--{name} {count}" for name, count in counts.items() if count < 1]
    if bad:
        raise ClipxferError(f"{', '.join(bad)}: each split needs at least one mosaic")
    if grid < 1 or max_classes < 1:
        raise ClipxferError(f"--grid {grid} and --max-classes {max_classes} must be at least 1")
    if not isinstance(data, LabelledImages) and str(data) not in BUILTIN_DATASETS:
        raise ClipxferError(f"{data}: mosaics are made of a built-in dataset's images, which share one size; "
                            f"give one of {', '.join(BUILTIN_DATASETS)}")
    dataset = data if isinstance(data, LabelledImages) else load_dataset(data)
    pool, test_pool = held_out_test(dataset)
    seeds = {"train": seed, "val": seed + 10_000, "test": TEST_SEED + seed}
    parts = {name: make_mosaics(dataset, counts[name], seeds[name], test_pool if name == "test" else pool, grid,
                                max_classes) for name in counts}
    return write_mosaics(parts, folder)
