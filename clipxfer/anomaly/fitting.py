"""``fit_detector``: good images -> a calibrated detector, its settings chosen without test defects.

The good images are split (seeded) into the shots the detectors learn from, a few validation parts
(only when something is to be chosen: :mod:`.selection`) and the calibration parts that set the
threshold. The validation parts are never calibration parts, so the false-alarm guarantee holds for
whatever the validation chose.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..calibrate import check_alpha, min_calibration_size
from ..encoders import Encoder
from ..errors import ClipxferError
from ..images import as_pil
from .detector import (
    DEFAULT_FALSE_ALARM_RATE,
    DEFAULT_MEMBERS,
    AnomalyDetector,
    build_detector,
    progress_bar,
    split_good,
)
from .fusion import MEMBERS
from .patches import encode_dense
from .selection import choose_settings, validation_rows, with_members
from .synthetic import FLAWS, synthetic_flaw
from .tiling import working_resolution

#: ``--resolution auto`` tries the encoder's input and this many times it (384 for a 224 input):
#: there a 1%-of-the-side speck on a 250-pixel part spans about two cells of lite's stride-8 grid.
AUTO_SCALE = 12 / 7


def resolution_candidates(encoder: Encoder, resolution: str | int | None, sample: object | None,
                          method: str = "auto") -> list[int]:
    """Working resolutions to consider: one for a number or ``native`` (the first good part's
    larger side, at least the encoder's input); for ``auto``, the input and :data:`AUTO_SCALE` x it
    when ``method`` is ``auto`` or ``fused`` (chosen by validation), else the input alone."""
    size = encoder.input_size
    if resolution in (None, "auto"):
        if method not in ("auto", "fused"):
            return [size]
        return [size, working_resolution(encoder, int(round(size * AUTO_SCALE)))]
    if resolution == "native":
        side = max(as_pil(sample).size) if sample is not None else size
        return [working_resolution(encoder, max(side, size))]
    try:
        value = int(resolution)
    except (TypeError, ValueError):
        raise ClipxferError(f"--resolution {resolution!r}: give a number of pixels, 'native' or 'auto'") from None
    return [working_resolution(encoder, value)]


def parse_resolution(value: str | int | None) -> str | int:
    """A ``--resolution`` value: ``auto``, ``native`` or a whole number of pixels."""
    if value is None or str(value) in ("auto", "native"):
        return "auto" if value is None else str(value)
    try:
        return int(value)
    except ValueError:
        raise ClipxferError(f"--resolution {value!r}: give a number of pixels, 'native' or 'auto'") from None


def fit_detector(
    encoder: Encoder,
    good_images: Sequence,
    shots: int = 16,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    method: str = "auto",
    object_name: str = "object",
    seed: int = 0,
    progress: bool = False,
    resolution: str | int | None = "auto",
    defects: Sequence | None = None,
    members: Sequence[str] | None = None,
) -> AnomalyDetector:
    """Fit on ``shots`` good images drawn with ``seed`` and calibrate the threshold on the others.

    ``good_images``: paths, PIL images or uint8 arrays of good parts only. ``method`` ``auto`` (with
    shots) is calibrated fusion; its members (unless ``members`` names them) and the working
    ``resolution`` (``auto``: the encoder's input or :data:`AUTO_SCALE` x it; ``native``; pixels) are
    chosen on validation parts set aside from the held-out goods, with synthetic flaws, or with
    ``defects`` (real defect images) when given.
    """
    check_alpha(false_alarm_rate, "false-alarm rate")
    if not len(good_images):
        raise ClipxferError("no good images given: the detector needs held-out good images to set its threshold")
    fit_rows, held_out = split_good(len(good_images), shots, seed)
    candidates = resolution_candidates(encoder, parse_resolution(resolution), good_images[0], method)
    fused = method == "auto" and shots > 0 or method == "fused"
    member_choices = list(members) if members else None
    wants_choice = fused and (len(candidates) > 1 or member_choices is None)
    check_rows, calibration_rows = validation_rows(held_out, seed) if wants_choice else (held_out[:0], held_out)
    selection = chosen = None
    if len(check_rows):
        selection, chosen = _select(encoder, good_images, fit_rows, check_rows, candidates, member_choices, defects, seed,
                            object_name, progress)  # fmt: skip
        candidates, member_choices = [selection["resolution"]], selection["members"]
    elif fused and member_choices is None:
        member_choices = list(DEFAULT_MEMBERS)
    if method == "auto" and not members and member_choices:
        # Too few held-out parts to give each of m members a threshold at alpha / m: drop members
        # (zeroshot, then gaussian) rather than fit a detector that can flag nothing.
        while len(member_choices) > 1 and len(calibration_rows) < min_calibration_size(false_alarm_rate / len(member_choices)):
            member_choices = member_choices[:-1]
    working = candidates[0]
    images = [good_images[i] for i in fit_rows], [good_images[i] for i in calibration_rows]
    # The detector validation chose was fitted on these shots at this resolution: reuse it, so the
    # shots are not encoded again and the memory bank (a greedy coreset) is built once.
    encode_shots = bool(shots) and chosen is None
    bar = progress_bar(len(fit_rows) * encode_shots + len(calibration_rows), progress)
    update = bar.update if bar else None
    shot_patches = encode_dense(encoder, images[0], progress=update, resolution=working) if encode_shots else None
    calibration = encode_dense(encoder, images[1], progress=update, resolution=working) if images[1] else None
    if bar:
        bar.close()
    has_joint = calibration.joint is not None if calibration is not None else None
    if chosen is not None:
        detector = with_members(chosen, member_choices)
    else:
        detector = build_detector(encoder, shot_patches, method, object_name, seed, has_joint=has_joint,
                                  members=member_choices, resolution=working)  # fmt: skip
    names = [Path(good_images[i]).name for i in fit_rows if isinstance(good_images[i], (str, os.PathLike))]
    detector.config["shot_files"] = names
    if selection is not None:
        detector.config["selection"] = selection
    return detector.calibrate(calibration, false_alarm_rate)


def _select(encoder, good_images, fit_rows, check_rows, candidates, member_choices, defects, seed, object_name,
            progress) -> tuple[dict, AnomalyDetector]:
    """Run :func:`~.selection.choose_settings` on the validation rows: (what it chose and why, the chosen
    detector fitted on the shots, uncalibrated)."""
    goods = [good_images[i] for i in check_rows]
    if defects:
        flawed, kinds, source = list(defects), ["given"] * len(defects), "defects"
    else:
        flawed = [synthetic_flaw(good_images[i], kind, int(i)) for kind in FLAWS for i in check_rows]
        kinds, source = [kind for kind in FLAWS for _ in check_rows], "synthetic"
    if member_choices:
        options = [m for m in MEMBERS if m in member_choices] + [m for m in member_choices if m not in MEMBERS]
    else:
        blank = np.zeros((1, encoder.input_size, encoder.input_size, 3), np.uint8)
        has_joint = encoder.encode_patches(blank).joint is not None
        options = [m for m in MEMBERS if m != "zeroshot" or has_joint]
    if progress:
        print(f"choosing settings on {len(goods)} held-out good parts and {len(flawed)} {source} flaws "
              f"(resolutions {', '.join(map(str, candidates))})", file=sys.stderr)  # fmt: skip

    def encode(items, size):
        return encode_dense(encoder, items, resolution=size)

    # Members named by the user: only the resolution is open.
    detector, table = choose_settings(encoder, encode, [good_images[i] for i in fit_rows], goods, flawed, kinds,
                                      candidates, options, seed, object_name, subsets=not member_choices)  # fmt: skip
    selection = {"by": source, "validation_size": int(len(goods)), "resolution": int(detector.map_size),
                 "members": detector.members, "table": table}  # fmt: skip
    return selection, detector
