"""A calibrated ensemble of heads: the weighted average of the members' temperature-scaled
probabilities,

    p(c | x) = sum_m w_m softmax(logits_m(x) / T_m)_c,        logits = log p

Each member's temperature ``T_m`` and the weights ``w_m`` (non-negative, summing to 1) are chosen by
whoever builds it, on predictions of images the members were not fitted on (``clipxfer fit`` uses
cross-validation folds: :mod:`clipxfer.autofit`). Temperature scaling puts members with different
logit scales (a probe, CLAP at scale 30, Tip-Adapter's cache) on one footing before averaging.

The file holds every member's arrays under ``m<i>.`` and, in the config, each member's method,
config, temperature and weight; members are any heads that score the same encoder's outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from ..encoders.base import ImageEncoding
from ..errors import ClipxferError
from .base import HEAD_TYPES, Head, register_head, softmax


def member_prefix(index: int) -> str:
    return f"m{index}."


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` minimising the cross-entropy of ``softmax(logits / T)`` (searched on a
    log scale, 1e-2 to 1e3)."""
    z = np.asarray(logits, dtype=np.float64)

    def loss(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        scaled = scaled - scaled.max(axis=1, keepdims=True)
        return float((np.log(np.exp(scaled).sum(axis=1)) - scaled[np.arange(len(labels)), labels]).mean())

    return float(np.exp(minimize_scalar(loss, bounds=(np.log(1e-2), np.log(1e3)), method="bounded").x))


def fit_weights(probabilities: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Simplex weights minimising the cross-entropy of ``sum_m w_m p_m`` (softmax-parametrised, L-BFGS)."""
    stacked = np.stack([np.asarray(p, dtype=np.float64)[np.arange(len(labels)), labels] for p in probabilities])

    def loss(theta: np.ndarray) -> float:
        weights = softmax(theta[None])[0]
        return float(-np.log(np.clip(weights @ stacked, 1e-12, None)).mean())

    theta = minimize(loss, np.zeros(len(probabilities)), method="L-BFGS-B").x
    weights = softmax(theta[None])[0]
    weights[weights < 1e-3] = 0.0  # members that add nothing are dropped from the file
    return weights / weights.sum()


@register_head
class EnsembleHead(Head):
    """See the module docstring. Config: ``members`` (method, config, temperature, weight each)."""

    method = "ensemble"
    required_config = ("members",)

    def __init__(self, model_id: str, classnames: list[str], weights: dict[str, np.ndarray], config: dict[str, Any]):
        super().__init__(model_id, classnames, weights, config)
        self.members: list[tuple[Head, float, float]] = []
        for index, member in enumerate(self.config.get("members") or []):
            if not isinstance(member, dict) or member.get("method") not in HEAD_TYPES or member["method"] == self.method:
                raise ClipxferError(f"ensemble head: member {index} has no known method ({member!r:.80})")
            prefix = member_prefix(index)
            arrays = {name[len(prefix):]: value for name, value in self.weights.items() if name.startswith(prefix)}
            head = HEAD_TYPES[member["method"]](model_id, classnames, arrays, member.get("config", {}))
            self.members.append((head, float(member.get("temperature", 1.0)), float(member.get("weight", 0.0))))

    @classmethod
    def combine(cls, heads: list[Head], temperatures: list[float], weights: list[float],
                config: dict[str, Any] | None = None) -> "EnsembleHead":
        """The ensemble of fitted ``heads`` (members with weight 0 are left out)."""
        kept = [(h, t, w) for h, t, w in zip(heads, temperatures, weights) if w > 0]
        if not kept:
            raise ClipxferError("ensemble: every member has weight 0")
        arrays, members = {}, []
        for index, (head, temperature, weight) in enumerate(kept):
            arrays.update({member_prefix(index) + name: value for name, value in head.weights.items()})
            members.append({"method": head.method, "config": head.config, "temperature": float(temperature),
                            "weight": float(weight)})
        first = kept[0][0]
        variant = "+".join(f"{h.config.get('variant', h.method)}:{w:.2f}" for h, _, w in kept)
        return cls(first.model_id, first.classnames, arrays,
                   {"variant": f"ensemble({variant})", **(config or {}), "members": members})

    def validate(self, where: str) -> None:
        super().validate(where)
        if not self.members:
            raise ClipxferError(f"{where}: ensemble head has no members")
        for head, temperature, weight in self.members:
            head.validate(where)
            if not (temperature > 0 and weight >= 0):
                raise ClipxferError(f"{where}: ensemble member {head.method} has temperature {temperature}, "
                                    f"weight {weight}")

    def logits(self, encoding: ImageEncoding) -> np.ndarray:
        total = sum(weight for _, _, weight in self.members) or 1.0
        mixed = sum(weight / total * softmax(head.logits(encoding).astype(np.float64) / temperature)
                    for head, temperature, weight in self.members)
        return np.log(np.clip(mixed, 1e-30, None)).astype(np.float32)
