"""The anomaly detector: a PatchCore memory bank, WinCLIP state prompts, or both, with a
split-conformal false-alarm threshold; one safetensors file with JSON metadata.

Scoring an image: every patch gets an anomaly score (distance to its nearest good patch in the
memory bank, and/or the probability of the "anomalous" prompt), the patch grid is upsampled to
the model input and smoothed (Gaussian, sigma 4 px, as PatchCore), and the image score is the
map's maximum. The image is a defect when its score is above the threshold.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..calibrate import check_alpha, false_alarm_threshold, min_calibration_size
from ..encoders import Encoder
from ..encoders.artifacts import (
    DETECTOR_FORMAT,
    check_model_id,
    read_artifact_metadata,
    read_artifact_tensors,
    write_artifact,
)  # fmt: skip
from ..errors import ClipxferError
from .fusion import MEMBERS, fuse, member_calibration, member_outputs
from .gaussian import fit_gaussian
from .patchcore import CORESET_MIN, CORESET_RATIO, fit_patchcore, nearest_distances, patchcore_grid
from .patches import DensePatches
from .smoothing import SMOOTHING_SIGMA, upsample_and_smooth
from .tiling import MAX_RESOLUTION
from .zeroshot import anomalous_probability, state_text_vectors

__all__ = ["CORESET_MIN", "CORESET_RATIO", "SMOOTHING_SIGMA", "nearest_distances", "upsample_and_smooth"]

#: ``fused`` is calibrated fusion of member detectors (:mod:`.fusion`); ``combined`` is WinCLIP+'s
#: average of the patchcore and zero-shot maps, kept for detectors fitted before fusion.
METHODS = ("patchcore", "gaussian", "zeroshot", "combined", "fused")
#: What a detector of each method holds, checked when a file is loaded (:func:`check_detector`):
#: its arrays (finite; each a matrix unless named in :data:`VECTOR_ARRAYS`) and the positive config
#: numbers its scoring divides or scales by. A fused detector needs those of each of its members.
#: A new method adds its entry to both.
METHOD_ARRAYS = {
    "patchcore": ("memory_bank",),
    "gaussian": ("gaussian_mean", "gaussian_precision"),
    "zeroshot": ("text_states",),
    "combined": ("memory_bank", "text_states"),
}
METHOD_SCALES = {
    "patchcore": (),
    "gaussian": (),
    "zeroshot": ("logit_scale",),
    "combined": ("logit_scale", "patchcore_scale", "zeroshot_scale"),
}
VECTOR_ARRAYS = ("gaussian_mean",)
#: Model input sizes a detector file may name (pixels per side): every encoder clipxfer runs is within;
#: a tampered size far outside would allocate maps of size**2 floats per image.
INPUT_SIZE_RANGE = (8, 1024)
#: The default share of good parts a detector may flag.
DEFAULT_FALSE_ALARM_RATE = 0.05
@dataclass
class AnomalyScores:
    """Image scores and anomaly maps (``(n, s, s)`` at the model input size) of a batch."""

    scores: np.ndarray
    maps: np.ndarray


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class AnomalyDetector:
    """A fitted detector: arrays (``memory_bank``, ``text_states``) plus JSON ``config``.

    Build one with :func:`build_detector` (+ :meth:`calibrate`) or :func:`fit_detector`; load one
    with :func:`load_detector`.
    """

    def __init__(self, model_id: str, arrays: dict[str, np.ndarray], config: dict[str, Any]):
        self.model_id = model_id
        self.arrays = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in arrays.items()}
        self.config = dict(config)

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def threshold(self) -> float:
        """Image scores above this are defects; ``inf`` when calibration was too small."""
        value = self.config.get("threshold")
        return math.inf if value is None else float(value)

    @property
    def calibrated(self) -> bool:
        """False when the detector has no threshold (too few held-out good images): it can score
        and draw maps, but its ok/defect decisions mean nothing (:meth:`decision_names` says ``unknown``)."""
        return self.config.get("threshold") is not None

    def decision_names(self, scores: np.ndarray) -> list[str]:
        """``defect`` or ``ok`` per score; ``unknown`` for all when the detector is not calibrated."""
        if not self.calibrated:
            return ["unknown"] * len(scores)
        return ["defect" if flagged else "ok" for flagged in self.decide(scores)]

    def check_model(self, model_id: str) -> None:
        """Refuse images encoded by another encoder than the one this detector was fitted with."""
        check_model_id(self.model_id, model_id, "this detector was fitted")

    @property
    def map_size(self) -> int:
        """Side of the square the part is squashed to (the working resolution) and of its maps."""
        return int(self.config.get("map_size", self.config["input_size"]))

    @property
    def members(self) -> list[str]:
        """The member detectors of a fused detector (else the one method)."""
        return list(self.config.get("members", [self.method]))

    def _zeroshot_grid(self, patches: DensePatches) -> np.ndarray:
        if patches.joint is None:
            raise ClipxferError(f"a {self.method} detector needs an encoder with joint-space patch features (an open_clip ViT)")
        return anomalous_probability(patches.joint, self.arrays["text_states"], self.config["logit_scale"])

    def member_outputs(self, patches: DensePatches) -> dict:
        """``{member: (image scores, maps or None)}``, before any fusion or threshold."""
        if "zeroshot" in self.members and patches.joint is None:
            self._zeroshot_grid(patches)  # the one-line error
        config = {"map_size": self.map_size, "smoothing_sigma": self.config.get("smoothing_sigma", SMOOTHING_SIGMA),
                  "logit_scale": self.config.get("logit_scale")}  # fmt: skip
        return member_outputs(self.arrays, config, self.members, patches)

    def score(self, patches: DensePatches) -> AnomalyScores:
        """Image scores and smoothed anomaly maps (``map_size`` square) of encoded images."""
        size = self.map_size
        if self.method == "fused":
            scores, maps = fuse(self.member_outputs(patches), self.config["member_calibration"], size)
            return AnomalyScores(scores, maps)
        if self.method in ("patchcore", "zeroshot", "gaussian"):
            scores, maps = self.member_outputs(patches)[self.method]
            if maps is None:
                maps = np.broadcast_to(scores[:, None, None], (len(scores), size, size)).astype(np.float32)
            return AnomalyScores(np.asarray(scores, np.float64), np.ascontiguousarray(maps, dtype=np.float32))
        # WinCLIP+ averages its zero-shot and few-shot maps; here each is first divided by its
        # typical value on the shot images, so neither's units dominate.
        sigma = self.config.get("smoothing_sigma", SMOOTHING_SIGMA)
        patchcore = upsample_and_smooth(patchcore_grid(patches.local, self.arrays["memory_bank"]), size, sigma)
        zeroshot = upsample_and_smooth(self._zeroshot_grid(patches), size, sigma)
        maps = 0.5 * (patchcore / self.config["patchcore_scale"] + zeroshot / self.config["zeroshot_scale"])
        scores = maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0, np.float32)
        return AnomalyScores(scores.astype(np.float64), maps.astype(np.float32))

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """True (defect) where a score is above the threshold."""
        return np.asarray(scores) > self.threshold

    def calibrate(self, good_patches: DensePatches | None, false_alarm_rate: float) -> "AnomalyDetector":
        """Set the threshold by split conformal prediction on held-out good images (not the shots),
        so that at most ``false_alarm_rate`` of good parts are flagged; warns when too few."""
        alpha = check_alpha(false_alarm_rate, "false-alarm rate")
        if self.method == "fused":
            return self._calibrate_fused(good_patches, alpha)
        scores = self.score(good_patches).scores if good_patches is not None else np.zeros(0)
        needed = min_calibration_size(alpha)
        if len(scores) < needed:
            _warn(
                f"{len(scores)} held-out good images calibrate the threshold, but a false-alarm rate of {alpha:g} "
                f"needs at least {needed}: no image will be flagged. Add good images or raise --false-alarm-rate."
            )
            threshold = math.inf
        else:
            threshold = false_alarm_threshold(scores, alpha)
        self.config.update(
            threshold=None if math.isinf(threshold) else threshold,
            false_alarm_rate=alpha,
            calibration_size=int(len(scores)),
            calibration_score_median=float(np.median(scores)) if len(scores) else None,
        )
        return self

    def _calibrate_fused(self, good_patches: DensePatches | None, alpha: float) -> "AnomalyDetector":
        """Each member's threshold at ``alpha / members`` (Bonferroni, see :mod:`.fusion`); the fused
        threshold is 0."""
        count = 0 if good_patches is None else len(good_patches.local)
        if count:
            outputs = self.member_outputs(good_patches)
        else:
            outputs = {member: (np.zeros(0), None) for member in self.members}
        calibration = member_calibration(outputs, alpha)
        needed = min_calibration_size(alpha / len(self.members))
        if count < needed:
            _warn(
                f"{count} held-out good images calibrate {len(self.members)} fused detectors, but a false-alarm rate "
                f"of {alpha:g} needs at least {needed}: no image will be flagged. Add good images or raise --false-alarm-rate."
            )
        self.config.update(member_calibration=calibration, false_alarm_rate=alpha, calibration_size=int(count))
        if count >= needed:
            fused = fuse(outputs, calibration, self.map_size)[0]
            self.config.update(threshold=0.0, calibration_score_median=float(np.median(fused)))
        else:
            self.config.update(threshold=None, calibration_score_median=None)
        return self

    def metadata(self) -> dict[str, Any]:
        return {"format": DETECTOR_FORMAT, "model_id": self.model_id, "config": self.config}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the detector to ``path`` (``.safetensors`` added if missing), atomically."""
        return write_artifact(path, self.arrays, self.metadata(), "detector")


