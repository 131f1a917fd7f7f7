"""The model being fine-tuned, in torch: a trainable float32 working copy of the encoder, the head's
logits on its raw outputs, scoring a labelled set, and the adapted copy the adapter tensors give."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.adapter import apply_tensors, run_in_torch, trainable_root
from ..encoders.base import Encoder
from ..heads.linear import cross_entropy


def working_copy(encoder: Encoder) -> tuple[Encoder, str, torch.nn.Module]:
    """A float32 copy of ``encoder`` whose image tower can be trained; ``encoder`` is untouched."""
    attribute, root = trainable_root(encoder)
    # The original's compiled runtime holds the original weights; the working copy's must be seen.
    work = run_in_torch(copy.copy(encoder))
    module = copy.deepcopy(root).float().eval()
    setattr(work, attribute, module)
    work.dtype = torch.float32
    work.precision = "fp32"
    for param in module.parameters():
        param.requires_grad_(False)
    return work, attribute, module


def adapted_copy(encoder: Encoder, tensors: dict[str, np.ndarray], model_id: str) -> Encoder:
    """A copy of ``encoder`` (same device and precision) with the adapter tensors applied."""
    attribute, root = trainable_root(encoder)
    adapted = copy.copy(encoder)
    setattr(adapted, attribute, copy.deepcopy(root))
    apply_tensors(adapted, tensors)
    adapted.id = model_id
    return adapted


def head_logits(head: dict[str, torch.Tensor], embeddings: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
    """:func:`clipxfer.heads.linear.linear_logits` in torch, on raw tower outputs."""
    embeddings = F.normalize(embeddings.float(), dim=-1)
    features = embeddings if features is None else F.normalize(features.float(), dim=-1)
    logits = 0
    if "embedding_weights" in head:
        logits = logits + embeddings @ head["embedding_weights"].T
    if "feature_weights" in head:
        logits = logits + features @ head["feature_weights"].T
    if "bias" in head:
        logits = logits + head["bias"]
    return logits


def forward_logits(work: Encoder, head: dict[str, torch.Tensor], pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Class logits of a uint8 batch through the working tower and head."""
    embeddings, features = work._forward_images(work.pixels_to_tensor(pixels))
    return head_logits(head, embeddings, features)


@torch.no_grad()
def evaluate(work: Encoder, head: dict[str, torch.Tensor], pixels: np.ndarray, labels: np.ndarray,
             batch_size: int = 64) -> tuple[float, float]:
    """``(accuracy, cross-entropy)`` on a labelled uint8 set."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    logits = torch.cat([forward_logits(work, head, pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)])
    logits = logits.numpy().astype(np.float64)
    return float((logits.argmax(1) == labels).mean()), cross_entropy(logits, labels)
