"""Split conformal prediction: thresholds and prediction sets with finite-sample guarantees.

One small module serves both anomaly detectors (a false-alarm threshold from held-out good
images) and classifiers (prediction sets with coverage >= 1 - alpha). The guarantees hold when
calibration and test images are exchangeable (drawn from the same process), whatever the model;
see Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction" (2021), sections 1-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


# --------------------------------------------------------------------------- classifiers

#: Non-conformity scores for classifiers: APS (Romano et al. 2020) and RAPS (Angelopoulos et al.
#: 2021), both without the randomisation term, which keeps sets deterministic and coverage >= 1 - alpha
#: (conservatively); and LAC, one minus the class's probability (Sadinle et al. 2019), which gives the
#: smallest sets on average but spreads its misses unevenly over classes.
SET_SCORES = ("aps", "raps", "lac")


def ranked_mass(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and class: ``(mass, rank)`` where ``rank`` is the class's 1-based place when classes
    are sorted by probability (best first) and ``mass`` the probability summed down to and including it."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(1, probs.shape[1] + 1)[None, :].repeat(len(probs), 0), axis=1)
    mass = np.take_along_axis(cumulative, rank - 1, axis=1)
    return mass, rank


def set_scores(
    mass: np.ndarray, rank: np.ndarray, prob: np.ndarray, score: str = "aps", lam: float = 0.01, k_reg: int = 1
) -> np.ndarray:
    """Non-conformity of each (image, class) from :func:`ranked_mass` and the probabilities: APS is the
    mass itself; RAPS adds ``lam`` per rank beyond ``k_reg``, which keeps sets small when the tail of
    the ranking is noise; LAC is ``1 - prob``."""
    if score == "lac":
        return 1.0 - np.asarray(prob, dtype=np.float64)
    if score == "aps":
        return np.asarray(mass, dtype=np.float64)
    if score == "raps":
        return mass + lam * np.maximum(0, np.asarray(rank) - k_reg)
    raise ClipxferError(f"unknown conformal score '{score}': use one of {', '.join(SET_SCORES)}")


@dataclass
class ClassifierCalibration:
    """Held-out labelled images seen through a classifier, kept as each true class's probability, ranked
    mass and rank so any alpha and any score can be chosen later. ``source`` says where they came from."""

    prob: np.ndarray
    mass: np.ndarray
    rank: np.ndarray
    source: str

    @classmethod
    def from_probs(cls, probs: np.ndarray, labels: np.ndarray, source: str) -> "ClassifierCalibration":
        """Calibration from class probabilities of held-out images and their true labels."""
        labels = np.asarray(labels, dtype=np.int64)
        mass, rank = ranked_mass(probs)
        rows = np.arange(len(labels))
        return cls(np.asarray(probs, np.float64)[rows, labels], mass[rows, labels], rank[rows, labels], source)

    def to_config(self) -> dict:
        """A JSON-able form, stored in a head's config under ``calibration``."""
        return {
            "source": self.source,
            "prob": np.round(self.prob, 7).tolist(),
            "mass": np.round(self.mass, 7).tolist(),
            "rank": self.rank.tolist(),
        }

    @classmethod
    def from_config(cls, config: dict, where: str) -> "ClassifierCalibration":
        """The inverse of :meth:`to_config`; ``where`` names the file in errors."""
        try:
            prob = np.asarray(config["prob"], dtype=np.float64)
            mass = np.asarray(config["mass"], dtype=np.float64)
            rank = np.asarray(config["rank"], dtype=np.int64)
            source = str(config.get("source", ""))
        except (KeyError, TypeError, ValueError):
            raise ClipxferError(f"{where}: its conformal calibration data is damaged; refit the head") from None
        if not (prob.shape == mass.shape == rank.shape) or mass.ndim != 1 or not np.isfinite([prob, mass]).all():
            raise ClipxferError(f"{where}: its conformal calibration data is damaged; refit the head")
        return cls(prob, mass, rank, source)

    def __len__(self) -> int:
        return len(self.mass)

    def threshold(self, alpha: float, score: str = "aps", lam: float = 0.01, k_reg: int = 1) -> float:
        """The conformal quantile of the calibration scores at ``alpha``."""
        return conformal_quantile(set_scores(self.mass, self.rank, self.prob, score, lam, k_reg), alpha)


def prediction_sets(probs: np.ndarray, threshold: float, score: str = "aps", lam: float = 0.01, k_reg: int = 1) -> np.ndarray:
    """Boolean ``(n, num_classes)``: the classes whose score is within ``threshold``. The most probable
    class is always included, so no set is empty (including it never lowers coverage)."""
    mass, rank = ranked_mass(probs)
    sets = set_scores(mass, rank, probs, score, lam, k_reg) <= threshold
    sets[rank == 1] = True
    return sets


def coverage(sets: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose true class is in their set."""
    labels = np.asarray(labels, dtype=np.int64)
    return float(sets[np.arange(len(labels)), labels].mean()) if len(labels) else float("nan")
