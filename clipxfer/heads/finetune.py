"""Fine-tuned head: a linear head (:mod:`clipxfer.heads.linear`) on an encoder whose image tower
was fine-tuned with it. The saved file is the adapter itself (the moved tensors ride along under
``encoder/`` or ``lora/``, see :mod:`clipxfer.finetune.adapter`), and the head's model id is the
adapted encoder's, so it only scores images that encoder produced.

``fit`` needs the images, not only their features: callers pass ``images=(train, val)``; the
fitted head carries the adapted encoder as ``head.encoder`` so the caller can encode test images.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..images import ImageLike
from .base import FewShotData, fit_provenance, register_head
from .linear import LinearHead


@register_head
class FinetuneHead(LinearHead):
    """See the module docstring."""

    method = "finetune"
    #: Fitting changes the encoder: the caller passes images and re-encodes with ``head.encoder``.
    trains_encoder = True

    @classmethod
    def fit(cls, data: FewShotData, images: tuple[Sequence[ImageLike], Sequence[ImageLike]] | None = None,
            progress: bool = False, **settings: Any) -> "FinetuneHead":
        """Fine-tune ``data.encoder`` on ``images = (train, val)`` (the images behind ``data.train``
        and ``data.val``); ``settings`` are :class:`clipxfer.finetune.train.FinetuneSettings` fields."""
        from ..errors import ClipxferError
        from ..encoders.openvino_runtime import weights_id
        from ..finetune.train import finetune_encoder, make_settings, settings_dict

        if images is None:
            raise ClipxferError("finetune needs the training and validation images, not only their features")
        result = finetune_encoder(data, images[0], images[1], make_settings(**settings), progress=progress)
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
        head = cls(result.encoder.id, data.classnames, result.tensors, config)
        head.encoder = result.encoder
        return head
