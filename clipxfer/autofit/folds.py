"""Cross-validation folds over the labelled shots (training and validation images of a draw)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..datasets.features import take
from ..encoders.base import ImageEncoding
from ..errors import ClipxferError
from ..heads.base import FewShotData

DEFAULT_FOLDS = 5


@dataclass
class Fold:
    """One fold: what the methods fit on (a FewShotData of the remaining shots) and the held-out rows."""

    data: FewShotData
    #: Rows of the pooled labelled set (training rows first, then validation rows) in ``data.train``,
    #: ``data.val`` and held out.
    train_rows: np.ndarray
    val_rows: np.ndarray
    heldout_rows: np.ndarray


def pooled(data: FewShotData) -> tuple[ImageEncoding, np.ndarray, np.ndarray]:
    """``(encoding, labels, is_val)`` of the training images followed by the validation images."""
    def stack(a, b):
        return np.concatenate([a, b]) if len(b) else a

    emb = stack(data.train.embeddings, data.val.embeddings)
    same = data.train.features is data.train.embeddings
    feats = emb if same else stack(data.train.features, data.val.features)
    labels = stack(data.train_labels, data.val_labels)
    is_val = np.r_[np.zeros(len(data.train_labels), bool), np.ones(len(data.val_labels), bool)]
    return ImageEncoding(emb, feats), labels, is_val


def fold_count(labels: np.ndarray, folds: int) -> int:
    """Stratified folds need every class in every fold: at most the smallest class's count. With
    few shots that is leave-one-out per class (each fold holds out one image of every class)."""
    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    if smallest < 2:
        raise ClipxferError("auto: cross-validation needs at least 2 labelled images per class "
                            "(shots + validation images); give more shots or pick a --method")
    return max(2, min(folds, smallest))


def make_folds(data: FewShotData, folds: int = DEFAULT_FOLDS, seed: int = 0) -> list[Fold]:
    """Stratified k-fold over the pooled labelled images. In each fold the remaining images of a
    class keep the draw's share of validation images, but at least one training image."""
    from sklearn.model_selection import StratifiedKFold

    encoding, labels, is_val = pooled(data)
    k = fold_count(labels, folds)
    result = []
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for rest, heldout in splitter.split(np.zeros(len(labels)), labels):
        train_rows, val_rows = [], []
        for c in np.unique(labels[rest]):
            members = rest[labels[rest] == c]
            members = np.r_[members[~is_val[members]], members[is_val[members]]]  # training images first
            wanted_val = int(is_val[labels == c].sum())
            n_val = min(wanted_val, len(members) - 1)
            train_rows.extend(members[: len(members) - n_val])
            val_rows.extend(members[len(members) - n_val:])
        train_rows, val_rows = np.sort(np.asarray(train_rows)), np.sort(np.asarray(val_rows, dtype=np.int64))
        fold_data = replace(
            data, train=take(encoding, train_rows), train_labels=labels[train_rows],
            val=take(encoding, val_rows), val_labels=labels[val_rows],
        )
        result.append(Fold(fold_data, train_rows, val_rows, np.asarray(heldout)))
    return result
