"""PatchCore (Roth et al., CVPR 2022): a local detector. Good parts' patch features form a memory
bank (thinned by greedy coreset); a patch's anomaly score is its distance to the nearest bank patch,
so a flaw anywhere lights up where it is. It sees local flaws well and uniform texture changes
badly: every changed patch still finds a fairly close good one (see :mod:`.gaussian`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ClipxferError
from .coreset import coreset_size, greedy_coreset

#: Share of the shot patches the coreset keeps (PatchCore's default), and the floor below which
#: a bank is not thinned at all (a 4-shot lite bank, 3,136 patches, stays whole).
CORESET_RATIO = 0.1
CORESET_MIN = 4096


def nearest_distances(queries: np.ndarray, bank: np.ndarray, k: int = 1) -> np.ndarray:
    """Euclidean distances from each query row to its ``k`` nearest bank rows (faiss, exact)."""
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    distances, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return np.sqrt(np.maximum(distances, 0.0))


def fit_patchcore(local: np.ndarray, seed: int, ratio: float = CORESET_RATIO,
                  minimum: int = CORESET_MIN) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The memory bank of ``(n, h, w, c)`` shot features: arrays and config entries."""
    rows = local.reshape(-1, local.shape[-1])
    keep = greedy_coreset(rows, coreset_size(len(rows), ratio, minimum), seed)
    config = {
        "coreset_ratio": ratio, "coreset_min": minimum, "shot_patches": int(len(rows)), "bank_size": int(len(keep)),
        "feature_grid": list(local.shape[1:3]), "feature_dim": int(rows.shape[1]),
    }  # fmt: skip
    return {"memory_bank": rows[keep]}, config


def patchcore_grid(local: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """``(n, h, w)`` distance of each patch to its nearest bank patch."""
    n, h, w, c = local.shape
    if c != bank.shape[1]:
        raise ClipxferError(f"this detector's memory bank holds {bank.shape[1]}-d patches, the encoder gives {c}-d ones: "
                            "use the detector's own model")
    return nearest_distances(local.reshape(-1, c), bank)[:, 0].reshape(n, h, w)
