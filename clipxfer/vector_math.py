"""Small pure functions over rows of vectors (numpy only, so any layer may use them)."""

from __future__ import annotations

import numpy as np


def l2_normalize(rows: np.ndarray, dtype: type | None = np.float32) -> np.ndarray:
    """Vectors along the last axis scaled to unit length (all-zero ones stay zero), as ``dtype``
    (float32 by default; None keeps the input's)."""
    rows = np.asarray(rows, dtype=dtype)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)
