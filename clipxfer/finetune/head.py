"""Fitting the fine-tuning head: fine-tune the encoder's image tower with a linear head on the shots
and return both as one :class:`~clipxfer.heads.finetune.FinetuneHead` (the adapter file)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..encoders.ids import weights_id
from ..errors import ClipxferError
from ..heads.base import FewShotData, fit_provenance
from ..heads.finetune import FinetuneHead
from ..images import ImageLike
from .settings import make_settings, settings_dict
from .train import finetune_encoder


def fit_finetune_head(
    data: FewShotData,
    images: tuple[Sequence[ImageLike], Sequence[ImageLike]] | None,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    **settings: Any,
) -> FinetuneHead:
    """Fine-tune ``data.encoder`` on ``images = (train, val)`` (the images behind ``data.train`` and
    ``data.val``); ``settings`` are :class:`~clipxfer.finetune.settings.FinetuneSettings` fields. The
    head carries the adapted encoder as ``head.encoder`` so the caller can encode test images.
    ``on_epoch`` is called with each epoch's record (it may raise to stop the training)."""
    if images is None:
        raise ClipxferError("finetune needs the training and validation images, not only their features")
    result = finetune_encoder(data, images[0], images[1], make_settings(**settings), progress=progress,
                               on_epoch=on_epoch)
    config = {
        "variant": f"finetune-{result.settings.strategy}",
        "base_model_id": weights_id(data.encoder.id),
        **settings_dict(result.settings),
        **fit_provenance(data),
        "wise_alpha": result.alpha,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "interrupted": result.interrupted,
        "history": result.history,
        "val_accuracy": result.val_accuracy,
        "val_loss": result.val_loss,
    }
    head = FinetuneHead(result.encoder.id, data.classnames, result.tensors, config)
    head.encoder = result.encoder
    return head
