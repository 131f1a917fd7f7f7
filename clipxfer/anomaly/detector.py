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
import torch
import torch.nn.functional as F

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
from .coreset import coreset_size, greedy_coreset
from .patches import DensePatches
from .zeroshot import anomalous_probability, state_text_vectors

METHODS = ("patchcore", "zeroshot", "combined")
#: What a detector of each method holds, checked when a file is loaded (:func:`check_detector`):
#: its arrays (each 2-D, finite) and the positive config numbers its scoring divides or scales by.
#: A new method adds its entry to both.
METHOD_ARRAYS = {
    "patchcore": ("memory_bank",),
    "zeroshot": ("text_states",),
    "combined": ("memory_bank", "text_states"),
}
METHOD_SCALES = {
    "patchcore": (),
    "zeroshot": ("logit_scale",),
    "combined": ("logit_scale", "patchcore_scale", "zeroshot_scale"),
}
#: Model input sizes a detector file may name (pixels per side): every encoder clipxfer runs is within;
#: a tampered size far outside would allocate maps of size**2 floats per image.
INPUT_SIZE_RANGE = (8, 1024)
#: Share of the shot patches the coreset keeps (PatchCore's default), and the floor below which
#: a bank is not thinned at all (a 4-shot lite bank, 3,136 patches, stays whole).
CORESET_RATIO = 0.1
CORESET_MIN = 4096
#: The default share of good parts a detector may flag.
DEFAULT_FALSE_ALARM_RATE = 0.05
#: Gaussian smoothing of the upsampled map, in model-input pixels (PatchCore's sigma = 4).
SMOOTHING_SIGMA = 4.0


@dataclass
class AnomalyScores:
    """Image scores and anomaly maps (``(n, s, s)`` at the model input size) of a batch."""

    scores: np.ndarray
    maps: np.ndarray


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


def nearest_distances(queries: np.ndarray, bank: np.ndarray, k: int = 1) -> np.ndarray:
    """Euclidean distances from each query row to its ``k`` nearest bank rows (faiss, exact)."""
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    distances, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return np.sqrt(np.maximum(distances, 0.0))


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

    def _patchcore_grid(self, patches: DensePatches) -> np.ndarray:
        n, h, w, c = patches.local.shape
        if c != self.arrays["memory_bank"].shape[1]:
            raise ClipxferError(f"this detector's memory bank holds {self.arrays['memory_bank'].shape[1]}-d patches, "
                                f"the encoder gives {c}-d ones: use the detector's own model")
        distances = nearest_distances(patches.local.reshape(-1, c), self.arrays["memory_bank"])[:, 0]
        return distances.reshape(n, h, w)

    def _zeroshot_grid(self, patches: DensePatches) -> np.ndarray:
        if patches.joint is None:
            raise ClipxferError(f"a {self.method} detector needs an encoder with joint-space patch features (an open_clip ViT)")
        return anomalous_probability(patches.joint, self.arrays["text_states"], self.config["logit_scale"])

    def score(self, patches: DensePatches) -> AnomalyScores:
        """Image scores and smoothed anomaly maps of encoded images."""
        size = self.config["input_size"]
        if self.method == "patchcore":
            maps = upsample_and_smooth(self._patchcore_grid(patches), size)
        elif self.method == "zeroshot":
            maps = upsample_and_smooth(self._zeroshot_grid(patches), size)
        else:
            # WinCLIP+ averages its zero-shot and few-shot maps; here each is first divided by its
            # typical value on the shot images, so neither's units dominate.
            patchcore = upsample_and_smooth(self._patchcore_grid(patches), size) / self.config["patchcore_scale"]
            zeroshot = upsample_and_smooth(self._zeroshot_grid(patches), size) / self.config["zeroshot_scale"]
            maps = 0.5 * (patchcore + zeroshot)
        scores = maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0, np.float32)
        return AnomalyScores(scores.astype(np.float64), maps.astype(np.float32))

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """True (defect) where a score is above the threshold."""
        return np.asarray(scores) > self.threshold

    def calibrate(self, good_patches: DensePatches | None, false_alarm_rate: float) -> "AnomalyDetector":
        """Set the threshold by split conformal prediction on held-out good images (not the shots),
        so that at most ``false_alarm_rate`` of good parts are flagged; warns when too few."""
        alpha = check_alpha(false_alarm_rate, "false-alarm rate")
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
    for name in METHOD_SCALES[method]:
        value = config.get(name)
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            raise bad(f"{name} {value!r} is not a positive finite number")
    for name in METHOD_ARRAYS[method]:
        array = arrays.get(name)
        if array is None or array.ndim != 2 or not array.shape[0] or not array.shape[1]:
            raise bad(f"array '{name}' is missing or not a non-empty matrix")
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise bad(f"array '{name}' holds values that are not finite numbers")
    if method in ("zeroshot", "combined") and arrays["text_states"].shape[0] != 2:
        raise bad("array 'text_states' must hold two rows (normal, anomalous)")
    return AnomalyDetector(meta["model_id"], arrays, config)


