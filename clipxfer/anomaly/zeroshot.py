"""Zero-shot anomaly scores from text: WinCLIP's compositional state prompts (Jeong et al., CVPR 2023).

A "normal" and an "anomalous" text vector are each the mean of many prompts (state words x
templates, WinCLIP's lists); a patch's anomaly score is the softmax probability of the anomalous
one given its joint-space embedding. Needs no image at all, only an encoder whose patches live in
the text space (open_clip ViTs).
"""

from __future__ import annotations

import numpy as np

from ..encoders import Encoder
from ..vector_math import l2_normalize

NORMAL_STATES = [
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
]  # fmt: skip
ANOMALOUS_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = [
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
]  # fmt: skip


def state_prompts(object_name: str, states: list[str]) -> list[str]:
    """Every template filled with every state of ``object_name``."""
    return [template.format(state.format(object_name)) for state in states for template in TEMPLATES]


def state_text_vectors(encoder: Encoder, object_name: str) -> np.ndarray:
    """``(2, dim)``: the normalised mean text embedding of the normal and of the anomalous prompts."""
    rows = [encoder.encode_texts(state_prompts(object_name, states)).mean(axis=0) for states in (NORMAL_STATES, ANOMALOUS_STATES)]
    return l2_normalize(np.stack(rows))


def anomalous_probability(embeddings: np.ndarray, states: np.ndarray, logit_scale: float) -> np.ndarray:
    """P(anomalous) per embedding (any leading shape, last axis ``dim``) against the ``(2, dim)`` states."""
    logits = logit_scale * (embeddings @ states.T)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights[..., 1] / weights.sum(axis=-1)
