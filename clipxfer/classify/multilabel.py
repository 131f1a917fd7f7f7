"""Zero-shot multi-label classification (``clipxfer classify --multi-label``): every label whose
per-label sigmoid of the text scores reaches a threshold
(:func:`~clipxfer.heads.multilabel.zeroshot_label_probabilities`; 0.5 = more likely than the uniform guess)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..datasets.labelled import LABEL_SEPARATOR
from ..errors import ClipxferError
from ..heads.multilabel import uniform_odds
from ..metrics import multilabel_report
from ..paths import path_text
from .run import Classification

#: The default per-label threshold: a label is kept when it is more likely than 1/C.
DEFAULT_THRESHOLD = 0.5


@dataclass
class MultiLabelClassification:
    """A zero-shot classification read per label: ``probs`` ``(n, C)`` are per-label probabilities
    (not summing to one); an image has every label at or above ``threshold``. A labelled source
    (class folders) is scored as single-label sets: ``report`` is
    :func:`~clipxfer.metrics.multilabel_report` (mAP, per-label AP, micro/macro F1)."""

    source: str
    paths: list[str]
    classnames: list[str]
    probs: np.ndarray
    threshold: float
    model: str
    labels: np.ndarray | None = None
    report: dict | None = None

    def decisions(self) -> np.ndarray:
        """0/1 per image and label."""
        return (self.probs >= self.threshold).astype(np.int64)

    def label_names(self) -> list[list[str]]:
        """The labels of each image."""
        return [[self.classnames[c] for c in np.flatnonzero(row)] for row in self.decisions()]

    def table(self) -> pd.DataFrame:
        """``path[, label], labels`` (``a|b``), then ``p:CLASS`` per label."""
        columns: dict[str, object] = {"path": [path_text(p) for p in self.paths]}
        if self.labels is not None:
            columns["label"] = [self.classnames[i] for i in self.labels]
        columns["labels"] = [LABEL_SEPARATOR.join(names) for names in self.label_names()]
        for c, name in enumerate(self.classnames):
            columns[f"p:{name}"] = self.probs[:, c].round(6)
        return pd.DataFrame(columns)

    def summary(self) -> dict:
        """The JSON object ``clipxfer classify --multi-label --json`` prints."""
        return {
            "source": self.source, "model": self.model, "classes": self.classnames, "multi_label": True,
            "threshold": self.threshold, "n": len(self.paths), "labelled": self.labels is not None,
            "report": self.report,
            "predictions": [{"path": path_text(path), "labels": names,
                             "probabilities": {n: round(float(p), 6) for n, p in zip(self.classnames, row)}}
                            for path, names, row in zip(self.paths, self.label_names(), self.probs)],
        }


def as_multilabel(result: Classification, threshold: float = DEFAULT_THRESHOLD) -> MultiLabelClassification:
    """``result`` (a zero-shot :class:`Classification`, not transductive) read per label: its softmax
    probabilities ``s`` become ``C s / (1 + C s)`` (the sigmoid of the text scores against the uniform
    guess), and a label is kept at or above ``threshold``."""
    if not 0 < threshold < 1:
        raise ClipxferError(f"--threshold must be between 0 and 1 (exclusive), not {threshold}")
    probs = uniform_odds(result.probs)
    report = None
    if result.labels is not None:
        targets = np.eye(len(result.classnames), dtype=np.int64)[result.labels]
        report = multilabel_report(targets, probs, result.classnames, probs >= threshold)
    return MultiLabelClassification(result.source, list(result.paths), list(result.classnames), probs, threshold,
                                    result.head.model_id, result.labels, report)
