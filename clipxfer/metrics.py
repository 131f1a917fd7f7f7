"""Classification metrics as small pure functions over numpy arrays.

``labels`` are integer class indices ``(n,)``, ``preds`` predicted indices ``(n,)``, ``probs``
class probabilities ``(n, num_classes)``. :func:`classification_report` bundles them into the one
JSON-able dict that ``classify``, the few-shot commands and the benchmark print.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix
from sklearn.metrics import f1_score

#: Bins of the expected calibration error (Guo et al. 2017 use 15).
ECE_BINS = 15


def accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Fraction of predictions equal to the label."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    return float(np.mean(labels == preds)) if len(labels) else float("nan")


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` counts; row = true class, column = predicted class."""
    return _sk_confusion_matrix(labels, preds, labels=np.arange(num_classes))


def per_class_recall(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class (correct / items of that class); NaN for a class with no items."""
    matrix = confusion_matrix(labels, preds, num_classes)
    support = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(matrix) / support, np.nan)


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray, num_classes: int | None = None) -> float:
    """Mean per-class recall over the classes that occur in ``labels`` (sklearn's definition)."""
    num_classes = num_classes or int(max(np.max(labels), np.max(preds))) + 1
    recall = per_class_recall(labels, preds, num_classes)
    return float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan")


def macro_f1(labels: np.ndarray, preds: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur in ``labels`` or ``preds``; a class never
    predicted counts as F1 0."""
    return float(f1_score(labels, preds, average="macro", zero_division=0))


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of items whose label is among the ``k`` most probable classes."""
    top = np.argsort(-np.asarray(probs), axis=1, kind="stable")[:, :k]
    return float(np.mean((top == np.asarray(labels)[:, None]).any(axis=1)))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of the top-1 prediction (Guo et al. 2017): split items by confidence (the top
    probability) into ``bins`` equal-width bins ``(i/bins, (i+1)/bins]`` and sum
    ``|bin| / n * |accuracy(bin) - mean confidence(bin)|``."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    inner_edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    which = np.searchsorted(inner_edges, confidence, side="left")  # right-closed bins
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def _number(value: float) -> float | None:
    """JSON has no NaN: undefined values become None."""
    return None if value is None or not np.isfinite(value) else float(value)


def classification_report(labels: np.ndarray, probs: np.ndarray, classnames: Sequence[str]) -> dict:
    """Everything we report about a labelled evaluation, JSON-able.

    Keys: ``n``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``top5_accuracy`` (None with
    five classes or fewer), ``ece`` (15 bins), ``mean_confidence``, ``per_class_recall``
    (class -> recall, None for a class without items), ``support`` (class -> items),
    ``classes`` and ``confusion_matrix`` (rows true, columns predicted, in ``classes`` order).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs)
    num_classes = len(classnames)
    if probs.shape != (len(labels), num_classes):
        raise ValueError(f"probs has shape {probs.shape}, expected ({len(labels)}, {num_classes})")
    preds = probs.argmax(axis=1)
    matrix = confusion_matrix(labels, preds, num_classes)
    recall = per_class_recall(labels, preds, num_classes)
    return {
        "n": int(len(labels)),
        "accuracy": _number(accuracy(labels, preds)),
        "balanced_accuracy": _number(balanced_accuracy(labels, preds, num_classes)),
        "macro_f1": _number(macro_f1(labels, preds)) if len(labels) else None,
        "top5_accuracy": _number(top_k_accuracy(labels, probs, 5)) if num_classes > 5 and len(labels) else None,
        "ece": _number(expected_calibration_error(labels, probs)) if len(labels) else None,
        "mean_confidence": _number(float(probs.max(axis=1).mean())) if len(labels) else None,
        "per_class_recall": {name: _number(r) for name, r in zip(classnames, recall)},
        "support": {name: int(s) for name, s in zip(classnames, matrix.sum(axis=1))},
        "classes": list(classnames),
        "confusion_matrix": matrix.tolist(),
    }


def multilabel_report(targets: np.ndarray, scores: np.ndarray, classnames: Sequence[str],
                      predicted: np.ndarray | None = None) -> dict:
    """Multi-label evaluation, JSON-able: ``map`` (mean over labels with at least one positive of
    the average precision, as CLIP_benchmark reports for VOC), ``per_label_ap`` (None for a label
    without positives) and, with ``predicted`` (0/1 decisions), ``micro_f1`` and ``macro_f1``."""
    from sklearn.metrics import average_precision_score, f1_score

    targets = np.asarray(targets).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    per_label = {}
    for c, name in enumerate(classnames):
        per_label[name] = float(average_precision_score(targets[:, c], scores[:, c])) if targets[:, c].any() else None
    known = [v for v in per_label.values() if v is not None]
    report = {"n": int(len(targets)), "map": float(np.mean(known)) if known else float("nan"),
              "per_label_ap": per_label}
    if predicted is not None:
        predicted = np.asarray(predicted).astype(int)
        report["micro_f1"] = float(f1_score(targets, predicted, average="micro", zero_division=0))
        report["macro_f1"] = float(f1_score(targets, predicted, average="macro", zero_division=0))
    return report
