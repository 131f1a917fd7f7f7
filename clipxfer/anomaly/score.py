"""Scoring a folder with a detector: image scores, decisions, heat-map overlays, and metrics when
the folder is labelled (``good/`` + defect folders, optional ``ground_truth/`` masks)."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..encoders import Encoder
from ..errors import ClipxferError, ImageDecodeError
from ..images import find_images
from .detector import AnomalyDetector, progress_bar
from .evaluate import (
    LabelledFolder,
    detection_metrics,
    is_labelled_folder,
    load_labelled_folder,
    plot_roc,
    read_mask,
)
from .heatmap import check_heatmap_folder, write_overlay
from .patches import DensePatches, encode_at_resolution, whole_image

BATCH_SIZE = 16


@dataclass
class FolderScores:
    """What :func:`score_folder` found. ``kinds`` (``good`` or a defect folder name) and
    ``metrics`` are set only for a labelled folder; ``heatmaps`` lists the overlays written."""

    root: Path
    paths: list[Path]
    scores: np.ndarray
    decisions: np.ndarray
    threshold: float
    kinds: list[str] | None = None
    metrics: dict | None = None
    heatmaps: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: False when the detector has no threshold: every decision is ``unknown``.
    calibrated: bool = True
    #: A routed detector (:mod:`.routing`): the part type each image went to and the routing margin.
    routes: list[tuple[str, float]] | None = None

    def rows(self) -> list[dict]:
        """One dict per image: path, score, decision (ok|defect, or unknown without a threshold)[, label]."""
        rows = []
        for i, path in enumerate(self.paths):
            decision = ("defect" if self.decisions[i] else "ok") if self.calibrated else "unknown"
            row = {"path": str(path), "score": round(float(self.scores[i]), 6), "decision": decision}
            if self.routes is not None:
                row["type"], row["route_margin"] = self.routes[i][0], round(float(self.routes[i][1]), 6)
            if self.kinds is not None:
                row["label"] = self.kinds[i]
            rows.append(row)
        return rows


def display_range(detector: AnomalyDetector, maps: np.ndarray) -> tuple[float, float]:
    """Colour range of the overlays: half the typical good score (blue) to the threshold (red);
    the batch's own range when the detector has no finite threshold."""
    median = detector.config.get("calibration_score_median")
    if math.isfinite(detector.threshold) and median is not None:
        return 0.5 * median, detector.threshold
    return float(maps.min()), float(maps.max())


def score_folder(
    detector: AnomalyDetector,
    encoder: Encoder,
    folder: str | os.PathLike,
    heatmaps: str | os.PathLike | None = None,
    roc: str | os.PathLike | None = None,
    progress: bool = False,
) -> FolderScores:
    """Score every image below ``folder``; unreadable files are skipped with a warning.

    A labelled folder is also evaluated (:func:`~clipxfer.anomaly.evaluate.detection_metrics`,
    pixel metrics when masks exist) and, with ``roc``, its ROC curve is drawn there. With
    ``heatmaps``, an overlay PNG per image is written under that folder, mirroring the layout and
    named after the whole file name (``part.jpg`` -> ``part.jpg.png``); a folder that would mix
    overlays with the images is refused before any work (:func:`~.heatmap.check_heatmap_folder`).
    """
    detector.check_model(encoder.id)
    root = Path(folder)
    if not root.is_dir():
        raise ClipxferError(f"{root}: not a folder of images")
    labelled = load_labelled_folder(root) if is_labelled_folder(root) else None
    paths = labelled.paths if labelled else list(find_images(root))
    if not paths:
        raise ClipxferError(f"{root}: no images found")
    targets = dict(zip(paths, check_heatmap_folder(heatmaps, root, paths))) if heatmaps is not None else {}
    if detector.config["input_size"] != encoder.input_size:
        raise ClipxferError(f"this detector was fitted at {detector.config['input_size']} px, the encoder takes "
                            f"{encoder.input_size} px: use the detector's own model")
    size = detector.map_size
    keep_maps = labelled is not None and any(m is not None for m in labelled.masks)
    kept, scores, maps, skipped, written = [], [], [], [], []
    routes = [] if hasattr(detector, "routes") else None
    bar = progress_bar(len(paths), progress)
    for start in range(0, len(paths), BATCH_SIZE):
        batch, pixels, sizes = _read_batch(paths[start : start + BATCH_SIZE], size, skipped)
        if batch:
            local, joint = encode_at_resolution(encoder, np.stack(pixels))
            patches = DensePatches(local, joint, sizes)
            result = detector.score(patches)
            if routes is not None:
                routes.extend(zip(*detector.routes(patches)))
            scores.append(result.scores)
            if keep_maps:
                maps.append(result.maps)
            if heatmaps is not None:
                low, high = display_range(detector, result.maps)
                for path, anomaly_map in zip(batch, result.maps):
                    written.append(write_overlay(path, anomaly_map, low, high, targets[path]))
            kept.extend(batch)
        if bar:
            bar.update(len(paths[start : start + BATCH_SIZE]))
    if bar:
        bar.close()
    if not kept:
        raise ClipxferError(f"{root}: none of the {len(paths)} images could be read")
    all_scores = np.concatenate(scores)
    out = FolderScores(root, kept, all_scores, detector.decide(all_scores), detector.threshold, heatmaps=written,
                       skipped=skipped, calibrated=detector.calibrated, routes=routes)
    if labelled is not None:
        _evaluate_labelled(out, labelled, maps, keep_maps, size, roc)
    elif roc is not None:
        raise ClipxferError(f"--roc needs a labelled folder ('good/' plus defect folders); {root} is not one")
    return out