def load_detector(path: str | os.PathLike, model_id: str | None = None) -> AnomalyDetector:
    """Load a saved detector, checked (:func:`check_detector`); with ``model_id`` given, refuse one
    fitted with another encoder. A detector without a threshold loads with one warning line."""
    meta = read_artifact_metadata(path, "detector", "make one with 'clipxfer anomaly fit'")
    detector = check_detector(path, meta, read_artifact_tensors(path, "detector"))
    if model_id is not None:
        detector.check_model(model_id)
    if not detector.calibrated:
        _warn(f"{path}: this detector has no calibrated threshold (fitted with too few held-out good images): "
              "scores and maps only, every decision is 'unknown'; refit it with more good images")
    return detector


# --------------------------------------------------------------------------- checking a detector file


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_detector(path: str | os.PathLike, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> AnomalyDetector:
    """The detector a file's metadata and arrays describe, or one line naming the file and the first
    thing wrong with it: every field scoring reads is checked here, before any image is touched.
    Per-method needs are :data:`METHOD_ARRAYS` and :data:`METHOD_SCALES`."""

    def bad(what: str) -> ClipxferError:
        return ClipxferError(f"{path}: damaged anomaly detector: {what}; fit it again with 'clipxfer anomaly fit'")

    if meta.get("format") != DETECTOR_FORMAT:
        raise ClipxferError(f"{path}: not a clipxfer anomaly detector (format {meta.get('format')!r}, "
                            f"expected {DETECTOR_FORMAT!r})")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise bad("no config")
    if not isinstance(meta.get("model_id"), str) or not meta["model_id"]:
        raise bad("no model id")
    method = config.get("method")
    if method not in METHODS:
        raise bad(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    size = config.get("input_size")
    low, high = INPUT_SIZE_RANGE
    if not isinstance(size, int) or isinstance(size, bool) or not low <= size <= high:
        raise bad(f"input_size {size!r} is not a whole number of pixels in [{low}, {high}]")
    threshold = config.get("threshold")
    if threshold is not None and not (_is_number(threshold) and math.isfinite(threshold)):
        raise bad(f"threshold {threshold!r} is not a finite number (a detector without one stores null)")
    rate = config.get("false_alarm_rate")
    if not (_is_number(rate) and 0 < rate < 1):
        raise bad(f"false_alarm_rate {rate!r} is not a number in (0, 1)")
    median = config.get("calibration_score_median")
    if median is not None and not (_is_number(median) and math.isfinite(median)):
        raise bad(f"calibration_score_median {median!r} is not a finite number")
    members = config.get("members") if method == "fused" else [method]
    if method == "fused":
        if not isinstance(members, list) or not members or not set(members) <= set(MEMBERS) or len(set(members)) < len(members):
            raise bad(f"members {members!r} are not distinct detectors of {', '.join(MEMBERS)}")
        calibration = config.get("member_calibration")
        if not isinstance(calibration, dict) or set(calibration) != set(members):
            raise bad("member_calibration does not name each member once")
        for member, entry in calibration.items():
            keys = ("threshold", "median", "spread")
            values = [entry.get(key) for key in keys] if isinstance(entry, dict) else [None, "missing"]
            if any(v is not None and not (_is_number(v) and math.isfinite(v)) for v in values):
                raise bad(f"member_calibration of {member} holds {entry!r}, not finite numbers or null")
    map_size = config.get("map_size", size)
    if not isinstance(map_size, int) or isinstance(map_size, bool) or not size <= map_size <= MAX_RESOLUTION:
        raise bad(f"map_size {map_size!r} is not a whole number of pixels in [{size}, {MAX_RESOLUTION}]")
    sigma = config.get("smoothing_sigma", SMOOTHING_SIGMA)
    if not (_is_number(sigma) and math.isfinite(sigma) and 0 < sigma <= map_size):
        raise bad(f"smoothing_sigma {sigma!r} is not a positive number up to the map size")
    for name in sorted({scale for member in members for scale in METHOD_SCALES[member]}):
        value = config.get(name)
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            raise bad(f"{name} {value!r} is not a positive finite number")
    for name in sorted({array for member in members for array in METHOD_ARRAYS[member]}):
        array = arrays.get(name)
        dims = 1 if name in VECTOR_ARRAYS else 2
        if array is None or array.ndim != dims or not all(array.shape):
            raise bad(f"array '{name}' is missing or not a non-empty {'vector' if dims == 1 else 'matrix'}")
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise bad(f"array '{name}' holds values that are not finite numbers")
    if {"zeroshot", "combined"} & set(members) and arrays["text_states"].shape[0] != 2:
        raise bad("array 'text_states' must hold two rows (normal, anomalous)")
    if "gaussian" in members and arrays["gaussian_precision"].shape != (len(arrays["gaussian_mean"]),) * 2:
        raise bad("array 'gaussian_precision' is not square with the side of 'gaussian_mean'")
    return AnomalyDetector(meta["model_id"], arrays, config)


def resolve_method(method: str, shots: int, has_joint: bool) -> str:
    """``auto`` -> fused (with shots: calibrated fusion of member detectors) or zeroshot (no shots);
    an explicit method is checked against what is available."""
    if method == "auto":
        method = "zeroshot" if shots == 0 else "fused"
    if method not in METHODS:
        raise ClipxferError(f"unknown anomaly method '{method}': choose auto, {', '.join(METHODS)}")
    if method in ("zeroshot", "combined") and not has_joint:
        raise ClipxferError(f"the {method} method needs an open_clip ViT (text-space patch features); use patchcore with this model")
    if method in ("patchcore", "gaussian", "combined", "fused") and shots < 1:
        raise ClipxferError(f"the {method} method needs good images to learn from: --shots must be at least 1")
    if method == "zeroshot" and shots:
        raise ClipxferError("the zeroshot method learns from no images: use --shots 0 (or method fused)")
    return method


def check_members(members: Sequence[str], has_joint: bool) -> list[str]:
    """Fusion members in :data:`~.fusion.MEMBERS` order, checked."""
    unknown = sorted(set(members) - set(MEMBERS))
    if unknown or not members:
        raise ClipxferError(f"unknown fused detector(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(MEMBERS)}")
    if "zeroshot" in members and not has_joint:
        raise ClipxferError("the zeroshot detector needs an open_clip ViT (text-space patch features)")
    return [member for member in MEMBERS if member in members]


#: Fusion members when nothing chose them (fit_detector's validation does): one local, one global detector.
DEFAULT_MEMBERS = ("patchcore", "gaussian")


def _typical_distance(local: np.ndarray, bank: np.ndarray) -> float:
    """Mean distance of shot patches to their nearest *other* bank patch: the scale of normal
    variation, measured without held-out images (a patch that is in the bank skips itself)."""
    distances = nearest_distances(local, bank, k=min(2, len(bank)))
    nearest = np.where(distances[:, 0] > 0, distances[:, 0], distances[:, -1])
    value = float(nearest.mean())
    return value if value > 0 else 1.0


def build_detector(
    encoder: Encoder,
    shot_patches: DensePatches | None,
    method: str = "auto",
    object_name: str = "object",
    seed: int = 0,
    coreset_ratio: float = CORESET_RATIO,
    coreset_min: int = CORESET_MIN,
    has_joint: bool | None = None,
    members: Sequence[str] | None = None,
    resolution: int | None = None,
) -> AnomalyDetector:
    """An uncalibrated detector from the encoded shot images (None or empty for zero-shot).

    ``has_joint`` says whether the encoder gives text-space patches; it is read from
    ``shot_patches`` when there are any. ``members``: the detectors a fused one combines (default
    :data:`DEFAULT_MEMBERS`). ``resolution``: the working size the parts were encoded at (default
    the encoder's input; see :mod:`.tiling`).
    """
    shots = 0 if shot_patches is None else len(shot_patches.local)
    if has_joint is None:
        has_joint = shot_patches is not None and shot_patches.joint is not None
    method = resolve_method(method, shots, has_joint)
    used = check_members(members or DEFAULT_MEMBERS, has_joint) if method == "fused" else [method]
    size = int(resolution or encoder.input_size)
    arrays: dict[str, np.ndarray] = {}
    config: dict[str, Any] = {
        "method": method, "shots": shots, "seed": seed, "object": object_name, "input_size": encoder.input_size,
        "map_size": size, "smoothing_sigma": SMOOTHING_SIGMA * size / encoder.input_size,
    }  # fmt: skip
    if method == "fused":
        config["members"] = used
    if {"patchcore", "combined"} & set(used):
        bank, bank_config = fit_patchcore(shot_patches.local, seed, coreset_ratio, coreset_min)
        arrays.update(bank)
        config.update(bank_config)
        local = shot_patches.local.reshape(-1, shot_patches.local.shape[-1])
    if "gaussian" in used:
        gaussian, gaussian_config = fit_gaussian(shot_patches.local)
        arrays.update(gaussian)
        config.update(gaussian_config)
    if {"zeroshot", "combined"} & set(used):
        arrays["text_states"] = state_text_vectors(encoder, object_name)
        config["logit_scale"] = float(encoder.logit_scale)
    detector = AnomalyDetector(encoder.id, arrays, config)
    if method == "combined":
        detector.config["patchcore_scale"] = _typical_distance(local, arrays["memory_bank"])
        zeroshot = detector._zeroshot_grid(shot_patches)
        detector.config["zeroshot_scale"] = float(max(zeroshot.mean(), 1e-6))
    return detector


def split_good(count: int, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``shots`` fit images and of the held-out calibration images, drawn with ``seed``."""
    if shots > count:
        raise ClipxferError(f"--shots {shots} is more than the {count} good images given")
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[:shots]), np.sort(order[shots:])


def progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr, or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="encode", unit="img", file=sys.stderr)
