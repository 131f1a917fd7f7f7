"""Anomaly detection from good images only: PatchCore memory banks, WinCLIP zero-shot prompts,
their combination, split-conformal false-alarm thresholds, anomaly maps and detection metrics.

Entry points: :func:`fit_detector`, :func:`load_detector`, :func:`score_folder`, :func:`fit_routed_detector`
and :func:`load_any_detector` (one detector routing many part types),
:func:`build_texture_set` (the offline defect set) (the benchmark is :func:`clipxfer.bench.anomaly.run_anomaly_bench`).
"""

from .detector import AnomalyDetector, build_detector, load_detector
from .fitting import fit_detector
from .routing import RoutedDetector, fit_routed_detector, load_any_detector
from .score import FolderScores, score_folder
from .textures import build_texture_set

__all__ = [
    "AnomalyDetector", "FolderScores", "RoutedDetector", "build_detector", "build_texture_set", "fit_detector",
    "fit_routed_detector", "load_any_detector", "load_detector", "score_folder",
]  # fmt: skip
