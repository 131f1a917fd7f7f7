"""Split conformal prediction: thresholds and prediction sets with finite-sample guarantees.

One small module serves both anomaly detectors (a false-alarm threshold from held-out good
images) and classifiers (prediction sets with coverage >= 1 - alpha). The guarantees hold when
calibration and test images are exchangeable (drawn from the same process), whatever the model;
see Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction" (2021), sections 1-2.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ClipxferError


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """``alpha`` as a float in (0, 1), or one clear error naming the value."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ClipxferError(f"{name} must be a number in (0, 1), got {alpha!r}") from None
    if not 0.0 < alpha < 1.0 or math.isnan(alpha):
        raise ClipxferError(f"{name} must be in (0, 1) (e.g. 0.05 for 5%), got {alpha}")
    return alpha


def conformal_rank(n: int, alpha: float) -> int:
    """The 1-based rank ``ceil((n + 1) (1 - alpha))`` of the calibration score to threshold at.

    It exceeds ``n`` when the calibration set is too small for ``alpha``
    (``n < 1/alpha - 1``); then no finite threshold carries the guarantee.
    """
    return math.ceil((n + 1) * (1.0 - check_alpha(alpha)) - 1e-9)


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal threshold ``q`` over calibration non-conformity ``scores``.

    For a new exchangeable score ``s``: ``P(s > q) <= alpha``. Returns ``inf`` when there are
    too few scores for that guarantee (callers warn; see :func:`min_calibration_size`).
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if scores.size == 0:
        raise ClipxferError("conformal calibration needs at least one held-out score")
    if not np.isfinite(scores).all():
        raise ClipxferError("conformal calibration scores contain NaN or infinite values")
    rank = conformal_rank(scores.size, alpha)
    return float(scores[rank - 1]) if rank <= scores.size else math.inf


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration scores for which :func:`conformal_quantile` is finite."""
    return math.ceil(1.0 / check_alpha(alpha) - 1.0 - 1e-9)


def false_alarm_threshold(good_scores: np.ndarray, false_alarm_rate: float) -> float:
    """Anomaly-score threshold flagging at most ``false_alarm_rate`` of good parts.

    ``good_scores`` are detector scores of held-out good images (not used to fit the detector);
    an image is flagged when its score is strictly greater than the threshold.
    """
    return conformal_quantile(good_scores, check_alpha(false_alarm_rate, "false-alarm rate"))
