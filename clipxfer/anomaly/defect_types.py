"""Defect-type classification from patch-level evidence: which kind of defect (or good) a part shows.

A pooled image embedding averages a 10-pixel flaw away; the anomaly detector's maps do not. Each part
is described by four groups of numbers, all from one dense encoding at the detector's working size:

- ``map_stats``: each detector member's image score and, where it has a map, the map's maximum, mean,
  standard deviation and 90th/99th percentiles (how strong and how spread the anomaly is);
- ``peak_patch``: the patch features where the map peaks (what the flaw looks like);
- ``max_pooled``: each patch channel's maximum over positions (a small flaw's strongest response survives);
- ``mean_pooled``: each channel's mean over positions (a whole-part texture change moves it).

Every column is standardised on the labelled shots and each group is divided by the square root of its
width, so each group weighs alike whatever its size; a multinomial logistic regression (the probe's
L-BFGS fit, :func:`~clipxfer.heads.probe.fit_logistic`) is fitted on them. Which groups it reads
(:data:`GROUP_SETS`) and its L2 strength are chosen together by stratified cross-validation over the
shots (log-loss), never on test images: where the map does not single a flaw out (a speck on grass),
the wider input only costs shots, and the pooled groups alone do better.

The head is one safetensors file holding its weights and the detector it reads maps from (JSON
metadata: classes, groups, the detector's config), checked on load by :func:`load_defect_types`.
"""

from __future__ import annotations

import math
import os
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
from ..heads.probe import L2_GRID, fit_logistic
from ..images import find_images, is_image_path
from .detector import AnomalyDetector, check_detector
from .patches import DensePatches, encode_dense

#: The format tag of defect-type heads.
DEFECT_TYPES_FORMAT = "clipxfer-defect-types/1"
GROUPS = ("map_stats", "peak_patch", "max_pooled", "mean_pooled")
#: The group sets cross-validation chooses among, fullest first (ties go to the earlier set).
GROUP_SETS = (GROUPS, ("map_stats", "max_pooled", "mean_pooled"), ("map_stats", "mean_pooled"), ("mean_pooled",))
#: Map percentiles described (with max, mean and standard deviation).
PERCENTILES = (90, 99)
#: Members whose output has a map (the others give an image score only).
MAP_MEMBERS = ("patchcore", "zeroshot")
#: Folds of the cross-validation that chooses the L2 strength (fewer when a class has fewer shots).
FOLDS = 4
#: The L2 strength when a class has a single shot (no fold to validate on): the middle of the grid.
SINGLE_SHOT_L2 = float(np.median(L2_GRID))


def labelled_type_folders(root: str | os.PathLike) -> dict[str, list[Path]]:
    """``{type: images}`` from a folder with one subfolder per type (``good`` is a type like the others);
    one line when fewer than two subfolders hold images or images lie at the top."""
    root = Path(root)
    if not root.is_dir():
        raise ClipxferError(f"{root}: not a folder (give one subfolder of images per defect type)")
    loose = [entry.name for entry in root.iterdir() if entry.is_file() and is_image_path(entry)]
    if loose:
        raise ClipxferError(f"{root}: images at the top ({loose[0]}...): put each in the subfolder of its type")
    types = {folder.name: list(find_images(folder)) for folder in sorted(root.iterdir()) if folder.is_dir()}
    types = {name: images for name, images in types.items() if images}
    if len(types) < 2:
        raise ClipxferError(f"{root}: {len(types)} subfolder(s) with images; give one subfolder per type, at least two")
    return types


def check_type_detector(detector: AnomalyDetector) -> AnomalyDetector:
    """The detector a defect-type head can read maps from: one with a map (patchcore or zeroshot member)."""
    if not hasattr(detector, "member_outputs") or detector.method == "combined":
        raise ClipxferError(f"a defect-type head reads a patchcore, gaussian+patchcore or fused detector, not a "
                            f"{detector.method} one: fit one with 'clipxfer anomaly fit' on the good parts")
    if not set(MAP_MEMBERS) & set(detector.members):
        raise ClipxferError("a defect-type head needs a detector with an anomaly map (patchcore or zeroshot member); "
                            f"this one has {'+'.join(detector.members)}: refit it with --members patchcore,gaussian")
    return detector


