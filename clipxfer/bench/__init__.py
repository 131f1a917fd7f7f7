"""The benchmark runner: zero-shot vs adapted accuracy over shots and seeds."""

from .config import BenchConfig, DatasetSpec, load_config
from .run import CSV_COLUMNS, run_bench

__all__ = ["BenchConfig", "DatasetSpec", "load_config", "run_bench", "CSV_COLUMNS"]
