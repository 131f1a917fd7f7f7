"""Figures written to files (PNG, SVG, PDF by extension), drawn without pyplot so no GUI backend
or global matplotlib state is involved."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ClipxferError


def plot_confusion_matrix(
    matrix: np.ndarray, classnames: Sequence[str], path: str | os.PathLike, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (each row: where that class's items went), counts in the cells
    when there are few classes. Returns the written path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    matrix = np.asarray(matrix, dtype=np.float64)
    k = len(classnames)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    side = min(4 + 0.45 * k, 30)
    figure = Figure(figsize=(side + 1.5, side))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(k)
    label_size = 9 if k <= 20 else max(3, 9 - k // 20)
    axes.set_xticks(ticks, labels=list(classnames), rotation=60, ha="right", fontsize=label_size)
    axes.set_yticks(ticks, labels=list(classnames), fontsize=label_size)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if title:
        axes.set_title(title)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    colour = "white" if share[i, j] > 0.5 else "black"
                    axes.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=7, color=colour)
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    except (OSError, ValueError) as exc:
        raise ClipxferError(f"{path}: cannot write the plot ({exc}); use a .png, .svg or .pdf path in a writable folder") from None
    return path