def _read_batch(paths: list[Path], size: int, skipped: list[str]) -> tuple[list[Path], list[np.ndarray], list]:
    """The readable ``paths`` with their detector-sized pixels and original sizes; an unreadable
    file is added to ``skipped`` with a warning."""
    batch, pixels, sizes = [], [], []
    for path in paths:
        try:
            array, original = whole_image(path, size)
        except ImageDecodeError as exc:
            skipped.append(str(exc))
            print(f"warning: skipped {exc}", file=sys.stderr)
            continue
        batch.append(path)
        pixels.append(array)
        sizes.append(original)
    return batch, pixels, sizes


def _evaluate_labelled(out: FolderScores, labelled: LabelledFolder, maps: list[np.ndarray], keep_maps: bool, size: int,
                       roc: str | os.PathLike | None) -> None:
    """Set ``out.kinds`` and ``out.metrics`` from the labelled folder's truth (pixel metrics when
    ``keep_maps``: the folder has masks) and, with ``roc``, draw the image-level ROC there."""
    index = {path: i for i, path in enumerate(labelled.paths)}
    rows = [index[path] for path in out.paths]
    out.kinds = [labelled.kinds[i] for i in rows]
    is_defect = labelled.is_defect[rows]
    masks = np.stack([read_mask(labelled.masks[i], size) for i in rows]) if keep_maps else None
    # Pixel metrics over good images and defects with masks; a defect without one has no pixel truth.
    with_truth = np.array([not is_defect[j] or labelled.masks[i] is not None for j, i in enumerate(rows)])
    all_maps = np.concatenate(maps) if keep_maps else None
    out.metrics = detection_metrics(
        out.scores, is_defect, out.threshold,
        all_maps[with_truth] if keep_maps else None, masks[with_truth] if keep_maps else None,
    )  # fmt: skip
    out.metrics["per_kind_image_auroc"] = per_kind_auroc(out.scores, out.kinds)
    if roc is not None:
        plot_roc(out.scores, is_defect, out.threshold, roc, title=f"{out.root.name}: image-level ROC")


def per_kind_auroc(scores: np.ndarray, kinds: list[str]) -> dict[str, float]:
    """Image AUROC of each defect kind against the good images."""
    from sklearn.metrics import roc_auc_score

    kinds_array = np.asarray(kinds)
    good = kinds_array == "good"
    result = {}
    for kind in sorted(set(kinds) - {"good"}):
        chosen = good | (kinds_array == kind)
        result[kind] = round(float(roc_auc_score(kinds_array[chosen] == kind, scores[chosen])), 6)
    return result
