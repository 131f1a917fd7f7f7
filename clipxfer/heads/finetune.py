"""Fine-tuned head: a linear head (:mod:`clipxfer.heads.linear`) on an encoder whose image tower
was fine-tuned with it. The saved file is the adapter itself (the moved tensors ride along under
``encoder/`` or ``lora/``, see :mod:`clipxfer.encoders.adapter`), and the head's model id is the
adapted encoder's, so it only scores images that encoder produced.

Fitting it needs the images, not only their features, and trains the encoder: that lives with the
rest of fine-tuning, in :func:`clipxfer.finetune.fit_finetune_head`. This class is what loads and
applies the saved head.
"""

from __future__ import annotations

from .base import register_head
from .linear import LinearHead


@register_head
class FinetuneHead(LinearHead):
    """See the module docstring."""

    method = "finetune"
    #: Fitting changes the encoder: the caller passes images and re-encodes with ``head.encoder``
    #: (:func:`clipxfer.finetune.fit_finetune_head`).
    trains_encoder = True
