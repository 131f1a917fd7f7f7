"""CLAP (Silva-Rodriguez, Hajimiri, Ben Ayed, Dolz; CVPR 2024): a linear probe initialised at the
zero-shot class weights and held near them by one penalty per class, set from the support set so
that the penalties need no validation search.

    logits = scale * x @ normalize(W).T
    loss   = CE(logits, y) + mean_c lambda_c * ||W_c - A_c||^2

``W`` starts at the anchor ``A``. ``lambda_c`` is the reference's initial augmented-Lagrangian
multiplier: the zero-shot head's mean softmax probability of class ``c`` over the shots of class
``c``, with the zero-shot logits at the temperature that best explains the shots (see
:func:`fit_penalties`). A class the text already recognises is held close to its prompt; one it
gets wrong is free to move. Training is the reference's: SGD with momentum 0.9, learning rate 0.1
on a cosine schedule, 300 epochs, here full-batch on the cached embeddings.

Where the probe features are the shared embeddings (CLIP models), ``x`` are the embeddings, ``A``
the text weights and ``scale`` the model's logit scale: the reference exactly. Where they differ
(``lite``: 384-d ConSE embeddings, 1280-d backbone features), CLAP runs in the joint space
``x = [e, w f] / sqrt(1 + w^2)`` (``e`` the embedding, ``f`` the normalised probe feature, ``w`` one
of :data:`FEATURE_WEIGHTS` chosen by validation loss, :data:`FEATURE_WEIGHT` without validation
images) from ``A = [T, 0]``: it starts at zero-shot and may move into the features the probe uses. The fitted head stores the two halves as a linear head (``embedding_weights``,
``feature_weights``). Why and what else differs from the authors' code: docs/methods.md.
"""

from __future__ import annotations

import math

import numpy as np
from threadpoolctl import threadpool_limits

from ..encoders.base import ImageEncoding
from ..errors import ClipxferError
from ..vector_math import l2_normalize
from .base import FewShotData, fit_provenance, register_head, softmax
from .linear import LinearHead, probe_inputs, val_score
from .lpp import init_alpha

DEFAULT_EPOCHS = 300
DEFAULT_LR = 0.1
MOMENTUM = 0.9
#: Joint space only (separate probe features): weight of the feature half and the logit scale.
#: Chosen on held-out training-pool images of Fashion-MNIST, digits and MNIST-5k with lite (never
#: the test split); accuracy was flat within 0.01 over scale 20-50 and weight 2-3
#: (benchmarks/RESULTS.md, "CLAP in the joint space").
FEATURE_WEIGHT = 2.0
JOINT_SCALE = 30.0
#: The feature weights tried when validation images are given (the lowest validation loss wins).
#: A weak zero-shot prior (lite: 0.10-0.31) is worth less than the features: a higher weight shrinks
#: the text half's share of the unit rows, and CLAP then comes close to the probe (on MNIST-5k at
#: weight 2 it stayed 0.012 below it). :data:`FEATURE_WEIGHT` is used without validation images.
FEATURE_WEIGHTS = (2.0, 4.0, 8.0, 16.0)
SPACES = ("auto", "shared", "joint")
PENALTY_TEMPERATURES = ("fit", "model")


