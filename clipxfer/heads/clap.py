"""CLAP (Silva-Rodriguez, Hajimiri, Ben Ayed, Dolz; CVPR 2024): a linear probe in the shared
image-text space, initialised at the zero-shot class weights and held near them by one penalty per
class, set from the support set so that no validation search is needed.

    logits = logit_scale * embeddings @ normalize(W).T
    loss   = CE(logits, y) + mean_c lambda_c * ||W_c - T_c||^2

``T`` are the zero-shot class weights (``W`` starts there). ``lambda_c`` is the augmented-Lagrangian
multiplier's initial value of the reference: the zero-shot head's mean softmax probability of class
``c`` over the shots of class ``c``. A class the text already recognises is held close to its prompt;
one it gets wrong is free to move. Training is the reference's: SGD with momentum 0.9, learning
rate 0.1 on a cosine schedule, 300 epochs, here full-batch on the cached embeddings. The fitted head
stores ``logit_scale * normalize(W)`` as a linear head. What differs from the authors' code is in
docs/methods.md.
"""

from __future__ import annotations

import math

import numpy as np
from threadpoolctl import threadpool_limits

from ..errors import ClipxferError
from .base import FewShotData, fit_provenance, register_head, softmax
from .linear import LinearHead, val_score

DEFAULT_EPOCHS = 300
DEFAULT_LR = 0.1
MOMENTUM = 0.9


def class_penalties(zeroshot_logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``lambda_c``: the mean zero-shot probability of the true class over the shots of class ``c``
    (a class without shots gets 1, the strongest pull to its prompt)."""
    probs = softmax(np.asarray(zeroshot_logits, dtype=np.float64))
    own = probs[np.arange(len(labels)), labels]
    sums = np.bincount(labels, weights=own, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def clap_loss_and_gradient(
    weight: np.ndarray, embeddings: np.ndarray, labels: np.ndarray, anchor: np.ndarray, logit_scale: float,
    penalties: np.ndarray,
) -> tuple[float, np.ndarray]:
    """The CLAP objective at ``weight`` and its gradient (through the row normalisation)."""
    from .lpp import softmax_gradient

    norms = np.maximum(np.linalg.norm(weight, axis=1, keepdims=True), 1e-12)
    unit = weight / norms
    ce, grad_logits = softmax_gradient(logit_scale * embeddings @ unit.T, labels)
    grad_unit = logit_scale * grad_logits.T @ embeddings
    grad = (grad_unit - unit * (grad_unit * unit).sum(axis=1, keepdims=True)) / norms
    drift = weight - anchor
    num_classes = len(weight)
    penalty = float((penalties * (drift**2).sum(axis=1)).mean())
    grad += 2.0 * penalties[:, None] * drift / num_classes
    return ce + penalty, grad


# Small matrices gain nothing from BLAS threads, and on a loaded machine two spinning threads
# made the loop 25x slower (26 s instead of 1 s for 160 x 1280 on 2 busy cores).
@threadpool_limits.wrap(limits=1, user_api="blas")
def fit_clap(
    embeddings: np.ndarray,
    labels: np.ndarray,
    text: np.ndarray,
    logit_scale: float,
    penalties: np.ndarray,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
) -> np.ndarray:
    """Minimise the CLAP objective (module docstring) from ``W = text`` with heavy-ball SGD
    (``v = 0.9 v + g; W -= lr_t v``, PyTorch's form) on a cosine schedule; returns ``W``
    (``(C, d)``, not normalised). Full batch, float64, deterministic."""
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    anchor = np.asarray(text, dtype=np.float64)
    lam = np.asarray(penalties, dtype=np.float64)
    weight = anchor.copy()
    velocity = np.zeros_like(weight)
    for epoch in range(epochs):
        step = 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))
        _, grad = clap_loss_and_gradient(weight, x, y, anchor, logit_scale, lam)
        velocity = MOMENTUM * velocity + grad
        weight = weight - step * velocity
    return weight


@register_head
class CLAPHead(LinearHead):
    """CLAP: a zero-shot-initialised, class-adaptively constrained linear probe; see the module docstring."""

    method = "clap"
    needs_validation = False  # settings come from the shots (module docstring)

    @classmethod
    def fit(cls, data: FewShotData, epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR) -> "CLAPHead":
        """Fit on ``data.train`` (penalties from the shots, no validation search); ``data.val`` is
        only scored, for the record."""
        if epochs < 1 or lr <= 0:
            raise ClipxferError(f"clap: --epochs must be >= 1 and --lr > 0 (got {epochs}, {lr})")
        zeroshot = data.zeroshot
        if "class_weights" not in zeroshot.weights or "logit_scale" not in zeroshot.config:
            raise ClipxferError(f"clap: the prior must be a zero-shot head, not a {zeroshot.method} head")
        text = zeroshot.weights["class_weights"].astype(np.float64)
        scale = float(zeroshot.config["logit_scale"])
        num_classes = len(data.classnames)
        penalties = class_penalties(zeroshot.logits(data.train), data.train_labels, num_classes)
        weight = fit_clap(data.train.embeddings, data.train_labels, text, scale, penalties, epochs, lr)
        unit = weight / np.maximum(np.linalg.norm(weight, axis=1, keepdims=True), 1e-12)
        config = {
            "variant": "clap",
            "epochs": int(epochs),
            "lr": float(lr),
            "logit_scale": scale,
            "penalties": [float(v) for v in penalties],
            "drift": float(np.linalg.norm(weight - text, axis=1).mean()),
            **fit_provenance(data),
        }
        head = cls(data.encoder.id, data.classnames, {"embedding_weights": scale * unit}, config)
        if len(data.val_labels):
            accuracy, neg_loss = val_score(head.logits(data.val), data.val_labels)
            head.config.update(val_accuracy=accuracy, val_loss=-neg_loss)
        return head