def resolve_method(method: str, shots: int, has_joint: bool) -> str:
    """``auto`` -> combined (shots and text-space patches), patchcore (shots only) or zeroshot
    (no shots); an explicit method is checked against what is available."""
    if method == "auto":
        if shots == 0:
            method = "zeroshot"
        else:
            method = "combined" if has_joint else "patchcore"
    if method not in METHODS:
        raise ClipxferError(f"unknown anomaly method '{method}': choose auto, {', '.join(METHODS)}")
    if method in ("zeroshot", "combined") and not has_joint:
        raise ClipxferError(f"the {method} method needs an open_clip ViT (text-space patch features); use patchcore with this model")
    if method in ("patchcore", "combined") and shots < 1:
        raise ClipxferError(f"the {method} method needs good images to learn from: --shots must be at least 1")
    if method == "zeroshot" and shots:
        raise ClipxferError("the zeroshot method learns from no images: use --shots 0 (or method combined)")
    return method


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
) -> AnomalyDetector:
    """An uncalibrated detector from the encoded shot images (None or empty for zero-shot).

    ``has_joint`` says whether the encoder gives text-space patches; it is read from
    ``shot_patches`` when there are any.
    """
    shots = 0 if shot_patches is None else len(shot_patches.local)
    if has_joint is None:
        has_joint = shot_patches is not None and shot_patches.joint is not None
    method = resolve_method(method, shots, has_joint)
    arrays: dict[str, np.ndarray] = {}
    config: dict[str, Any] = {
        "method": method, "shots": shots, "seed": seed, "object": object_name, "input_size": encoder.input_size,
        "smoothing_sigma": SMOOTHING_SIGMA,
    }  # fmt: skip
    if method in ("patchcore", "combined"):
        local = shot_patches.local.reshape(-1, shot_patches.local.shape[-1])
        keep = greedy_coreset(local, coreset_size(len(local), coreset_ratio, coreset_min), seed)
        arrays["memory_bank"] = local[keep]
        config.update(
            coreset_ratio=coreset_ratio, coreset_min=coreset_min, shot_patches=int(len(local)), bank_size=int(len(keep)),
            feature_grid=list(shot_patches.local.shape[1:3]), feature_dim=int(local.shape[1]),
        )  # fmt: skip
    if method in ("zeroshot", "combined"):
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


def fit_detector(
    encoder: Encoder,
    good_images: Sequence,
    shots: int = 16,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    method: str = "auto",
    object_name: str = "object",
    seed: int = 0,
    progress: bool = False,
) -> AnomalyDetector:
    """Fit on ``shots`` good images drawn with ``seed`` and calibrate the threshold on all the others.

    ``good_images``: paths, PIL images or uint8 arrays of good parts only.
    """
    from .patches import encode_dense

    check_alpha(false_alarm_rate, "false-alarm rate")
    if not len(good_images):
        raise ClipxferError("no good images given: the detector needs held-out good images to set its threshold")
    fit_rows, calibration_rows = split_good(len(good_images), shots, seed)
    bar = progress_bar(len(good_images), progress)
    update = bar.update if bar else None
    shot_patches = encode_dense(encoder, [good_images[i] for i in fit_rows], progress=update) if shots else None
    calibration = encode_dense(encoder, [good_images[i] for i in calibration_rows], progress=update) if len(calibration_rows) else None
    if bar:
        bar.close()
    has_joint = calibration.joint is not None if calibration is not None else None
    detector = build_detector(encoder, shot_patches, method, object_name, seed, has_joint=has_joint)
    names = [Path(good_images[i]).name for i in fit_rows if isinstance(good_images[i], (str, os.PathLike))]
    detector.config["shot_files"] = names
    return detector.calibrate(calibration, false_alarm_rate)


def progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr, or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="encode", unit="img", file=sys.stderr)