def type_features(detector: AnomalyDetector, patches: DensePatches) -> dict[str, np.ndarray]:
    """The four groups of :data:`GROUPS` for encoded parts (at the detector's working size)."""
    outputs = detector.member_outputs(patches)
    local = np.asarray(patches.local, np.float32)
    count, height, width, _ = local.shape
    stats, peak_map = [], None
    for member in detector.members:
        scores, maps = outputs[member]
        stats.append(np.asarray(scores, np.float64)[:, None])
        if maps is not None:
            flat = maps.reshape(count, -1).astype(np.float64)
            stats.append(np.stack([flat.max(1), flat.mean(1), flat.std(1),
                                   *np.percentile(flat, PERCENTILES, axis=1)], axis=1))  # fmt: skip
            peak_map = maps if peak_map is None else peak_map
    size = peak_map.shape[1]
    peaks = peak_map.reshape(count, -1).argmax(axis=1)
    rows = np.minimum(peaks // size * height // size, height - 1)
    cols = np.minimum(peaks % size * width // size, width - 1)
    return {
        "map_stats": np.concatenate(stats, axis=1).astype(np.float32),
        "peak_patch": local[np.arange(count), rows, cols],
        "max_pooled": local.max(axis=(1, 2)),
        "mean_pooled": local.mean(axis=(1, 2)),
    }


def design_matrix(groups: dict[str, np.ndarray], mean: np.ndarray, scale: np.ndarray,
                  names: Sequence[str] = GROUPS) -> np.ndarray:  # fmt: skip
    """The groups ``names`` side by side, standardised with :func:`standardiser`'s ``mean`` and ``scale``."""
    x = np.concatenate([groups[name] for name in names], axis=1).astype(np.float64)
    return (x - mean) / scale


def standardiser(groups: dict[str, np.ndarray], names: Sequence[str] = GROUPS) -> tuple[np.ndarray, np.ndarray]:
    """Column means and scales of the groups ``names``: each column to unit spread, each group then to
    unit total weight."""
    x = np.concatenate([groups[name] for name in names], axis=1).astype(np.float64)
    spread = x.std(axis=0)
    spread = np.where(spread > 1e-12 * max(float(np.abs(x).max()), 1.0), spread, 1.0)
    widths = np.concatenate([np.full(groups[name].shape[1], math.sqrt(groups[name].shape[1])) for name in names])
    return x.mean(axis=0), spread * widths


def _folds(labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Stratified folds of the shot rows (each class spread over the folds), seeded."""
    folds = min(FOLDS, int(np.bincount(labels).min()))
    rng = np.random.default_rng([seed, 3])
    assignment = np.zeros(len(labels), np.int64)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        assignment[rng.permutation(rows)] = np.arange(len(rows)) % folds
    return [np.flatnonzero(assignment == fold) for fold in range(folds)]


def choose_l2(x: np.ndarray, labels: np.ndarray, classes: int, seed: int) -> tuple[float, dict[str, float]]:
    """The L2 strength of :data:`~clipxfer.heads.probe.L2_GRID` with the lowest cross-validated log-loss
    over the shots (ties to the stronger penalty); :data:`SINGLE_SHOT_L2` when a class has one shot."""
    import torch

    if np.bincount(labels, minlength=classes).min() < 2:
        return SINGLE_SHOT_L2, {}
    folds = _folds(labels, seed)
    losses = {}
    for l2 in sorted(L2_GRID, reverse=True):
        total = 0.0
        for held in folds:
            train = np.setdiff1d(np.arange(len(labels)), held)
            params = fit_logistic(x[train], labels[train], classes, l2)
            logits = torch.as_tensor(x[held]) @ params["W"].T + params["b"]
            total += float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels[held]), reduction="sum"))
        losses[f"{l2:g}"] = total / len(labels)
    best = min(sorted(L2_GRID, reverse=True), key=lambda l2: losses[f"{l2:g}"])
    return float(best), losses


def fit_linear(x: np.ndarray, labels: np.ndarray, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Weights, bias and the choice record of a cross-validated logistic regression on rows ``x``."""
    l2, losses = choose_l2(x, labels, classes, seed)
    params = fit_logistic(x, labels, classes, l2)
    return params["W"].numpy(), params["b"].numpy(), {"l2": l2, "cv_log_loss": losses}


def fit_on_groups(groups: dict[str, np.ndarray], labels: np.ndarray, classes: int, seed: int) -> dict[str, Any]:
    """The cross-validated logistic regression on the group set of :data:`GROUP_SETS` whose best L2
    strength has the lowest cross-validated log-loss (the fullest set when a class has one shot: nothing
    to validate on). Returns ``names`` (the chosen groups), ``weights``, ``bias``, ``mean``, ``scale``
    and ``choice`` (L2, the losses, each set's best loss)."""
    single = np.bincount(labels, minlength=classes).min() < 2
    best, set_losses = None, {}
    for names in GROUP_SETS[:1] if single else GROUP_SETS:
        mean, scale = standardiser(groups, names)
        l2, losses = choose_l2(design_matrix(groups, mean, scale, names), labels, classes, seed)
        loss = min(losses.values()) if losses else float("nan")
        set_losses["+".join(names)] = loss
        if best is None or loss < best[0] - 1e-9:
            best = (loss, names, mean, scale, l2, losses)
    _, names, mean, scale, l2, losses = best
    params = fit_logistic(design_matrix(groups, mean, scale, names), labels, classes, l2)
    choice = {"l2": l2, "cv_log_loss": losses, "cv_log_loss_by_groups": set_losses}
    return {"names": list(names), "weights": params["W"].numpy(), "bias": params["b"].numpy(), "mean": mean,
            "scale": scale, "choice": choice}  # fmt: skip


class DefectTypeHead:
    """A defect-type classifier over anomaly-map statistics and patch features (see the module)."""

    def __init__(self, detector: AnomalyDetector, classes: list[str], arrays: dict[str, np.ndarray],
                 config: dict[str, Any]):  # fmt: skip
        self.detector = detector
        self.classes = list(classes)
        self.arrays = {name: np.ascontiguousarray(value, np.float32) for name, value in arrays.items()}
        self.config = dict(config)

    @property
    def model_id(self) -> str:
        return self.detector.model_id

    @property
    def map_size(self) -> int:
        """The working size parts are encoded at (the detector's)."""
        return self.detector.map_size

    def check_model(self, model_id: str) -> None:
        check_model_id(self.model_id, model_id, "this defect-type head was fitted")

    @classmethod
    def fit(cls, detector: AnomalyDetector, patches: DensePatches, labels: Sequence[int], classes: Sequence[str],
            seed: int = 0) -> "DefectTypeHead":  # fmt: skip
        """Fit on encoded labelled parts (``labels[i]`` indexes ``classes``)."""
        check_type_detector(detector)
        labels = np.asarray(labels, np.int64)
        groups = type_features(detector, patches)
        fitted = fit_on_groups(groups, labels, len(classes), seed)
        arrays = {"weights": fitted["weights"], "bias": fitted["bias"], "feature_mean": fitted["mean"],
                  "feature_scale": fitted["scale"]}  # fmt: skip
        config = {"groups": {name: int(groups[name].shape[1]) for name in fitted["names"]}, "seed": seed,
                  "shots": {name: int((labels == i).sum()) for i, name in enumerate(classes)}, **fitted["choice"]}  # fmt: skip
        return cls(detector, list(classes), arrays, config)

    @property
    def groups(self) -> list[str]:
        """The feature groups the head reads (in :data:`GROUPS` order)."""
        return [name for name in GROUPS if name in self.config["groups"]]

    def logits(self, patches: DensePatches) -> np.ndarray:
        """``(n, classes)`` logits of encoded parts."""
        x = design_matrix(type_features(self.detector, patches), self.arrays["feature_mean"], self.arrays["feature_scale"],
                          self.groups)  # fmt: skip
        return (x @ self.arrays["weights"].T.astype(np.float64) + self.arrays["bias"]).astype(np.float32)

    def probabilities(self, patches: DensePatches) -> np.ndarray:
        logits = self.logits(patches).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def metadata(self) -> dict[str, Any]:
        return {"format": DEFECT_TYPES_FORMAT, "model_id": self.model_id, "classes": self.classes,
                "config": self.config, "detector": self.detector.config}  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """Write the head (with its detector) to ``path`` (``.safetensors`` added if missing), atomically."""
        arrays = dict(self.arrays)
        arrays.update({f"detector.{name}": value for name, value in self.detector.arrays.items()})
        return write_artifact(path, arrays, self.metadata(), "defect-type head")


def fit_defect_types(encoder: Encoder, detector: AnomalyDetector, type_images: dict[str, Sequence],
                     seed: int = 0, progress=None) -> DefectTypeHead:  # fmt: skip
    """A :class:`DefectTypeHead` from ``{type: images}`` read with ``detector`` (fitted on good parts)."""
    detector.check_model(encoder.id)
    check_type_detector(detector)
    classes = list(type_images)
    images = [image for name in classes for image in type_images[name]]
    labels = [i for i, name in enumerate(classes) for _ in type_images[name]]
    patches = encode_dense(encoder, images, resolution=detector.map_size, progress=progress)
    return DefectTypeHead.fit(detector, patches, labels, classes, seed)


def load_defect_types(path: str | os.PathLike, model_id: str | None = None) -> DefectTypeHead:
    """A saved defect-type head, checked (its detector as a detector file of its own); with
    ``model_id`` given, refuse one fitted with another encoder. Anything wrong is one line."""
    meta = read_artifact_metadata(path, "defect-type head", "make one with 'clipxfer anomaly fit-types'")

    def bad(what: str) -> ClipxferError:
        return ClipxferError(f"{path}: damaged defect-type head: {what}; fit it again with 'clipxfer anomaly fit-types'")

    if meta.get("format") != DEFECT_TYPES_FORMAT:
        raise ClipxferError(f"{path}: not a clipxfer defect-type head (format {meta.get('format')!r}, "
                            f"expected {DEFECT_TYPES_FORMAT!r})")
    arrays = read_artifact_tensors(path, "defect-type head")
    own = {name: arrays.get(name) for name in ("weights", "bias", "feature_mean", "feature_scale")}
    detector_arrays = {key.removeprefix("detector."): value for key, value in arrays.items() if key.startswith("detector.")}
    detector = check_detector(f"{path} (its detector)", {"format": DETECTOR_FORMAT, "model_id": meta.get("model_id"),
                                                         "config": meta.get("detector")}, detector_arrays)  # fmt: skip
    check_type_detector(detector)
    classes, config = meta.get("classes"), meta.get("config")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes) \
            or len(set(classes)) < len(classes):  # fmt: skip
        raise bad(f"classes {classes!r} are not two or more distinct names")
    if not isinstance(config, dict) or not isinstance(config.get("groups"), dict) or not config["groups"] \
            or not set(config["groups"]) <= set(GROUPS):  # fmt: skip
        raise bad("config does not name its feature groups")
    width = config["groups"]
    if not all(isinstance(width[name], int) and width[name] > 0 for name in width):
        raise bad(f"feature group widths {width!r} are not positive whole numbers")
    features = sum(width.values())
    shapes = {"weights": (len(classes), features), "bias": (len(classes),), "feature_mean": (features,),
              "feature_scale": (features,)}  # fmt: skip
    for name, shape in shapes.items():
        array = own[name]
        if array is None or array.shape != shape:
            raise bad(f"array '{name}' is missing or not of shape {shape}")
        if not np.isfinite(array).all():
            raise bad(f"array '{name}' holds values that are not finite numbers")
    if not (own["feature_scale"] > 0).all():
        raise bad("array 'feature_scale' holds values that are not positive")
    stats = sum(1 + (3 + len(PERCENTILES)) * (member in MAP_MEMBERS) for member in detector.members)
    if "map_stats" in width and width["map_stats"] != stats:
        raise bad(f"{width['map_stats']} map statistics, its detector's members give {stats}")
    patch_widths = {width[name] for name in GROUPS[1:] if name in width}
    if "memory_bank" in detector.arrays and patch_widths - {detector.arrays["memory_bank"].shape[1]}:
        raise bad("patch feature groups are not as wide as its detector's patches")
    head = DefectTypeHead(detector, classes, own, config)
    if model_id is not None:
        head.check_model(model_id)
    return head


def classify_folder(head: DefectTypeHead, encoder: Encoder, folder: str | os.PathLike,
                    progress: bool = False) -> tuple[list[dict], dict | None]:  # fmt: skip
    """Rows ``{path, type, probability[, label]}`` for the images below ``folder``, and, when its
    subfolders are named after the head's types (a labelled folder), accuracy overall and per type."""
    from .detector import progress_bar

    head.check_model(encoder.id)
    root = Path(folder)
    subfolders = [entry.name for entry in sorted(root.iterdir()) if entry.is_dir()]
    labelled = bool(subfolders) and set(subfolders) <= set(head.classes)
    paths = list(find_images(root))
    if not paths:
        raise ClipxferError(f"{root}: no images found")
    bar = progress_bar(len(paths), progress)
    patches = encode_dense(encoder, paths, resolution=head.map_size, progress=bar.update if bar else None)
    if bar:
        bar.close()
    probabilities = head.probabilities(patches)
    chosen = probabilities.argmax(axis=1)
    rows = [{"path": str(path), "type": head.classes[row], "probability": round(float(probabilities[i, row]), 6)}
            for i, (path, row) in enumerate(zip(paths, chosen))]  # fmt: skip
    if not labelled:
        return rows, None
    for row, path in zip(rows, paths):
        row["label"] = path.relative_to(root).parts[0]
    truth = np.array([row["label"] for row in rows])
    predicted = np.array([row["type"] for row in rows])
    per_type = {name: round(float((predicted[truth == name] == name).mean()), 6)
                for name in head.classes if (truth == name).any()}  # fmt: skip
    return rows, {"n": len(rows), "accuracy": round(float((predicted == truth).mean()), 6), "per_type_accuracy": per_type}
