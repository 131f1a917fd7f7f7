"""Multi-label few-shot transfer on mosaics of real images (:mod:`clipxfer.datasets.mosaic`):
zero-shot scores against a per-label sigmoid probe fitted on ``shots x classes`` labelled mosaics,
both scored by mAP, per-label AP and micro/macro F1 (thresholds per label chosen on validation
mosaics), on test mosaics built from held-out images only."""

from __future__ import annotations

import os
from typing import Any

from ..datasets.labelled import LabelledImages, load_dataset
from ..datasets.mosaic import make_mosaics
from ..datasets.prompts import load_templates
from ..datasets.splits import held_out_test
from ..encoders.base import Encoder
from ..errors import ClipxferError
from ..heads.multilabel import MultiLabelProbeHead, best_thresholds, zeroshot_scores
from ..heads.zeroshot import fit_zeroshot
from ..metrics import multilabel_report

#: Validation mosaics per class (they choose the L2 strength and the thresholds).
VAL_PER_CLASS = 4


def run_multilabel_mosaics(
    data: str | os.PathLike | LabelledImages,
    shots: int,
    seed: int = 0,
    model: str | None = None,
    encoder: Encoder | None = None,
    test_count: int = 500,
    grid: int = 2,
    max_classes: int = 3,
    templates: str = "simple",
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Build seeded mosaics of ``data`` (train and validation mosaics from its training pool, test
    mosaics from its held-out test images), fit the multi-label probe on ``shots x classes``
    training mosaics and report zero-shot and probe (``zeroshot``, ``probe``: each
    :func:`~clipxfer.metrics.multilabel_report`). ``out``: save the head there."""
    if shots < 1:
        raise ClipxferError(f"--shots must be at least 1, not {shots}")
    dataset = data if isinstance(data, LabelledImages) else load_dataset(data)
    if encoder is None:
        from ..encoders import load_encoder

        encoder = load_encoder(model)
    pool, test_pool = held_out_test(dataset)
    num_classes = len(dataset.classnames)
    train = make_mosaics(dataset, shots * num_classes, seed, pool, grid, max_classes)
    val = make_mosaics(dataset, VAL_PER_CLASS * num_classes, seed + 10_000, pool, grid, max_classes)
    test = make_mosaics(dataset, test_count, 999_983, test_pool, grid, max_classes)  # one test set for every seed
    encoded = {name: encoder.embed_images(part.images) for name, part in (("train", train), ("val", val), ("test", test))}
    zeroshot = fit_zeroshot(encoder, dataset.classnames, load_templates(templates))
    zs_thresholds = best_thresholds(val.targets, zeroshot_scores(zeroshot, encoded["val"]))
    zs_test = zeroshot_scores(zeroshot, encoded["test"])
    head = MultiLabelProbeHead.fit_multilabel(encoder.id, list(dataset.classnames), encoded["train"], train.targets,
                                              encoded["val"], val.targets)
    result = {
        "dataset": train.name, "shots": shots, "seed": seed, "model": encoder.id, "num_train": len(train),
        "num_val": len(val), "num_test": len(test),
        "zeroshot": multilabel_report(test.targets, zs_test, dataset.classnames, zs_test >= zs_thresholds),
        "probe": multilabel_report(test.targets, head.predict_proba(encoded["test"]), dataset.classnames,
                                   head.predict(encoded["test"])),
        "head": None,
    }
    if out is not None:
        result["head"] = str(head.save(out))
    return result
