"""Calibration: split-conformal thresholds and prediction sets, for classifiers and detectors."""

from .conformal import (
    SET_SCORES,
    ClassifierCalibration,
    check_alpha,
    conformal_quantile,
    conformal_rank,
    coverage,
    false_alarm_threshold,
    min_calibration_size,
    prediction_sets,
    ranked_mass,
    set_scores,
)

__all__ = [
    "SET_SCORES",
    "ClassifierCalibration",
    "check_alpha",
    "conformal_quantile",
    "conformal_rank",
    "coverage",
    "false_alarm_threshold",
    "min_calibration_size",
    "prediction_sets",
    "ranked_mass",
    "set_scores",
]
