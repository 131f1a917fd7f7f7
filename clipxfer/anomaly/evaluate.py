"""Labelled test folders and detection metrics: image AUROC and AP, pixel AUROC and AUPRO (with
masks), the false-alarm and miss rates at the detector's threshold, and a ROC figure.

A labelled folder has ``good/`` and one folder per defect kind, optionally ``ground_truth/<kind>/``
(inside it, or beside it as in MVTec-AD's ``test/`` and ``ground_truth/``) with one mask per defect image (``<name>_mask.png`` as in MVTec-AD, or ``<name>.png``); a defect
image without a mask is left out of the pixel metrics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import ClipxferError
from ..images import find_images, open_image

GOOD = "good"
MASKS = "ground_truth"
#: AUPRO integrates the per-region overlap up to this false-positive rate (MVTec-AD's 0.3).
AUPRO_MAX_FPR = 0.3


@dataclass
class LabelledFolder:
    """Images of a labelled test folder: ``kinds[i]`` is ``good`` or the defect folder name."""

    root: Path
    paths: list[Path]
    kinds: list[str]
    masks: list[Path | None] = field(default_factory=list)

    @property
    def is_defect(self) -> np.ndarray:
        return np.array([kind != GOOD for kind in self.kinds])


def is_labelled_folder(root: str | os.PathLike) -> bool:
    """True when ``root`` has a ``good/`` folder and at least one other image folder."""
    root = Path(root)
    if not (root / GOOD).is_dir():
        return False
    return any(p.is_dir() and p.name not in (GOOD, MASKS) for p in root.iterdir())


def load_labelled_folder(root: str | os.PathLike, kinds: Sequence[str] | None = None) -> LabelledFolder:
    """Read ``good/`` and the defect folders of ``root`` (only ``kinds`` when given) with their masks."""
    root = Path(root)
    if not (root / GOOD).is_dir():
        raise ClipxferError(f"{root}: a labelled test folder needs a '{GOOD}/' subfolder and one per defect kind")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in (GOOD, MASKS))
    if kinds is not None:
        missing = sorted(set(kinds) - set(folders))
        if missing:
            raise ClipxferError(f"{root}: no defect folder(s) {', '.join(missing)} (found: {', '.join(folders)})")
        folders = [k for k in folders if k in kinds]
    paths, labels, masks = [], [], []
    for kind in [GOOD, *folders]:
        for path in find_images(root / kind):
            paths.append(path)
            labels.append(kind)
            masks.append(None if kind == GOOD else _mask_path(root, kind, path))
    if labels.count(GOOD) == 0 or len(labels) == labels.count(GOOD):
        raise ClipxferError(f"{root}: need images in '{GOOD}/' and in at least one defect folder")
    return LabelledFolder(root, paths, labels, masks)


def _mask_path(root: Path, kind: str, image: Path) -> Path | None:
    """The mask of a defect image: in ``root/ground_truth/`` or, as in MVTec-AD where ``root`` is a
    category's ``test/``, in the ``ground_truth/`` beside it."""
    relative = image.relative_to(root / kind).parent
    for base in (root / MASKS, root.parent / MASKS):
        for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
            if (base / kind / relative / name).is_file():
                return base / kind / relative / name
    return None


def read_mask(path: Path | None, size: int) -> np.ndarray:
    """A ``(size, size)`` boolean mask (nearest resize, like the squashed model input); no mask = all False."""
    if path is None:
        return np.zeros((size, size), bool)
    mask = open_image(path).convert("L").resize((size, size), Image.NEAREST)
    return np.asarray(mask) > 127


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = AUPRO_MAX_FPR, steps: int = 300) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, normalised to [0, 1] (Bergmann et
    al., MVTec-AD): each connected defect region counts equally, whatever its size."""
    from scipy.ndimage import label

    good_pixels = maps[~masks]
    regions = []
    for image_map, mask in zip(maps, masks):
        labelled, count = label(mask)
        regions.extend(np.sort(image_map[labelled == number]) for number in range(1, count + 1))
    if not regions or good_pixels.size == 0:
        return float("nan")
    # Thresholds spaced by the false-positive rate they give, from the top of the good pixels down.
    good_sorted = np.sort(good_pixels)
    fpr_targets = np.linspace(0, max_fpr, steps)
    thresholds = np.quantile(good_sorted, 1 - fpr_targets)
    fpr = 1 - np.searchsorted(good_sorted, thresholds, side="right") / good_sorted.size
    pro = np.mean([1 - np.searchsorted(r, thresholds, side="right") / r.size for r in regions], axis=0)
    fpr = np.clip(fpr, 0, max_fpr)
    integrate = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz
    return float(integrate(pro, fpr) / max_fpr)


def _number(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 6)


def detection_metrics(
    scores: np.ndarray,
    is_defect: np.ndarray,
    threshold: float,
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
) -> dict:
    """Image AUROC/AP, rates at ``threshold`` and, with pixel ``maps`` and boolean ``masks``
    (``(n, s, s)``, masks of good images all False), pixel AUROC and AUPRO."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores, is_defect = np.asarray(scores, np.float64), np.asarray(is_defect, bool)
    flagged = scores > threshold
    result = {
        "n_good": int((~is_defect).sum()),
        "n_defect": int(is_defect.sum()),
        "image_auroc": _number(roc_auc_score(is_defect, scores)),
        "image_ap": _number(average_precision_score(is_defect, scores)),
        "threshold": _number(threshold),
        "false_alarm_rate": _number(flagged[~is_defect].mean()),
        "miss_rate": _number((~flagged[is_defect]).mean()),
        "pixel_auroc": None,
        "aupro": None,
    }
    if maps is not None and masks is not None and masks.any():
        result["pixel_auroc"] = _number(roc_auc_score(masks.ravel(), maps.ravel()))
        result["aupro"] = _number(aupro(maps, masks))
    return result


def plot_roc(scores: np.ndarray, is_defect: np.ndarray, threshold: float, path: str | os.PathLike, title: str = "") -> Path:
    """Image-level ROC curve with the detector's operating point marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    path = Path(path)
    fpr, tpr, _ = roc_curve(is_defect, scores)
    figure = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(fpr, tpr, label=f"AUROC {roc_auc_score(is_defect, scores):.3f}")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    flagged = np.asarray(scores) > threshold
    point = (flagged[~is_defect].mean(), flagged[is_defect].mean())
    axes.plot(*point, "o", color="red", label=f"threshold: false alarms {point[0]:.1%}, detected {point[1]:.1%}")
    axes.set_xlabel("false-alarm rate (good flagged)")
    axes.set_ylabel("detection rate (defects flagged)")
    axes.set_title(title or "image-level ROC")
    axes.legend(loc="lower right", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path
