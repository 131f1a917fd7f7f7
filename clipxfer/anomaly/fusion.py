"""Calibrated fusion: several detectors, one decision, a guaranteed false-alarm rate.

Each member detector (``patchcore``, ``gaussian``, ``zeroshot``) scores the held-out good parts; its
threshold ``t_j`` is the split-conformal threshold at level ``alpha / m`` for ``m`` members. A part is
a defect when any member's score is above its own threshold: when a new good part is exchangeable
with the held-out ones, each member flags it with probability at most ``alpha / m``, so by the union
bound (Bonferroni) the fused decision flags it with probability at most ``alpha``, however the
members' scores depend on one another.

The fused image score, for ranking and heat maps, is ``max_j (s_j - t_j) / (t_j - median_j)``: each
member's distance past its threshold in units of its own good spread, so the fused threshold is 0
and the decision above is exactly ``score > 0``. Maps are fused the same way over the members that
have maps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..calibrate import false_alarm_threshold, min_calibration_size
from .gaussian import gaussian_scores
from .patchcore import patchcore_grid
from .smoothing import upsample_and_smooth
from .zeroshot import anomalous_probability

#: The detectors fusion may combine, in the order they are reported.
MEMBERS = ("patchcore", "gaussian", "zeroshot")


def member_outputs(arrays: dict[str, np.ndarray], config: dict[str, Any], members, patches) -> dict:
    """``{member: (image scores, maps or None)}`` for encoded parts ``patches``."""
    size, sigma = config["map_size"], config["smoothing_sigma"]
    out = {}
    for member in members:
        if member == "patchcore":
            maps = upsample_and_smooth(patchcore_grid(patches.local, arrays["memory_bank"]), size, sigma)
        elif member == "zeroshot":
            maps = upsample_and_smooth(anomalous_probability(patches.joint, arrays["text_states"], config["logit_scale"]),
                                       size, sigma)
        else:
            out[member] = (gaussian_scores(patches.local, arrays["gaussian_mean"], arrays["gaussian_precision"]), None)
            continue
        out[member] = (maps.reshape(len(maps), -1).max(axis=1).astype(np.float64), maps)
    return out


def member_calibration(outputs: dict, alpha: float) -> dict[str, dict[str, float | None]]:
    """Per member, from its scores on held-out good parts: the conformal threshold at ``alpha / m``
    (None when there are too few parts for that level), the median and the standard deviation."""
    level = alpha / len(outputs)
    result = {}
    for member, (scores, _) in outputs.items():
        enough = len(scores) >= min_calibration_size(level)
        result[member] = {
            "threshold": float(false_alarm_threshold(scores, level)) if enough else None,
            "median": float(np.median(scores)) if len(scores) else None,
            "spread": float(np.std(scores)) if len(scores) else None,
        }
    return result


def fuse(outputs: dict, calibration: dict, map_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fused image scores (defect when > 0) and maps from member outputs and their calibration."""
    scores, maps = [], []
    for member, (member_scores, member_maps) in outputs.items():
        entry = calibration[member]
        threshold, median = entry["threshold"], entry["median"]
        if threshold is not None:
            scale = max(threshold - median, 1e-12 * max(abs(threshold), 1.0))
        elif median is not None:
            # Too few held-out parts for a threshold (the detector decides nothing): scores still
            # rank, in units of the good parts' spread around their median.
            threshold, scale = median, max(entry.get("spread") or 0.0, 1e-12 * max(abs(median), 1.0))
        else:
            threshold, scale = 0.0, 1.0
        scores.append((member_scores - threshold) / scale)
        if member_maps is not None:
            maps.append((member_maps - threshold) / scale)
    fused = np.max(scores, axis=0)
    if maps:
        fused_maps = np.max(maps, axis=0)
    else:
        # Only global members: the map is the image's score everywhere (no place to point at).
        fused_maps = np.broadcast_to(fused[:, None, None], (len(fused), map_size, map_size))
    return fused.astype(np.float64), np.ascontiguousarray(fused_maps, dtype=np.float32)
