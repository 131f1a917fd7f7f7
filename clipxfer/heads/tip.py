"""Tip-Adapter (Zhang et al., ECCV 2022): a key-value cache of the few-shot images added to the
zero-shot logits, training-free, and Tip-Adapter-F (``finetune=True``) whose keys are trained.

``logits = zeroshot_logits + alpha * exp(-beta * (1 - q @ keys.T)) @ values`` with ``q`` the
L2-normalised query features, ``keys`` the normalised few-shot features and ``values`` their
one-hot labels. ``alpha`` and ``beta`` are searched on the validation split only.

Keys are built from ``encoding.features`` by default (for CLIP the embeddings; for ``lite`` its
1280-d backbone, far more discriminative than its 384-d ConSE embeddings), while the zero-shot
term always uses the shared embeddings. Tip-Adapter-F in the paper trains the keys on augmented
views of the training images; clipxfer fits on cached features without augmentation, so each
training image is left out of its own cache entry while training (otherwise its key matches
itself exactly and the loss has nothing to teach).
"""

from __future__ import annotations

import numpy as np
import torch

from ..encoders.base import ImageEncoding
from ..errors import ClipxferError
from ..vector_math import l2_normalize
from .base import FewShotData, Head, fit_provenance, register_head
from .linear import val_score

#: Search grids (the paper searches beta in (0, 7] and alpha in (0, 3] for CLIP's scale of
#: zero-shot logits; alpha spans wider here because weaker encoders need the cache to dominate).
BETA_GRID = tuple(float(v) for v in np.linspace(0.5, 10.0, 20))
ALPHA_GRID = tuple(float(v) for v in np.geomspace(0.05, 100.0, 23))
KEY_SPACES = ("features", "embeddings")


def _queries(encoding: ImageEncoding, key_space: str) -> np.ndarray:
    return l2_normalize(encoding.features if key_space == "features" else encoding.embeddings)


def cache_affinity(queries: np.ndarray, keys: np.ndarray, values: np.ndarray, beta: float) -> np.ndarray:
    """``exp(-beta * (1 - queries @ keys.T)) @ values``: the cache's vote per class."""
    return np.exp(-beta * (1.0 - queries @ keys.T)) @ values


def search_alpha_beta(
    zs_logits: np.ndarray, queries: np.ndarray, keys: np.ndarray, values: np.ndarray, labels: np.ndarray
) -> tuple[float, float, tuple[float, float]]:
    """The (alpha, beta) of the grids that scores best on the validation rows given."""
    best = (-1.0, 0.0, (-np.inf, -np.inf))
    for beta in BETA_GRID:
        cache = cache_affinity(queries, keys, values, beta)
        for alpha in ALPHA_GRID:
            score = val_score(zs_logits + alpha * cache, labels)
            if score > best[2]:
                best = (alpha, beta, score)
    return best


def _train_keys(
    keys: np.ndarray,
    values: np.ndarray,
    train_queries: np.ndarray,
    train_zs: np.ndarray,
    train_labels: np.ndarray,
    val_queries: np.ndarray,
    val_zs: np.ndarray,
    val_labels: np.ndarray,
    alpha: float,
    beta: float,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> tuple[np.ndarray, int]:
    """AdamW on the cache keys (Tip-Adapter-F), cosine schedule, keeping the keys of the step
    that scores best on validation. Returns the keys and that step (0 = the initial keys)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.as_tensor(keys, dtype=torch.float32).clone())
    vals = torch.as_tensor(values, dtype=torch.float32)
    tq, tz = torch.as_tensor(train_queries), torch.as_tensor(train_zs, dtype=torch.float32)
    ty = torch.as_tensor(train_labels, dtype=torch.long)
    vq, vz = torch.as_tensor(val_queries), torch.as_tensor(val_zs, dtype=torch.float32)
    optimizer = torch.optim.AdamW([weight], lr=lr, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            logits = vz + alpha * torch.exp(-beta * (1 - vq @ weight.T)) @ vals
        return val_score(logits.numpy(), val_labels)

    best_keys, best_step, best_score = keys.copy(), 0, evaluate()
    n = len(tq)
    for step in range(1, steps + 1):
        batch = torch.randperm(n, generator=generator)[:batch_size]
        affinity = tq[batch] @ weight.T
        # The training images are the cache: hide each one's own entry (see the module docstring).
        own = torch.zeros_like(affinity, dtype=torch.bool)
        own[torch.arange(len(batch)), batch] = True
        cache = torch.exp(-beta * (1 - affinity)).masked_fill(own, 0.0) @ vals
        loss = torch.nn.functional.cross_entropy(tz[batch] + alpha * cache, ty[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        score = evaluate()
        if score > best_score:
            best_keys, best_step, best_score = weight.detach().numpy().copy(), step, score
    return best_keys, best_step


@register_head
class TipAdapterHead(Head):
    """Zero-shot logits plus the few-shot cache; see the module docstring."""

    method = "tip"
    required_tensors = {"class_weights": ("C", "E"), "keys": ("N", "K"), "values": ("N", "C")}
    required_config = ("logit_scale", "key_space", "alpha", "beta")

    def logits(self, encoding: ImageEncoding) -> np.ndarray:
        zs = self.config["logit_scale"] * encoding.embeddings @ self.weights["class_weights"].T
        queries = _queries(encoding, self.config["key_space"])
        cache = cache_affinity(queries, self.weights["keys"], self.weights["values"], self.config["beta"])
        return zs + self.config["alpha"] * cache

    @classmethod
    def fit(
        cls,
        data: FewShotData,
        finetune: bool = False,
        key_space: str = "features",
        steps: int = 200,
        lr: float = 1e-3,
        batch_size: int = 256,
    ) -> "TipAdapterHead":
        """Build the cache from ``data.train``, search alpha/beta on ``data.val``; with
        ``finetune`` train the keys for ``steps`` AdamW steps (Tip-Adapter-F) and search again."""
        if key_space not in KEY_SPACES:
            raise ClipxferError(f"tip: key_space must be one of {', '.join(KEY_SPACES)}, not {key_space!r}")
        num_classes = len(data.classnames)
        keys = _queries(data.train, key_space)
        values = np.eye(num_classes, dtype=np.float32)[data.train_labels]
        train_zs, val_zs = data.zeroshot.logits(data.train), data.zeroshot.logits(data.val)
        val_queries = _queries(data.val, key_space)
        alpha, beta, score = search_alpha_beta(val_zs, val_queries, keys, values, data.val_labels)
        config = {
            "variant": "tipf" if finetune else "tip",
            "key_space": key_space,
            "logit_scale": data.zeroshot.config["logit_scale"],
            **fit_provenance(data),
        }
        if finetune:
            keys, best_step = _train_keys(
                keys, values, keys, train_zs, data.train_labels, val_queries, val_zs, data.val_labels,
                alpha, beta, steps, lr, batch_size, data.seed,
            )
            alpha, beta, score = search_alpha_beta(val_zs, val_queries, keys, values, data.val_labels)
            config.update({"steps": steps, "lr": lr, "batch_size": batch_size, "best_step": best_step})
        config.update({"alpha": alpha, "beta": beta, "val_accuracy": score[0], "val_loss": -score[1]})
        weights = {"class_weights": data.zeroshot.weights["class_weights"], "keys": keys, "values": values}
        return cls(data.encoder.id, data.classnames, weights, config)
