"""Calibration: split-conformal thresholds and prediction sets, for classifiers and detectors."""

from .conformal import check_alpha, conformal_quantile, conformal_rank, false_alarm_threshold, min_calibration_size

__all__ = ["check_alpha", "conformal_quantile", "conformal_rank", "false_alarm_threshold", "min_calibration_size"]
