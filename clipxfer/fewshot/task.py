"""A drawn few-shot task, encoded: labelled data -> K-shot draw -> features (from the index when the
images are indexed) -> the zero-shot head every method starts from."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..datasets.features import encode_dataset, take
from ..datasets.labelled import LabelledImages
from ..datasets.splits import FewShotSplit, draw_few_shot
from ..encoders.base import Encoder, ImageEncoding
from ..errors import ClipxferError
from ..heads.base import FewShotData


@dataclass
class FewShotTask:
    """A drawn few-shot problem, encoded: what a method fits on plus the test set it is scored on."""

    dataset: LabelledImages
    split: FewShotSplit
    data: FewShotData
    test: ImageEncoding
    test_labels: np.ndarray


def index_rows(index_path: str | os.PathLike, encoder: Encoder) -> tuple[dict[str, int], ImageEncoding]:
    """``({absolute path: row}, encoding)`` of an index made with ``encoder``'s model."""
    from ..index import Index

    index = Index.open(index_path)
    model_id = getattr(index, "model_id", None)
    if model_id is not None and model_id != encoder.id:
        raise ClipxferError(
            f"{index_path}: the index was built with model '{model_id}' but this run uses '{encoder.id}'; "
            "pass the same --model or leave out --index"
        )
    paths, encoding = index.load_encoding()
    return {str(Path(p).resolve()): i for i, p in enumerate(paths)}, encoding


def encode_items(
    encoder: Encoder,
    dataset: LabelledImages,
    indices: np.ndarray,
    index_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> ImageEncoding:
    """Embeddings and features of ``dataset`` items at ``indices``: rows of the index when the
    images are indexed (no re-encoding), else encoded once and cached on disk."""
    indices = np.asarray(indices, dtype=np.int64)
    subset = dataset.subset(indices)
    if index_path is None:
        return encode_dataset(encoder, subset, progress=progress)
    rows, stored = index_rows(index_path, encoder)
    if stored.features.shape[1] != encoder.feature_dim:
        # An index of a model with separate probe features (lite) that did not store them:
        # heads must see the same features at fit and predict time, so encode instead.
        print(f"warning: {index_path} stores no probe features for {encoder.id}; encoding the images instead",
              file=sys.stderr)
        return encode_dataset(encoder, subset, progress=progress)
    found = [rows.get(str(Path(s).resolve())) if isinstance(s, (str, os.PathLike)) else None for s in subset.sources]
    missing = [i for i, row in enumerate(found) if row is None]
    embeddings = np.zeros((len(subset), stored.embeddings.shape[1]), np.float32)
    features = np.zeros((len(subset), stored.features.shape[1]), np.float32)
    hit = [i for i, row in enumerate(found) if row is not None]
    if hit:
        embeddings[hit] = stored.embeddings[[found[i] for i in hit]]
        features[hit] = stored.features[[found[i] for i in hit]]
    if missing:
        print(f"warning: {len(missing)} of {len(subset)} images are not in the index {index_path}; encoding them",
              file=sys.stderr)
        extra = encode_dataset(encoder, subset.subset(missing), progress=progress)
        embeddings[missing] = extra.embeddings
        features[missing] = extra.features
    # CLIP models: one array serves as both (see ImageEncoding).
    return ImageEncoding(embeddings, embeddings if stored.features is stored.embeddings else features)


def check_split(dataset: LabelledImages, split: FewShotSplit) -> None:
    """Every class has a training image and the test set is not empty, or one clear error."""
    counts = np.bincount(dataset.labels[split.train], minlength=len(dataset.classnames))
    empty = [name for name, count in zip(dataset.classnames, counts) if count == 0]
    if empty:
        raise ClipxferError(
            f"{dataset.name}: class(es) {', '.join(empty[:5])} have no training images; add images or remove the class"
        )
    if len(split.test) == 0:
        raise ClipxferError(
            f"{dataset.name}: no test images left after drawing {split.shots} shots per class; "
            "add images or give a 'test' split"
        )


def prepare_task(
    encoder: Encoder,
    dataset: LabelledImages,
    shots: int,
    seed: int,
    templates: str | list[str] = "simple",
    index_path: str | os.PathLike | None = None,
    max_test: int | None = None,
    val_shots: int | None = None,
    progress: bool = False,
) -> FewShotTask:
    """Draw ``shots`` per class with ``seed``, encode train/val/test and build the zero-shot head."""
    from ..datasets.prompts import load_templates
    from ..heads.zeroshot import fit_zeroshot

    split = draw_few_shot(dataset, shots, seed, val_shots=val_shots, max_test=max_test)
    check_split(dataset, split)
    # The test set is encoded on its own so every seed and shot count reuses one cache entry.
    test = encode_items(encoder, dataset, split.test, index_path, progress)
    pool = np.concatenate([split.train, split.val])
    pooled = encode_items(encoder, dataset, pool, index_path, progress)
    train = take(pooled, np.arange(len(split.train)))
    val = take(pooled, np.arange(len(split.train), len(pool)))
    template_list = load_templates(templates) if isinstance(templates, str) else list(templates)
    zeroshot = fit_zeroshot(encoder, dataset.classnames, template_list)
    data = FewShotData(
        encoder=encoder,
        classnames=list(dataset.classnames),
        train=train,
        train_labels=dataset.labels[split.train],
        val=val,
        val_labels=dataset.labels[split.val],
        zeroshot=zeroshot,
        shots=shots,
        seed=seed,
        manifest_hash=split.manifest_hash(dataset),
    )
    return FewShotTask(dataset, split, data, test, dataset.labels[split.test])

