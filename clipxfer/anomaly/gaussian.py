"""A global detector: one Gaussian over pooled patch features (Rippel et al., ICPR 2020, "Modeling the
distribution of normal data in pre-trained deep features"). Each part becomes the mean and standard
deviation over positions of its multi-depth patch features; the good parts' pooled vectors get a
mean and a Ledoit-Wolf shrinkage covariance (scikit-learn), well conditioned from 16 shots, and a
part's score is its Mahalanobis distance.

A uniform change of texture (finer grain, another weave period, another direction) moves every
patch a little, which a nearest-patch distance misses and these statistics catch; a small local
flaw barely moves them. It has no map.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def pooled_statistics(local: np.ndarray) -> np.ndarray:
    """``(n, h, w, c)`` -> ``(n, 2c)``: each channel's mean and standard deviation over positions."""
    local = np.asarray(local, np.float32)
    return np.concatenate([local.mean(axis=(1, 2)), local.std(axis=(1, 2))], axis=1)


def fit_gaussian(local: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Mean and precision (inverse Ledoit-Wolf covariance) of the shots' pooled statistics."""
    from sklearn.covariance import LedoitWolf

    pooled = pooled_statistics(local).astype(np.float64)
    if len(pooled) == 1:
        # One shot has no spread to estimate: unit covariance, i.e. Euclidean distance to the shot.
        mean, precision, shrinkage = pooled[0], np.eye(pooled.shape[1]), 1.0
    else:
        fitted = LedoitWolf().fit(pooled)
        mean, precision, shrinkage = fitted.location_, fitted.precision_, float(fitted.shrinkage_)
    arrays = {"gaussian_mean": mean.astype(np.float32), "gaussian_precision": precision.astype(np.float32)}
    return arrays, {"gaussian_dim": int(pooled.shape[1]), "gaussian_shrinkage": shrinkage}


def gaussian_scores(local: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each part's pooled statistics to the good parts' Gaussian."""
    centred = pooled_statistics(local).astype(np.float64) - mean.astype(np.float64)
    squared = np.einsum("ij,jk,ik->i", centred, precision.astype(np.float64), centred)
    return np.sqrt(np.maximum(squared, 0.0))
