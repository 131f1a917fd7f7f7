"""The linear form shared by probe and mix heads, and the validation rule every method tunes by.

A linear head scores ``embeddings @ A.T + normalize(features) @ B.T + bias``: ``A`` acts on the
shared image-text space (where zero-shot and CoOp class weights live, logit scale folded in),
``B`` on the probe features (the 1280-d backbone for ``lite``, the same embeddings for CLIP
models). Any part may be absent. Because the form is linear, mixing two such heads in weight
space is the same as mixing their logits, which is what makes WiSE-FT mixing exact here.
"""

from __future__ import annotations

import numpy as np

from ..encoders.base import ImageEncoding
from ..vector_math import l2_normalize
from .base import Head

PARTS = ("embedding_weights", "feature_weights", "bias")


def probe_inputs(encoding: ImageEncoding) -> np.ndarray:
    """The rows a feature-side weight sees: L2-normalised features (scale-free, like CLIP's
    embeddings, so one regularisation grid fits every backbone)."""
    return l2_normalize(encoding.features)


def linear_logits(weights: dict[str, np.ndarray], encoding: ImageEncoding) -> np.ndarray:
    """``embeddings @ A.T + normalize(features) @ B.T + bias`` for the parts present."""
    num_classes = next(weights[name].shape[0] for name in PARTS if name in weights)
    out = np.zeros((len(encoding.embeddings), num_classes), np.float32)
    if "embedding_weights" in weights:
        out += encoding.embeddings @ weights["embedding_weights"].T
    if "feature_weights" in weights:
        out += probe_inputs(encoding) @ weights["feature_weights"].T
    if "bias" in weights:
        out += weights["bias"]
    return out


def zeroshot_parts(zeroshot: Head) -> dict[str, np.ndarray]:
    """A zero-shot (or CoOp) head as linear parts: ``A = logit_scale * class_weights``."""
    return {"embedding_weights": zeroshot.config["logit_scale"] * zeroshot.weights["class_weights"]}


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of integer ``labels`` under ``logits``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def val_score(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(accuracy, -cross_entropy)``: compare with ``max``. Validation sets hold 2-4 images per
    class, so accuracy ties are common; the loss breaks them toward the better calibrated choice."""
    return float((logits.argmax(axis=1) == labels).mean()), -cross_entropy(logits, labels)


class LinearHead(Head):
    """A head whose state is the linear parts above (see the module docstring)."""

    optional_tensors = {"embedding_weights": ("C", "E"), "feature_weights": ("C", "F"), "bias": ("C",)}

    def logits(self, encoding: ImageEncoding) -> np.ndarray:
        return linear_logits(self.weights, encoding)
