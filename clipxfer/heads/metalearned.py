"""Meta-learned heads: the artifact of ``clipxfer meta-train`` (:class:`MetaHead`) and any head
fitted on top of its feature adapter (:class:`MetaFeaturesHead`).

The adapter is residual on L2-normalised probe features, initialised at identity::

    adapt(x) = x + relu(x @ w1.T + b1) @ w2.T      (w2 = 0 at the start)

A :class:`MetaHead` classifies its base classes by nearest prototype (cosine, times ``scale``) in
adapted space, so it is a real, portable head; it also carries the meta-learned CoOp context
vectors (``ctx``) when they were trained. Training lives in :mod:`clipxfer.metalearn`; :func:`fit_with_init` fits any method from a meta head.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..encoders.base import ImageEncoding
from ..errors import ClipxferError
from ..vector_math import l2_normalize
from .base import HEAD_TYPES, FewShotData, Head, load_head, register_head

ADAPTER_KEYS = ("adapter.w1", "adapter.b1", "adapter.w2")


def apply_adapter(weights: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """``adapt(normalize(features))`` with the adapter arrays in ``weights`` (see the module docstring)."""
    x = l2_normalize(features)
    hidden = np.maximum(x @ weights["adapter.w1"].T + weights["adapter.b1"], 0.0)
    return (x + hidden @ weights["adapter.w2"].T).astype(np.float32)


def adapt_encoding(weights: dict[str, np.ndarray], encoding: ImageEncoding) -> ImageEncoding:
    """``encoding`` with adapted probe features; the shared-space embeddings (zero-shot, CoOp)
    stay as they are, also for CLIP models whose features are the embeddings."""
    return ImageEncoding(encoding.embeddings, apply_adapter(weights, encoding.features))


@register_head
class MetaHead(Head):
    """Nearest base-class prototype in meta-learned adapted space; see the module docstring.

    Weights: ``adapter.w1``, ``adapter.b1``, ``adapter.w2``, ``prototypes`` and optionally ``ctx``.
    Config: ``algo``, ``ways``, ``shots``, ``episodes``, ``scale`` and the other training settings.
    """

    method = "meta"
    required_tensors = {"adapter.w1": ("H", "F"), "adapter.b1": ("H",), "adapter.w2": ("F", "H"),
                        "prototypes": ("C", "F")}
    optional_tensors = {"ctx": None}
    required_config = ("scale",)

    @property
    def adapter(self) -> dict[str, np.ndarray]:
        return {key: self.weights[key] for key in ADAPTER_KEYS}

    def logits(self, encoding: ImageEncoding) -> np.ndarray:
        z = l2_normalize(apply_adapter(self.weights, encoding.features))
        return self.config["scale"] * z @ self.weights["prototypes"].T


@register_head
class MetaFeaturesHead(Head):
    """Any head fitted on meta-adapted features: ``inner.logits(adapt_encoding(encoding))``.

    Weights: the adapter (``adapter.*``) and the inner head's arrays under ``head.``; config:
    ``inner_method``, ``inner_config`` and ``init`` (what the meta head was).
    """

    method = "adapted"
    required_tensors = {"adapter.w1": ("H", "F"), "adapter.b1": ("H",), "adapter.w2": ("F", "H")}
    required_config = ("inner_method", "inner_config")

    def validate(self, where: str) -> None:
        """The adapter, then the inner head by its own method's rules."""
        super().validate(where)
        inner_method, inner_config = self.config["inner_method"], self.config["inner_config"]
        if inner_method not in HEAD_TYPES or inner_method == self.method or not isinstance(inner_config, dict):
            raise ClipxferError(f"{where}: adapted head with an unusable inner method {inner_method!r}")
        self.inner.validate(f"{where} (inner {inner_method} head)")

    @property
    def inner(self) -> Head:
        arrays = {key[len("head.") :]: value for key, value in self.weights.items() if key.startswith("head.")}
        return HEAD_TYPES[self.config["inner_method"]](self.model_id, self.classnames, arrays, self.config["inner_config"])

    def logits(self, encoding: ImageEncoding) -> np.ndarray:
        return self.inner.logits(adapt_encoding(self.weights, encoding))

    @classmethod
    def wrap(cls, adapter: dict[str, np.ndarray], inner: Head, init: dict[str, Any]) -> "MetaFeaturesHead":
        """``inner`` (fitted on adapted features) behind ``adapter``, as one head."""
        weights = {**{key: adapter[key] for key in ADAPTER_KEYS}, **{f"head.{k}": v for k, v in inner.weights.items()}}
        config = {
            "variant": f"meta-{inner.config.get('variant', inner.method)}",
            "inner_method": inner.method,
            "inner_config": inner.config,
            "init": init,
            **{k: inner.config[k] for k in ("shots", "seed", "manifest_hash", "val_accuracy") if k in inner.config},
        }
        return cls(inner.model_id, inner.classnames, weights, config)



def load_meta(init: str | os.PathLike | MetaHead, model_id: str) -> MetaHead:
    """A meta head from a file (checked against ``model_id``) or as given."""
    head = init if isinstance(init, Head) else load_head(init, model_id=model_id)
    if not isinstance(head, MetaHead):
        raise ClipxferError(f"{init}: a {head.method} head, not a meta-trained one (make it with 'clipxfer meta-train')")
    head.check_model(model_id)
    return head


def fit_with_init(method: str, data: FewShotData, init: str | os.PathLike | MetaHead, **options: Any) -> Head:
    """Fit ``method`` starting from a meta-trained head: ``coop`` starts from its context vectors;
    other methods fit on meta-adapted features and are saved behind the adapter
    (:class:`~clipxfer.heads.metalearned.MetaFeaturesHead`), so new images are adapted the same way."""
    meta = load_meta(init, data.encoder.id)
    source = {"path": str(init) if not isinstance(init, Head) else "", "algo": meta.config.get("algo"),
              "base_classes": meta.classnames}  # fmt: skip
    if method == "coop":
        if "ctx" not in meta.weights:
            raise ClipxferError(f"{init}: this meta head has no context vectors (meta-train with a text tower)")
        head = HEAD_TYPES["coop"].fit(data, ctx_init=meta.weights["ctx"], **options)
        head.config.update({"ctx_init": "meta", "init": source, "variant": "meta-coop"})
        return head
    adapter = meta.adapter
    adapted = FewShotData(
        encoder=data.encoder, classnames=data.classnames, train=adapt_encoding(adapter, data.train),
        train_labels=data.train_labels, val=adapt_encoding(adapter, data.val), val_labels=data.val_labels,
        zeroshot=data.zeroshot, shots=data.shots, seed=data.seed, manifest_hash=data.manifest_hash,
    )  # fmt: skip
    options = {k: adapt_encoding(adapter, v) if isinstance(v, ImageEncoding) else v for k, v in options.items()}
    inner = HEAD_TYPES[method].fit(adapted, **options)
    return MetaFeaturesHead.wrap(adapter, inner, source)
