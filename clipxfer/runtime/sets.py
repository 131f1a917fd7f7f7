"""Conformal prediction sets from a classifier bundle's calibration, in numpy alone.

The same arithmetic as :mod:`clipxfer.calibrate.conformal` (APS, RAPS, LAC; the split-conformal
quantile), repeated here because that package pulls in torch through its siblings and the runtime
must not; ``tests/test_runtime.py`` checks that both give the same sets.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ClipxferError

SET_SCORES = ("aps", "raps", "lac")


def ranked_mass(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and class: the probability mass down to and including the class, and its 1-based rank."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(1, probs.shape[1] + 1)[None, :].repeat(len(probs), 0), axis=1)
    return np.take_along_axis(cumulative, rank - 1, axis=1), rank


def set_scores(mass, rank, prob, score: str, lam: float = 0.01, k_reg: int = 1) -> np.ndarray:
    """Non-conformity of each (image, class): APS the mass, RAPS the mass plus a rank penalty, LAC 1 - prob."""
    if score == "lac":
        return 1.0 - np.asarray(prob, dtype=np.float64)
    if score == "aps":
        return np.asarray(mass, dtype=np.float64)
    if score == "raps":
        return mass + lam * np.maximum(0, np.asarray(rank) - k_reg)
    raise ClipxferError(f"unknown conformal score '{score}': use one of {', '.join(SET_SCORES)}")


def check_alpha(alpha) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ClipxferError(f"--alpha must be a number in (0, 1), got {alpha!r}") from None
    if not 0.0 < alpha < 1.0:
        raise ClipxferError(f"--alpha must be in (0, 1) (e.g. 0.1 for 10%), got {alpha}")
    return alpha


def threshold(calibration: dict, alpha: float, score: str) -> float:
    """The split-conformal quantile of the calibration scores (``inf`` when too few for ``alpha``)."""
    alpha = check_alpha(alpha)
    scores = np.sort(set_scores(np.asarray(calibration["mass"]), np.asarray(calibration["rank"]),
                                np.asarray(calibration["prob"]), score))  # fmt: skip
    rank = math.ceil((len(scores) + 1) * (1.0 - alpha) - 1e-9)
    return float(scores[rank - 1]) if 1 <= rank <= len(scores) else math.inf


def prediction_sets(probs: np.ndarray, level: float, score: str) -> np.ndarray:
    """Boolean ``(n, classes)``: the classes whose score is within ``level``; the top class always."""
    mass, rank = ranked_mass(probs)
    sets = set_scores(mass, rank, probs, score) <= level
    sets[rank == 1] = True
    return sets
