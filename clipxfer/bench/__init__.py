"""Benchmarks: zero-shot vs adapted accuracy over shots and seeds (:func:`run_bench`), novel-class
episodes (:mod:`.episodes`) and anomaly detectors on a defect set (:func:`run_anomaly_bench`)."""

from .anomaly import run_anomaly_bench
from .config import BenchConfig, DatasetSpec, load_config
from .run import CSV_COLUMNS, run_bench

__all__ = ["run_anomaly_bench", "BenchConfig", "DatasetSpec", "load_config", "run_bench", "CSV_COLUMNS"]
