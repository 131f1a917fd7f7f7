"""Few-shot draws for multi-label data: ``shots`` positives per label (an image counts for every label
it has), validation images drawn the same way, the rest (or the manifest's ``test`` split) for test."""

from __future__ import annotations

import numpy as np

from ..errors import ClipxferError
from .labelled import LabelledImages


def draw_per_label(targets: np.ndarray, pool: np.ndarray, per_label: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of ``pool`` (in a seeded order) taken while some label they have is short of ``per_label``
    positives among the rows taken: each label ends with at least ``per_label`` when the pool has them."""
    counts = np.zeros(targets.shape[1], np.int64)
    chosen = []
    for row in rng.permutation(pool):
        if (targets[row].astype(bool) & (counts < per_label)).any():
            chosen.append(row)
            counts += targets[row]
        if (counts >= per_label).all():
            break
    return np.array(sorted(chosen), dtype=np.int64)


def draw_multilabel(dataset: LabelledImages, shots: int, seed: int, val_per_label: int) -> tuple[np.ndarray, ...]:
    """``(train, val, test)`` row indices of a multi-label ``dataset`` (one with ``targets``): the
    manifest's ``test`` rows are the test set and its ``val`` rows the validation set when it has them;
    the rest is drawn from with ``seed`` (:func:`draw_per_label`) and what is left over is tested on."""
    if dataset.targets is None:
        raise ClipxferError(f"{dataset.name}: not a multi-label set; read the manifest with --multi-label")
    if shots < 1:
        raise ClipxferError(f"--shots must be at least 1, not {shots}")
    rng = np.random.default_rng(seed)
    rows = np.arange(len(dataset))
    given_test, given_val = rows[dataset.splits == "test"], rows[dataset.splits == "val"]
    pool = rows[(dataset.splits != "test") & (dataset.splits != "val")]
    train = draw_per_label(dataset.targets, pool, shots, rng)
    rest = np.setdiff1d(pool, train)
    val = given_val if len(given_val) else draw_per_label(dataset.targets, rest, val_per_label, rng)
    test = given_test if len(given_test) else np.setdiff1d(rest, val)
    short = [name for c, name in enumerate(dataset.classnames) if not dataset.targets[train, c].any()]
    if short:
        raise ClipxferError(f"{dataset.name}: label(s) {', '.join(short[:5])} have no training images; "
                            "add images that have them or remove the label")
    if not len(val) or not len(test):
        missing = "validation" if not len(val) else "test"
        raise ClipxferError(f"{dataset.name}: no {missing} images left after drawing {shots} shots per label; "
                            "add images or give 'val'/'test' rows in the manifest's split column")
    return train, val, test
