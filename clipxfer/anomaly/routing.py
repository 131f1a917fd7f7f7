"""One detector for many part types: each part is routed to its type, then that type's detector and
threshold decide.

``anomaly fit DIR`` with one subfolder of good images per part type fits one detector per type
(:func:`~.fitting.fit_detector`, all at one working resolution) and a router: each type's prototype is
the mean of its shots' pooled patch features (every position's features averaged, L2-normalised), and
a part goes to the type with the most similar prototype (cosine). The routing confidence of a part is
its margin: cosine similarity to the chosen prototype minus that to the runner-up (0 = a tie).

Scores are put in one unit so one threshold (0) decides: a type's score ``s`` becomes
``(s - t) / (t - m)`` with ``t`` its threshold and ``m`` its median on held-out good parts, so
``score > 0`` is exactly that type's own decision. The false-alarm guarantee is each type's own: it
holds for a good part routed to its type (the routing accuracy on held-out goods is recorded).

A routed detector is one safetensors file: each type's arrays under ``<i>.<name>``, the prototypes,
and JSON naming the types with their configs; :func:`load_any_detector` reads it or a one-type file.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..encoders import Encoder
from ..encoders.artifacts import (
    DETECTOR_FORMAT,
    check_model_id,
    read_artifact_metadata,
    read_artifact_tensors,
    write_artifact,
)  # fmt: skip
from ..errors import ClipxferError
from ..images import find_images, is_image_path
from ..vector_math import l2_normalize
from .detector import AnomalyDetector, AnomalyScores, check_detector, load_detector, split_good
from .fitting import fit_detector
from .patches import DensePatches, encode_dense, take_patches

ROUTED = "routed"
#: Held-out good parts per type whose routing is checked at fit time (recorded, not used to fit).
ROUTE_CHECK = 20


def part_type_folders(root: str | os.PathLike) -> dict[str, list[Path]] | None:
    """``{type: good images}`` when ``root`` holds no image itself and two or more subfolders that
    hold images (a subfolder with ``train/good`` gives those, MVTec's layout); None for one part type."""
    root = Path(root)
    entries = sorted(root.iterdir())
    if any(entry.is_file() and is_image_path(entry) for entry in entries):
        return None
    types = {}
    for folder in (entry for entry in entries if entry.is_dir()):
        source = folder / "train" / "good" if (folder / "train" / "good").is_dir() else folder
        images = list(find_images(source))
        if images:
            types[folder.name] = images
    return types if len(types) >= 2 else None


def pooled_directions(local: np.ndarray) -> np.ndarray:
    """``(n, h, w, c)`` patch features -> ``(n, c)`` their mean over positions, L2-normalised."""
    return l2_normalize(np.asarray(local, np.float64).mean(axis=(1, 2)), dtype=None).astype(np.float32)


def route(local: np.ndarray, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(type row of each part, its routing margin) from patch features and type prototypes."""
    if local.shape[-1] != prototypes.shape[1]:
        raise ClipxferError(f"this routed detector's prototypes are {prototypes.shape[1]}-d, the encoder's patches "
                            f"{local.shape[-1]}-d: use the detector's own model")
    similarity = pooled_directions(local) @ prototypes.T
    order = np.argsort(-similarity, axis=1, kind="stable")
    rows = np.arange(len(similarity))
    best = similarity[rows, order[:, 0]]
    second = similarity[rows, order[:, 1]] if similarity.shape[1] > 1 else best
    return order[:, 0], (best - second).astype(np.float64)


class RoutedDetector:
    """Per-type detectors behind a router, scored like one :class:`~.detector.AnomalyDetector`."""

    method = ROUTED

    def __init__(self, model_id: str, types: dict[str, AnomalyDetector], prototypes: np.ndarray, config: dict[str, Any]):
        self.model_id = model_id
        self.types = types
        self.prototypes = np.ascontiguousarray(prototypes, dtype=np.float32)
        self.config = dict(config)

    @property
    def names(self) -> list[str]:
        return list(self.types)

    @property
    def map_size(self) -> int:
        return int(self.config["map_size"])

    @property
    def threshold(self) -> float:
        return 0.0

    @property
    def calibrated(self) -> bool:
        return True

    def check_model(self, model_id: str) -> None:
        """Refuse images encoded by another encoder than the one this detector was fitted with."""
        check_model_id(self.model_id, model_id, "this detector was fitted")

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """True (defect) where the routed type's detector flags the part."""
        return np.asarray(scores) > 0.0

    def decision_names(self, scores: np.ndarray) -> list[str]:
        return ["defect" if flagged else "ok" for flagged in self.decide(scores)]

    def routes(self, patches: DensePatches) -> tuple[list[str], np.ndarray]:
        """(the type each part is routed to, its routing margin)."""
        rows, margins = route(patches.local, self.prototypes)
        return [self.names[row] for row in rows], margins

    def score(self, patches: DensePatches) -> AnomalyScores:
        """Scores and maps in threshold units of each part's routed type (defect when > 0)."""
        names, _ = self.routes(patches)
        count, size = len(names), self.map_size
        scores, maps = np.zeros(count, np.float64), np.zeros((count, size, size), np.float32)
        for name in sorted(set(names)):
            rows = [i for i, routed in enumerate(names) if routed == name]
            result = self.types[name].score(take_patches(patches, rows))
            threshold, scale = _units(self.types[name])
            scores[rows] = (result.scores - threshold) / scale
            maps[rows] = (result.maps - threshold) / scale
        return AnomalyScores(scores, maps)

    def metadata(self) -> dict[str, Any]:
        types = [{"name": name, "config": detector.config} for name, detector in self.types.items()]
        return {"format": DETECTOR_FORMAT, "model_id": self.model_id, "config": {**self.config, "types": types}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the routed detector to ``path`` (``.safetensors`` added if missing), atomically."""
        arrays = {"route_prototypes": self.prototypes}
        for i, detector in enumerate(self.types.values()):
            arrays.update({f"{i}.{name}": value for name, value in detector.arrays.items()})
        return write_artifact(path, arrays, self.metadata(), "detector")


def _units(detector: AnomalyDetector) -> tuple[float, float]:
    """A type's threshold and its distance above the good parts' median: the routed score's unit."""
    threshold, median = detector.threshold, detector.config["calibration_score_median"]
    return threshold, max(threshold - median, 1e-12 * max(abs(threshold), 1.0))


def fit_routed_detector(
    encoder: Encoder,
    type_images: dict[str, Sequence],
    shots: int = 16,
    false_alarm_rate: float = 0.05,
    method: str = "auto",
    seed: int = 0,
    progress: bool = False,
    resolution: str | int | None = "auto",
    members: Sequence[str] | None = None,
    fitted: dict[str, AnomalyDetector] | None = None,
) -> RoutedDetector:
    """One detector per part type (:func:`~.fitting.fit_detector` on its good images, the type's name
    as the object) and the router between them. ``resolution`` ``auto``: each type chooses, then every
    type is fitted at the resolution most types chose (the larger on a tie), as one file scores at one.
    ``fitted``: per-type detectors already fitted with these settings (a benchmark compares them), used
    instead of fitting again."""
    if len(type_images) < 2:
        raise ClipxferError("a routed detector needs good images of at least two part types")
    if shots < 1:
        raise ClipxferError("a routed detector learns each type's prototype from its shots: --shots must be at least 1")
    fit_one = dict(shots=shots, false_alarm_rate=false_alarm_rate, method=method, seed=seed, progress=progress,
                   members=members)  # fmt: skip
    types: dict[str, AnomalyDetector] = {}
    for name, images in type_images.items():
        if fitted and name in fitted:
            types[name] = fitted[name]
            continue
        if progress:
            print(f"part type {name}: {len(images)} good images", file=sys.stderr)
        types[name] = fit_detector(encoder, list(images), object_name=name, resolution=resolution, **fit_one)
    sizes = [detector.map_size for detector in types.values()]
    common = max(set(sizes), key=lambda size: (sizes.count(size), size))
    for name, detector in types.items():
        if detector.map_size != common:
            chosen = detector.members if detector.method == "fused" else None
            again = {**fit_one, "method": detector.method, "members": chosen}
            types[name] = fit_detector(encoder, list(type_images[name]), object_name=name, resolution=common, **again)
    for name, detector in types.items():
        if not detector.calibrated:
            raise ClipxferError(f"part type {name}: too few held-out good images to set a threshold at a false-alarm "
                                f"rate of {false_alarm_rate:g}; add good images of {name} or raise --false-alarm-rate")
    prototypes, routed_ok, held_out_count, margins = [], 0, 0, []
    encoded = {}
    for name, images in type_images.items():
        fit_rows, held_out = split_good(len(images), shots, seed)
        checked = held_out[np.random.default_rng([seed, 2]).permutation(len(held_out))[:ROUTE_CHECK]]
        patches = encode_dense(encoder, [images[i] for i in np.r_[fit_rows, checked]], resolution=common)
        encoded[name] = (patches, len(fit_rows))
        prototypes.append(pooled_directions(take_patches(patches, range(len(fit_rows))).local).mean(axis=0))
    prototypes = l2_normalize(np.stack(prototypes))
    names = list(types)
    per_type = {}
    for row, name in enumerate(names):
        patches, fitted = encoded[name]
        held = take_patches(patches, range(fitted, len(patches.local)))
        chosen, margin = route(held.local, prototypes) if len(held.local) else (np.zeros(0, int), np.zeros(0))
        correct = int((chosen == row).sum())
        per_type[name] = {"held_out": int(len(chosen)), "routed_right": correct}
        routed_ok, held_out_count = routed_ok + correct, held_out_count + len(chosen)
        margins.extend(margin.tolist())
    config = {
        "method": ROUTED, "input_size": encoder.input_size, "map_size": common, "shots": shots, "seed": seed,
        "false_alarm_rate": false_alarm_rate, "threshold": 0.0,
        "routing": {"by": "pooled patch features, nearest type prototype (cosine)",
                    "held_out_accuracy": round(routed_ok / held_out_count, 6) if held_out_count else None,
                    "held_out_median_margin": round(float(np.median(margins)), 6) if margins else None,
                    "per_type": per_type},
    }  # fmt: skip
    return RoutedDetector(encoder.id, types, prototypes, config)


def load_any_detector(path: str | os.PathLike, model_id: str | None = None):
    """A saved detector: a routed one (:class:`RoutedDetector`) or one type's
    (:func:`~.detector.load_detector`), checked; with ``model_id`` given, refuse another encoder's."""
    meta = read_artifact_metadata(path, "detector", "make one with 'clipxfer anomaly fit'")
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict) or config.get("method") != ROUTED:
        return load_detector(path, model_id)
    detector = _check_routed(path, meta, read_artifact_tensors(path, "detector"))
    if model_id is not None:
        detector.check_model(model_id)
    return detector


def _check_routed(path, meta: dict, arrays: dict[str, np.ndarray]) -> RoutedDetector:
    """The routed detector a file describes, each type checked as a detector file of its own, or one line."""

    def bad(what: str) -> ClipxferError:
        return ClipxferError(f"{path}: damaged routed anomaly detector: {what}; fit it again with 'clipxfer anomaly fit'")

    if meta.get("format") != DETECTOR_FORMAT:
        raise ClipxferError(f"{path}: not a clipxfer anomaly detector (format {meta.get('format')!r})")
    config = dict(meta["config"])
    entries = config.pop("types", None)
    if not isinstance(entries, list) or len(entries) < 2 or not all(isinstance(e, dict) for e in entries):
        raise bad("'types' does not list two or more part types")
    names = [entry.get("name") for entry in entries]
    if not all(isinstance(name, str) and name for name in names) or len(set(names)) < len(names):
        raise bad(f"type names {names!r} are not distinct names")
    prototypes = arrays.get("route_prototypes")
    if prototypes is None or prototypes.ndim != 2 or prototypes.shape[0] != len(names) or not np.isfinite(prototypes).all():
        raise bad(f"array 'route_prototypes' is not a finite matrix with one row per type ({len(names)})")
    map_size = config.get("map_size")
    types = {}
    for i, entry in enumerate(entries):
        prefix = f"{i}."
        own = {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}
        detector = check_detector(f"{path} (type {names[i]})", {"format": DETECTOR_FORMAT, "model_id": meta["model_id"],
                                                                 "config": entry.get("config")}, own)  # fmt: skip
        if not detector.calibrated or detector.config.get("calibration_score_median") is None:
            raise bad(f"type {names[i]} has no calibrated threshold")
        if detector.map_size != map_size or detector.config["input_size"] != config.get("input_size"):
            raise bad(f"type {names[i]} works at {detector.map_size} px, the file at {map_size!r} px")
        if not math.isfinite(_units(detector)[1]):
            raise bad(f"type {names[i]} has no finite score unit")
        types[names[i]] = detector
    return RoutedDetector(meta["model_id"], types, prototypes, config)

