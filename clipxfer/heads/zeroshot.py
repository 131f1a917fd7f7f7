"""Zero-shot head: one text embedding per class, averaged over prompt templates."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..encoders.base import Encoder, ImageEncoding, l2_normalize
from .base import Head, register_head


def class_text_weights(encoder: Encoder, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """``(num_classes, dim)``: per class, the renormalised mean of its normalised prompt embeddings
    (CLIP's prompt ensembling; the same as open_clip's ``build_zero_shot_classifier``)."""
    prompts = [template.format(name) for name in classnames for template in templates]
    embeddings = encoder.encode_texts(prompts).reshape(len(classnames), len(templates), -1)
    return l2_normalize(embeddings.mean(axis=1))


@register_head
class ZeroShotHead(Head):
    """logits = logit_scale * embeddings @ class_weights.T"""

    method = "zeroshot"

    @property
    def class_weights(self) -> np.ndarray:
        return self.weights["class_weights"]

    def logits(self, encoding: ImageEncoding) -> np.ndarray:
        return self.config["logit_scale"] * encoding.embeddings @ self.class_weights.T


def fit_zeroshot(encoder: Encoder, classnames: Sequence[str], templates: Sequence[str]) -> ZeroShotHead:
    """Build the zero-shot head for ``classnames`` from prompt ``templates``."""
    weights = class_text_weights(encoder, classnames, templates)
    config = {"templates": list(templates), "logit_scale": encoder.logit_scale}
    return ZeroShotHead(encoder.id, list(classnames), {"class_weights": weights}, config)
