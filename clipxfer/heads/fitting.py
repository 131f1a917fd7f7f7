"""One entry point that fits any few-shot method by name (:func:`fit_head`), used by the training
commands, the benchmark and the heads that wrap another head (TransCLIP)."""

from __future__ import annotations

from ..errors import ClipxferError
from .base import HEAD_TYPES, FewShotData, Head

#: Few-shot methods the commands train (``zeroshot`` is the baseline every run also scores).
FEW_SHOT_METHODS = ("probe", "tip", "coop", "mix", "lpp", "clap")


def fit_head(method: str, data: FewShotData, **options) -> Head:
    """Fit few-shot ``method`` (probe, tip, coop, mix; or zeroshot) on ``data``. Option ``init``:
    a meta-trained head (``clipxfer meta-train``) to start from (see :func:`clipxfer.heads.metalearned.fit_with_init`)."""
    if method == "zeroshot":
        return data.zeroshot
    needs_validation = getattr(HEAD_TYPES.get(method), "needs_validation", True)
    if needs_validation and len(data.train_labels) and not len(data.val_labels):
        raise ClipxferError(
            f"{method}: no validation images to choose its settings on (every class has a single training "
            "image); give at least two images per class, or a 'val' split in the manifest"
        )
    init = options.pop("init", None)
    if init is not None:
        from .metalearned import fit_with_init

        return fit_with_init(method, data, init, **options)
    if method not in HEAD_TYPES or not hasattr(HEAD_TYPES[method], "fit"):
        raise ClipxferError(f"unknown method '{method}': use one of {', '.join(FEW_SHOT_METHODS)}")
    return HEAD_TYPES[method].fit(data, **options)