def class_penalties(zeroshot_logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``lambda_c``: the mean zero-shot probability of the true class over the shots of class ``c``
    (a class without shots gets 1, the strongest pull to its prompt)."""
    probs = softmax(np.asarray(zeroshot_logits, dtype=np.float64))
    own = probs[np.arange(len(labels)), labels]
    sums = np.bincount(labels, weights=own, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def fit_penalties(
    text_cosines: np.ndarray, labels: np.ndarray, num_classes: int, logit_scale: float, temperature: str = "fit"
) -> tuple[np.ndarray, float]:
    """``(lambda, scale)``: :func:`class_penalties` of the zero-shot logits ``scale * cosines``.
    ``temperature="model"``: the model's logit scale, as the reference (CLIP's 100 is roughly
    calibrated for CLIP). ``"fit"`` (default): the scale that minimises the shots' cross-entropy
    (:func:`~clipxfer.heads.lpp.init_alpha`). With ``lite``'s ConSE text weights the model's scale
    makes the softmax near one-hot, so ``lambda`` came out 0 or 1: on digits a class the prior
    predicts for every image got 1 though zero-shot is at chance. At the fitted scale a prior that
    knows nothing gives ``1 / C`` everywhere (scale 0) and the penalties stay small."""
    cosines = np.asarray(text_cosines, dtype=np.float64)
    scale = float(logit_scale) if temperature == "model" else init_alpha(cosines, labels, num_classes)
    return class_penalties(scale * cosines, labels, num_classes), scale


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


def has_own_features(encoding: ImageEncoding) -> bool:
    """Whether the probe features are not the shared embeddings themselves (``lite``, not CLIP)."""
    features, embeddings = encoding.features, encoding.embeddings
    if features is embeddings:
        return False
    return features.shape != embeddings.shape or not np.allclose(probe_inputs(encoding), embeddings, atol=1e-5)


def joint_inputs(encoding: ImageEncoding, feature_weight: float) -> np.ndarray:
    """``[e, w f] / sqrt(1 + w^2)``: unit rows in the joint space (module docstring)."""
    parts = [encoding.embeddings.astype(np.float64), feature_weight * probe_inputs(encoding).astype(np.float64)]
    return np.concatenate(parts, axis=1) / math.sqrt(1.0 + feature_weight**2)


@register_head
class CLAPHead(LinearHead):
    """CLAP: a zero-shot-initialised, class-adaptively constrained linear probe; see the module docstring."""

    method = "clap"
    needs_validation = False  # settings come from the shots (module docstring)

    @classmethod
    def fit(
        cls, data: FewShotData, epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR, space: str = "auto",
        penalty_temperature: str = "fit", feature_weight: float | None = None,
    ) -> "CLAPHead":
        """Fit on ``data.train`` (penalties from the shots, no validation search); ``data.val`` only
        chooses the joint space's feature weight and is scored for the record. ``space``: ``shared`` (the embeddings only), ``joint``
        (embeddings and probe features) or ``auto`` (joint when the encoder has its own probe
        features). ``penalty_temperature``: see :func:`fit_penalties`. ``feature_weight`` (joint space):
        fixed, or (default) the one of :data:`FEATURE_WEIGHTS` with the lowest validation loss
        (:data:`FEATURE_WEIGHT` without validation images)."""
        if feature_weight is not None and not feature_weight > 0:
            raise ClipxferError(f"clap: feature_weight must be positive, not {feature_weight}")
        if epochs < 1 or lr <= 0:
            raise ClipxferError(f"clap: --epochs must be >= 1 and --lr > 0 (got {epochs}, {lr})")
        if space not in SPACES:
            raise ClipxferError(f"clap: space must be one of {', '.join(SPACES)}, not {space!r}")
        if penalty_temperature not in PENALTY_TEMPERATURES:
            raise ClipxferError(f"clap: penalty_temperature must be one of {', '.join(PENALTY_TEMPERATURES)}, "
                                f"not {penalty_temperature!r}")
        zeroshot = data.zeroshot
        if "class_weights" not in zeroshot.weights or "logit_scale" not in zeroshot.config:
            raise ClipxferError(f"clap: the prior must be a zero-shot head, not a {zeroshot.method} head")
        text = zeroshot.weights["class_weights"].astype(np.float64)
        model_scale = float(zeroshot.config["logit_scale"])
        num_classes = len(data.classnames)
        cosines = data.train.embeddings.astype(np.float64) @ text.T
        penalties, penalty_scale = fit_penalties(cosines, data.train_labels, num_classes, model_scale,
                                                 penalty_temperature)
        joint = space == "joint" or (space == "auto" and has_own_features(data.train))
        weights_to_try = [None]
        if joint:
            given = feature_weight is not None
            weights_to_try = [float(feature_weight)] if given else list(FEATURE_WEIGHTS if len(data.val_labels)
                                                                          else (FEATURE_WEIGHT,))
        fits = []
        for weight_of_features in weights_to_try:
            weights, drift = cls._fit_space(data, text, model_scale, penalties, weight_of_features, epochs, lr)
            head = cls(data.encoder.id, data.classnames, weights, {})
            key = val_score(head.logits(data.val), data.val_labels) if len(data.val_labels) else (0.0, 0.0)
            # The lowest validation loss decides: accuracy on 2-4 images per class moves in coarse steps.
            fits.append(((key[1], key[0]), weight_of_features, head, drift))
        (neg_loss, accuracy), chosen, head, drift = max(fits, key=lambda f: f[0]) if len(fits) > 1 else fits[0]
        head.config = {
            "variant": "clap",
            "epochs": int(epochs),
            "lr": float(lr),
            "space": "joint" if joint else "shared",
            "logit_scale": JOINT_SCALE if joint else model_scale,
            "penalty_temperature": penalty_temperature,
            "penalty_scale": penalty_scale,
            "penalties": [float(v) for v in penalties],
            "drift": drift,
            **fit_provenance(data),
        }
        if joint:
            head.config["feature_weight"] = chosen
            head.config["feature_weight_chosen_on"] = "given" if feature_weight is not None else (
                "validation loss" if len(fits) > 1 else "default")
        if len(data.val_labels):
            head.config.update(val_accuracy=accuracy, val_loss=-neg_loss)
        return head

    @classmethod
    def _fit_space(
        cls, data: FewShotData, text: np.ndarray, model_scale: float, penalties: np.ndarray,
        feature_weight: float | None, epochs: int, lr: float,
    ) -> tuple[dict[str, np.ndarray], float]:
        """The linear parts and mean drift of one CLAP fit: in the joint space with ``feature_weight``,
        or in the shared space (``None``)."""
        num_classes = len(text)
        if feature_weight is not None:
            x = joint_inputs(data.train, feature_weight)
            anchor = np.concatenate([text, np.zeros((num_classes, x.shape[1] - text.shape[1]))], axis=1)
            scale = JOINT_SCALE
        else:
            x, anchor, scale = data.train.embeddings, text, model_scale
        weight = fit_clap(x, data.train_labels, anchor, scale, penalties, epochs, lr)
        unit = l2_normalize(weight, dtype=None)
        if feature_weight is not None:
            share = scale / math.sqrt(1.0 + feature_weight**2)
            width = text.shape[1]
            weights = {"embedding_weights": share * unit[:, :width],
                       "feature_weights": share * feature_weight * unit[:, width:]}
        else:
            weights = {"embedding_weights": scale * unit}
        return weights, float(np.linalg.norm(weight - anchor, axis=1).mean())
