"""Choosing a detector's settings without test defects: working resolution and fused members.

A few held-out good parts (never the calibration ones, so the conformal guarantee is untouched) are
scored as they are and with synthetic flaws pasted in (:mod:`.synthetic`), or, when the user gives
real defect images, against those instead. Every candidate (resolution x non-empty subset of the
member detectors) is fitted on the same shots; each member's scores are put in units of its spread on
the validation goods, the subset's score is their maximum (as fusion does), and the candidate with
the best mean image AUROC over the flaw kinds wins; near-ties (within :data:`TIE`) go to fewer members,
then to the lower resolution, as they cost less and spend less of the false-alarm budget.
"""

from __future__ import annotations

from itertools import combinations
from typing import Callable, Sequence

import numpy as np

from .detector import METHOD_ARRAYS, AnomalyDetector, build_detector

#: Held-out good parts set aside for validation: at most this many, and at most a quarter of them.
VALIDATION_PARTS = 20
#: Fewer validation goods than this and nothing is chosen (the defaults stand).
MIN_VALIDATION_PARTS = 6
#: Mean AUROCs this close count as a tie.
TIE = 0.005


def validation_rows(held_out: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split held-out good rows into (validation, calibration); no validation rows when there are
    too few to spare. Every row gets a priority drawn with ``seed`` and the lowest-priority held-out
    rows validate, so draws of other shots from the same images mostly validate on the same parts
    (the benchmark encodes their flaws once)."""
    held_out = np.asarray(held_out, dtype=np.int64)
    count = min(VALIDATION_PARTS, len(held_out) // 4)
    if count < MIN_VALIDATION_PARTS:
        return held_out[:0], held_out
    priority = np.random.default_rng([seed, 1]).random(int(held_out.max()) + 1)
    chosen = np.zeros(len(held_out), bool)
    chosen[np.argsort(priority[held_out], kind="stable")[:count]] = True
    return held_out[chosen], held_out[~chosen]


def _auroc(good: np.ndarray, flawed: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(good)), np.ones(len(flawed))], np.r_[good, flawed]))


def _standardised(good: np.ndarray, other: np.ndarray) -> np.ndarray:
    spread = max(float(np.std(good)), 1e-12 * max(abs(float(np.median(good))), 1.0))
    return (other - np.median(good)) / spread


def choose_settings(
    encoder,
    encode: Callable[[Sequence, int], object],
    shots: Sequence,
    goods: Sequence,
    flawed: Sequence,
    flaw_kinds: Sequence[str],
    resolutions: Sequence[int],
    members: Sequence[str],
    seed: int = 0,
    object_name: str = "object",
    subsets: bool = True,
) -> tuple[AnomalyDetector, list[dict]]:
    """(the chosen detector, uncalibrated; the table of every candidate's mean and per-kind AUROC).

    ``encode(items, resolution)`` -> :class:`~.patches.DensePatches`; ``shots``, ``goods`` and
    ``flawed`` are items it accepts; ``flaw_kinds[i]`` names the kind of ``flawed[i]``. With
    ``subsets`` False only all of ``members`` together is a candidate (the user named them: only the
    resolution is open). The chosen detector is the candidate fitted here, so its memory bank is not
    built twice."""
    kinds = np.asarray(flaw_kinds)
    table, fitted = [], {}
    for resolution in resolutions:
        shot_patches = encode(shots, resolution)
        detector = build_detector(encoder, shot_patches, "fused", object_name, seed, members=members, resolution=resolution)
        fitted[int(resolution)] = detector
        good_out = detector.member_outputs(encode(goods, resolution))
        flawed_out = detector.member_outputs(encode(flawed, resolution))
        for size in range(1 if subsets else len(members), len(members) + 1):
            for subset in combinations(detector.members, size):
                good = np.max([_standardised(good_out[m][0], good_out[m][0]) for m in subset], axis=0)
                bad = np.max([_standardised(good_out[m][0], flawed_out[m][0]) for m in subset], axis=0)
                per_kind = {kind: round(_auroc(good, bad[kinds == kind]), 4) for kind in sorted(set(flaw_kinds))}
                table.append({"resolution": int(resolution), "members": list(subset),
                              "mean_auroc": round(float(np.mean(list(per_kind.values()))), 4), "per_kind": per_kind})  # fmt: skip
    best = max(row["mean_auroc"] for row in table)
    near = [row for row in table if row["mean_auroc"] >= best - TIE]
    chosen = min(near, key=lambda row: (len(row["members"]), row["resolution"], -row["mean_auroc"]))
    return with_members(fitted[chosen["resolution"]], chosen["members"]), table


def with_members(detector: AnomalyDetector, members: Sequence[str]) -> AnomalyDetector:
    """A fused ``detector`` reduced to ``members`` (their arrays only), uncalibrated."""
    arrays = {name: value for name, value in detector.arrays.items()
              if any(name in METHOD_ARRAYS[member] for member in members)}  # fmt: skip
    config = {key: value for key, value in detector.config.items() if key not in ("member_calibration", "threshold")}
    config["members"] = [member for member in detector.members if member in members]
    return AnomalyDetector(detector.model_id, arrays, config)
