"""Conformal prediction sets for classifier heads: where the calibration comes from, and the sets.

A head fitted by a training command (``probe``, ``tip``, ...) keeps its validation images'
calibration in its config, so ``predict --conformal ALPHA`` needs nothing more; any head can
instead be calibrated on a labelled folder or manifest (``--calibrate DATA``). ``classify`` on a
labelled folder calibrates on a seeded half and reports coverage on the other half.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..encoders.base import ImageEncoding
from ..errors import ClipxferError
from .conformal import ClassifierCalibration, check_alpha, coverage, min_calibration_size, prediction_sets

UNKNOWN = "unknown"


def calibrate_on(head, encoding: ImageEncoding, labels: np.ndarray, source: str) -> ClassifierCalibration:
    """Calibration from held-out images the head was not fitted on, with their true labels."""
    return ClassifierCalibration.from_probs(head.predict_proba(encoding), labels, source)


def check_calibration_data(spec, classnames: list[str]) -> None:
    """Refuse calibration images whose classes are not ``classnames`` before anything is encoded
    (the files are only listed here)."""
    from ..datasets.labelled import load_dataset

    load_dataset(spec, classnames)


def calibrate_on_dataset(encoder, head, spec) -> ClassifierCalibration:
    """Calibration on a labelled folder or CSV manifest whose classes are the head's."""
    from ..datasets.features import encode_dataset
    from ..datasets.labelled import load_dataset

    dataset = load_dataset(spec, head.classnames)
    encoding = encode_dataset(encoder, dataset)
    return calibrate_on(head, encoding, dataset.labels, f"{spec} ({len(dataset)} images)")


def head_calibration(head, where: str) -> ClassifierCalibration:
    """The calibration a training command stored in the head, or one line saying how to get one."""
    stored = head.config.get("calibration")
    if not stored:
        raise ClipxferError(
            f"{where}: this head holds no conformal calibration (zero-shot heads, and heads fitted without "
            "validation images, have none); "
            "pass --calibrate DATA with labelled images of its classes"
        )
    return ClassifierCalibration.from_config(stored, where)


def split_for_calibration(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded half/half split of ``count`` labelled images: (calibration, evaluation) indices."""
    order = np.random.default_rng(seed).permutation(count)
    half = count // 2
    return np.sort(order[:half]), np.sort(order[half:])


@dataclass
class ConformalSets:
    """Prediction sets at level ``alpha``: ``sets`` is boolean ``(n, num_classes)``.

    With ``reject``, an image whose set is not a single class is decided ``unknown``; the
    fraction of images given a wrong class is then at most ``alpha`` (a wrong single-class set
    is a miss of the set)."""

    alpha: float
    score: str
    threshold: float
    sets: np.ndarray
    calibration_source: str
    calibration_size: int
    reject: bool = False
    evaluation: dict[str, Any] = field(default_factory=dict)

    def set_names(self, classnames: list[str]) -> list[list[str]]:
        """Each image's set as class names, in class order."""
        return [[classnames[j] for j in np.flatnonzero(row)] for row in self.sets]

    def decisions(self, classnames: list[str]) -> list[str]:
        """The single class of each image's set, or ``unknown`` when the set holds several."""
        return [names[0] if len(names) == 1 else UNKNOWN for names in self.set_names(classnames)]

    def evaluate(self, labels: np.ndarray, rows: np.ndarray | None = None) -> dict[str, Any]:
        """Coverage, mean set size and (with ``reject``) error and unknown rates over ``rows``."""
        rows = np.arange(len(self.sets)) if rows is None else rows
        sets, labels = self.sets[rows], np.asarray(labels)[rows]
        single = sets.sum(axis=1) == 1
        wrong_single = single & ~sets[np.arange(len(labels)), labels]
        self.evaluation = {
            "n": int(len(rows)),
            "coverage": coverage(sets, labels),
            "mean_set_size": float(sets.sum(axis=1).mean()) if len(rows) else float("nan"),
            "unknown_rate": float((~single).mean()) if len(rows) else float("nan"),
            "error_rate_of_decisions": float(wrong_single.mean()) if len(rows) else float("nan"),
        }
        return self.evaluation

    def summary(self) -> dict[str, Any]:
        """The ``conformal`` object of ``--json`` output."""
        return {
            "alpha": self.alpha,
            "score": self.score,
            "threshold": self.threshold if math.isfinite(self.threshold) else None,
            "calibration_source": self.calibration_source,
            "calibration_size": self.calibration_size,
            "reject": self.reject,
            "mean_set_size": float(self.sets.sum(axis=1).mean()) if len(self.sets) else None,
            "unknown_count": int((self.sets.sum(axis=1) != 1).sum()) if self.reject else None,
            "evaluation": self.evaluation or None,
        }


def conformal_sets(
    probs: np.ndarray, calibration: ClassifierCalibration, alpha: float, score: str = "aps", reject: bool = False
) -> ConformalSets:
    """Prediction sets for ``probs`` with coverage >= 1 - ``alpha`` for images exchangeable with the
    calibration images. Too few calibration images for ``alpha`` gives every class, with a warning."""
    alpha = check_alpha(alpha, "--conformal")
    threshold = calibration.threshold(alpha, score)
    if not math.isfinite(threshold):
        print(
            f"warning: {len(calibration)} calibration image(s) are too few for --conformal {alpha} "
            f"(need at least {min_calibration_size(alpha)}); every class is in every set",
            file=sys.stderr,
        )
    sets = prediction_sets(probs, threshold, score)
    return ConformalSets(alpha, score, threshold, sets, calibration.source, len(calibration), reject)
