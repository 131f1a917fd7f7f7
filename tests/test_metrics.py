"""Metrics on hand-made cases whose answers are worked out in the comments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipxfer.metrics import (
    accuracy,
    balanced_accuracy,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    per_class_recall,
    top_k_accuracy,
)

# Five items, three classes: class 0 half right, class 1 all right, class 2 never predicted.
LABELS = np.array([0, 0, 1, 1, 2])
PREDS = np.array([0, 1, 1, 1, 0])


def test_counting_metrics_by_hand():
    assert accuracy(LABELS, PREDS) == pytest.approx(3 / 5)
    np.testing.assert_array_equal(confusion_matrix(LABELS, PREDS, 3), [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    np.testing.assert_allclose(per_class_recall(LABELS, PREDS, 3), [0.5, 1.0, 0.0])
    assert balanced_accuracy(LABELS, PREDS, 3) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # F1: class 0 P=1/2 R=1/2 -> 1/2; class 1 P=2/3 R=1 -> 4/5; class 2 -> 0.
    assert macro_f1(LABELS, PREDS) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_balanced_accuracy_skips_absent_classes():
    # Class 3 has no items: its recall is undefined, and it is not averaged in.
    recall = per_class_recall(LABELS, PREDS, 4)
    assert np.isnan(recall[3])
    assert balanced_accuracy(LABELS, PREDS, 4) == pytest.approx(0.5)


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    # Bin (13/15, 14/15]: confidences 0.9, 0.9, one right -> 2/4 * |0.5 - 0.9| = 0.2
    # Bin (8/15, 9/15]:   confidences 0.6, 0.55, both right -> 2/4 * |1 - 0.575| = 0.2125
    assert expected_calibration_error(labels, probs) == pytest.approx(0.4125)


def test_ece_edges_and_extremes():
    # Confidence exactly 1 is in the top bin; always right at confidence 1 is perfectly calibrated.
    assert expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.0)
    # Always wrong at confidence 1: the worst case.
    assert expected_calibration_error(np.array([1, 0]), np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    # 0.6 sits exactly on the edge 9/15: right-closed bins put it with 0.55 in bin (8/15, 9/15].
    probs = np.array([[0.6, 0.4], [0.55, 0.45]])
    assert expected_calibration_error(np.array([0, 1]), probs) == pytest.approx(abs(0.5 - 0.575))


def test_top_k_accuracy():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = np.array([1, 2, 2])
    assert top_k_accuracy(labels, probs, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(labels, probs, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(labels, probs, 3) == pytest.approx(1.0)


def test_report_is_json_and_consistent():
    probs = np.eye(4)[[0, 1, 1, 1, 0]] * 0.7 + 0.075  # top class 0.775, others 0.075
    report = classification_report(LABELS, probs, ["a", "b", "c", "d"])
    json.dumps(report, allow_nan=False)
    assert report["n"] == 5 and report["accuracy"] == pytest.approx(0.6)
    assert report["balanced_accuracy"] == pytest.approx(0.5)
    assert report["per_class_recall"] == {"a": 0.5, "b": 1.0, "c": 0.0, "d": None}
    assert report["support"] == {"a": 2, "b": 2, "c": 1, "d": 0}
    assert report["confusion_matrix"][2] == [1, 0, 0, 0]
    assert report["ece"] == pytest.approx(abs(0.6 - 0.775))
    assert report["top5_accuracy"] is None
    with pytest.raises(ValueError, match="shape"):
        classification_report(LABELS, probs[:, :3], ["a", "b", "c", "d"])
