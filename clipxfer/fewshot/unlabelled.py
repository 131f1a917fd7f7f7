"""Transductive adaptation end to end: labelled data (scored on its test split) + unlabelled
target images (a folder or an index) -> a :class:`~clipxfer.heads.transductive.TransductiveHead`
-> zero-shot and adapted accuracy on the same test set. ``clipxfer adapt`` is a thin layer over
:func:`run_adapt`."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..datasets.features import encode_folder
from ..datasets.labelled import LabelledImages
from ..datasets.splits import PARTITION_SEED, FewShotSplit, partition_train_test
from ..encoders.base import Encoder, ImageEncoding
from ..errors import ClipxferError
from ..heads.base import FewShotData
from ..heads.transductive import TransductiveHead
from .inputs import TrainingInputs
from .run import score_and_save
from .task import FewShotTask, encode_items, index_rows


def encode_unlabelled(
    encoder: Encoder,
    folder: str | os.PathLike | None = None,
    index_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> ImageEncoding:
    """The unlabelled target images: every image under ``folder`` (encoded once, cached) or every
    row of the index at ``index_path`` (no re-encoding; it must store probe features)."""
    if (folder is None) == (index_path is None):
        raise ClipxferError("adapt: give the unlabelled target images as --unlabelled DIR or --index PATH (one of them)")
    if index_path is not None:
        _, encoding = index_rows(index_path, encoder)
        if encoding.features.shape[1] != encoder.feature_dim:
            raise ClipxferError(
                f"{index_path} stores no probe features for {encoder.id}; pass the folder with --unlabelled instead"
            )
        if len(encoding.embeddings) == 0:
            raise ClipxferError(f"{index_path}: the index holds no images; adapt needs unlabelled target images")
        return encoding
    return encode_folder(encoder, folder, progress, why="adapt needs unlabelled target images")[1]  # type: ignore[arg-type]


def label_free_task(
    encoder: Encoder,
    dataset: LabelledImages,
    seed: int,
    templates: str | list[str] = "simple",
    max_test: int | None = None,
    progress: bool = False,
) -> FewShotTask:
    """The 0-shot task: no training or validation images, the dataset's test split (capped at
    ``max_test`` like :func:`~clipxfer.datasets.splits.draw_few_shot` does) and the zero-shot head."""
    from ..datasets.prompts import load_templates
    from ..heads.zeroshot import fit_zeroshot

    _, test = partition_train_test(dataset)
    if max_test is not None and len(test) > max_test:
        test = np.sort(np.random.default_rng(PARTITION_SEED).choice(test, size=max_test, replace=False))
    empty = np.zeros(0, dtype=np.int64)
    split = FewShotSplit(empty, empty, test, 0, seed)
    if len(test) == 0:
        raise ClipxferError(f"{dataset.name}: no test images to score on; give a 'test' split or more images")
    test_encoding = encode_items(encoder, dataset, test, None, progress)
    template_list = load_templates(templates) if isinstance(templates, str) else list(templates)
    zeroshot = fit_zeroshot(encoder, dataset.classnames, template_list)
    nothing = ImageEncoding(test_encoding.embeddings[:0], test_encoding.features[:0])
    data = FewShotData(
        encoder=encoder, classnames=list(dataset.classnames), train=nothing, train_labels=empty, val=nothing,
        val_labels=empty, zeroshot=zeroshot, shots=0, seed=seed, manifest_hash=split.manifest_hash(dataset),
    )  # fmt: skip
    return FewShotTask(dataset, split, data, test_encoding, dataset.labels[test])


def run_adapt(
    data: str | os.PathLike | LabelledImages,
    unlabelled: str | os.PathLike | None = None,
    index_path: str | os.PathLike | None = None,
    shots: int = 0,
    seed: int = 0,
    model: str | None = None,
    encoder: Encoder | None = None,
    out: str | os.PathLike | None = None,
    templates: str | list[str] = "simple",
    max_test: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    save: bool = True,
    progress: bool = False,
    force: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Adapt the zero-shot head of ``data``'s classes to the unlabelled images (``unlabelled``
    folder or ``index_path``), with ``shots`` labelled images per class (0: none), and score
    zero-shot and the adapted head on ``data``'s test split. Saves the head (and the drawn
    manifest next to it) unless ``save=False``. ``options`` go to :func:`fit_transductive`.
    The other parameters are the fields of :class:`~clipxfer.fewshot.inputs.TrainingInputs`, documented
    there, except ``index_path``: here it holds the unlabelled images, not features of ``data``.

    Returns the keys of :func:`clipxfer.fewshot.run_transfer` plus ``num_unlabelled``,
    ``iterations``, ``converged``, ``prior_weight``, ``kappa``.
    """
    if shots < 0:
        raise ClipxferError(f"--shots {shots}: give 0 (no labels) or more labelled images per class")
    inputs = TrainingInputs(
        data, shots, seed, model=model, encoder=encoder, out=out, templates=templates, max_test=max_test,
        device=device, precision=precision, save=save, progress=progress, force=force,
    )
    dataset, encoder = inputs.load()
    head_path = inputs.head_path("transductive", dataset)  # an existing file is refused before any work
    target = encode_unlabelled(encoder, unlabelled, index_path, progress)
    if shots == 0:
        task = label_free_task(encoder, dataset, seed, templates, max_test, progress)
    else:
        task = inputs.prepare_task(encoder, dataset)

    start = time.perf_counter()
    head = TransductiveHead.fit(task.data, unlabelled=target, **options)
    fit_seconds = time.perf_counter() - start
    result = score_and_save("transductive", head, task, encoder, fit_seconds, head_path, options)
    result.update(
        num_unlabelled=int(len(target.embeddings)),
        iterations=head.config["iterations"],
        converged=head.config["converged"],
        prior_weight=head.config["prior_weight"],
        kappa=head.config["kappa"],
    )
    return result
