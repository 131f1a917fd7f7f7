"""Patch-score grids -> anomaly maps: bilinear upsampling and Gaussian smoothing (PatchCore's sigma = 4
model-input pixels)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: Gaussian smoothing of the upsampled map, in model-input pixels (PatchCore's sigma = 4); at a
#: working resolution above the input it grows in proportion, covering the same share of the part.
SMOOTHING_SIGMA = 4.0


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = int(math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def upsample_and_smooth(grid: np.ndarray, size: int, sigma: float = SMOOTHING_SIGMA) -> np.ndarray:
    """``(n, h, w)`` patch scores -> ``(n, size, size)`` bilinear upsampled, Gaussian smoothed."""
    x = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32)).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    kernel = _gaussian_kernel(sigma)
    pad = len(kernel) // 2
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1).numpy()
