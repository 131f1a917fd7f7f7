"""Greedy coreset subsampling of a memory bank (PatchCore, Roth et al., CVPR 2022, section 3.2).

Greedy k-centre selection keeps the patches that cover the feature space best, so a bank a tenth
of the size answers nearest-neighbour queries almost as the full bank would. Distances are taken
in a random projection (Johnson-Lindenstrauss), which keeps them nearly intact at a fraction of
the cost.
"""

from __future__ import annotations

import numpy as np
import torch

#: Width of the random projection the selection runs in.
PROJECTION_DIM = 128


def coreset_size(n: int, ratio: float, minimum: int) -> int:
    """How many of ``n`` patches to keep: ``ratio`` of them, at least ``minimum`` (at most ``n``).

    The floor matters for few shots: a 1-shot bank of a few hundred patches is already small, and
    thinning it further loses the rare-but-normal patches that keep false alarms down.
    """
    return int(min(n, max(minimum, round(ratio * n))))


def greedy_coreset(features: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of ``size`` rows of ``features`` chosen by greedy k-centre, starting from a row drawn with ``seed``."""
    n = len(features)
    if size >= n:
        return np.arange(n)
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if x.shape[1] > PROJECTION_DIM:
        projection = torch.randn(x.shape[1], PROJECTION_DIM, generator=generator) / PROJECTION_DIM**0.5
        x = x @ projection
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    nearest = ((x - x[first]) ** 2).sum(dim=1)
    for _ in range(size - 1):
        index = int(nearest.argmax())
        chosen.append(index)
        nearest = torch.minimum(nearest, ((x - x[index]) ** 2).sum(dim=1))
    return np.array(chosen, dtype=np.int64)
