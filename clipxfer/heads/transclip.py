"""TransCLIP (Zanella, Gérin, Ben Ayed; NeurIPS 2024) as a transductive layer on any head.

Given a batch of images to classify, the head's own probabilities ``y`` (the *prior*) and, in the
few-shot case, the labelled shots, TransCLIP fits over the batch a Gaussian mixture with one
component per class and one shared diagonal variance ``v``, and assigns each image ``z_i`` by::

    log z_ik = lam * log y_ik + ll_ik / TEMPERATURE + (A z)_ik / (2 k) + const
    ll_ik    = -1/2 sum_d (x_id - mu_kd)^2 / v_d

``x`` are the L2-normalised probe features, ``A = W + W.T`` with ``W`` the sparse ``k``-nearest-
neighbour cosine affinity over batch and shots (the Laplacian term: neighbours agree), and the
``lam * log y`` term is the KL penalty toward the head's predictions (what keeps it from drifting
far from the head it starts from). Shots are nodes of the graph with fixed one-hot ``z``. Each of
:data:`ITERATIONS` rounds runs :data:`Z_STEPS` ``z`` updates, then the closed-form updates::

    mu_k = normalize( sum_i z_ik x_i / Q + (TEMPERATURE gamma / S) sum_{shots s of k} x_s )
    v    = [ sum_ik z_ik (x_i - mu_k)^2 / Q + (TEMPERATURE gamma / S) sum_s (x_s - mu_{y_s})^2 ]
           / ( 1 + TEMPERATURE gamma )

``mu`` starts at the shots' class means (few-shot) or at the z-weighted mean of each class's 8 most
confident images (zero-shot), ``v`` at ``1/d``. With shots, ``lam = 0.5`` and ``gamma`` (how much
the shots pull the means) is chosen from :data:`GAMMAS` by the accuracy, on the validation images,
which join the batch unlabelled, as the reference does; without shots ``lam = 1``, ``gamma = 0``.

:class:`TransCLIPHead` wraps a fitted head: it stores the base head's arrays (prefixed ``base.``),
the shots and the validation images, and its :meth:`~TransCLIPHead.logits` runs the solver over
the batch it is given, so its predictions depend on the whole batch (that is transduction).
What differs from the authors' code is in docs/methods.md.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..encoders.base import ImageEncoding
from ..errors import ClipxferError
from ..vector_math import l2_normalize
from .base import HEAD_TYPES, FewShotData, Head, fit_provenance, register_head
from .fitting import fit_head

TEMPERATURE = 50.0
ITERATIONS = 10
Z_STEPS = 5
NEIGHBOURS = 3
TOP_CONFIDENT = 8
GAMMAS = (0.002, 0.01, 0.02, 0.2)
LAMBDA_FEW_SHOT = 0.5
LAMBDA_ZERO_SHOT = 1.0
BASE_PREFIX = "base."


def knn_affinity(x: np.ndarray, k: int = NEIGHBOURS) -> sp.csr_matrix:
    """``(n, n)`` sparse: row ``i`` holds the cosine of ``x_i`` with its ``k`` nearest other rows
    (negative cosines clipped to 0). ``x``: unit rows. Exact search with faiss (inner product)."""
    import faiss

    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        return sp.csr_matrix((n, n), dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    rows = np.ascontiguousarray(x, dtype=np.float32)
    index.add(rows)
    sims, idx = index.search(rows, k + 1)
    # Drop each row's own hit; a row whose self is not among its k+1 (exact duplicates) drops its last.
    is_self = idx == np.arange(n)[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    keep = ~is_self
    cols = idx[keep].reshape(n, k)
    vals = np.maximum(sims[keep].reshape(n, k), 0.0)
    return sp.csr_matrix((vals.ravel(), (np.repeat(np.arange(n), k), cols.ravel())), shape=(n, n))


def gaussian_loglik(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``(n, C)``: ``-1/2 sum_d (x_id - mu_kd)^2 / v_d``, expanded into matrix products."""
    inv = 1.0 / var
    return -0.5 * ((x**2) @ inv)[:, None] + x @ (mu * inv).T - 0.5 * ((mu**2) @ inv)[None, :]


def update_z(loglik: np.ndarray, log_prior: np.ndarray, affinity: sp.spmatrix, z_all: np.ndarray,
             lam: float, k: int, steps: int = Z_STEPS) -> np.ndarray:
    """``steps`` rounds of the z update (module docstring) for the ``Q = len(loglik)`` batch rows
    of ``z_all`` (rows after ``Q`` are the shots, fixed). Returns the new ``z_all``."""
    q = len(loglik)
    z_all = z_all.copy()
    fixed = lam * log_prior + loglik / TEMPERATURE
    for _ in range(steps):
        scores = fixed + (affinity @ z_all)[:q] / (2 * k)
        scores -= scores.max(axis=1, keepdims=True)
        z = np.exp(scores)
        z_all[:q] = z / z.sum(axis=1, keepdims=True)
    return z_all


def update_mu(x: np.ndarray, z: np.ndarray, shots_x: np.ndarray | None, shots_onehot: np.ndarray | None,
              gamma: float) -> np.ndarray:
    """Class means: z-weighted batch mean plus the shots weighted by ``TEMPERATURE * gamma``, unit rows."""
    mu = z.T @ x / len(x)
    if shots_x is not None and gamma > 0:
        mu = mu + (TEMPERATURE * gamma / len(shots_x)) * shots_onehot.T @ shots_x
    return l2_normalize(mu, dtype=None)


def update_var(x: np.ndarray, z: np.ndarray, mu: np.ndarray, shots_x: np.ndarray | None,
               shots_onehot: np.ndarray | None, gamma: float) -> np.ndarray:
    """The shared diagonal variance (module docstring), without forming ``(n, C, d)``."""
    q = len(x)
    mass = z.sum(axis=0)
    spread = ((x**2).sum(axis=0) - 2 * (mu * (z.T @ x)).sum(axis=0) + mass @ (mu**2)) / q
    total = mass.sum() / q
    if shots_x is not None and gamma > 0:
        weight = TEMPERATURE * gamma / len(shots_x)
        spread = spread + weight * ((shots_x - shots_onehot @ mu) ** 2).sum(axis=0)
        total = total + weight * len(shots_x)
    return np.maximum(spread / total, 1e-12)


def init_mu(x: np.ndarray, z: np.ndarray, shots_x: np.ndarray | None, shots_onehot: np.ndarray | None) -> np.ndarray:
    """Shots: class means of the shots. No shots: per class, the z-weighted mean of its
    :data:`TOP_CONFIDENT` highest-z images."""
    if shots_x is not None:
        mu = shots_onehot.T @ shots_x
    else:
        top = min(TOP_CONFIDENT, len(x))
        order = np.argsort(-z, axis=0, kind="stable")[:top]  # (top, C)
        cols = np.arange(z.shape[1])
        mu = np.einsum("tc,tcd->cd", z[order, cols], x[order]) / top
    return l2_normalize(mu, dtype=None)


def transclip(
    x: np.ndarray,
    prior: np.ndarray,
    shots_x: np.ndarray | None = None,
    shots_y: np.ndarray | None = None,
    lam: float | None = None,
    gamma: float = 0.0,
    k: int = NEIGHBOURS,
    iterations: int = ITERATIONS,
    affinity: sp.spmatrix | None = None,
) -> np.ndarray:
    """TransCLIP's assignments ``z`` (``(Q, C)``, rows sum to 1) of the batch ``x`` (unit rows)
    given the head's probabilities ``prior`` and optional shots (unit rows ``shots_x``, integer
    ``shots_y``). ``affinity`` (from :func:`knn_affinity` over batch then shots) may be passed to
    reuse it across ``gamma`` values."""
    x = np.asarray(x, dtype=np.float64)
    num_classes = prior.shape[1]
    has_shots = shots_x is not None and len(shots_x) > 0
    if lam is None:
        lam = LAMBDA_FEW_SHOT if has_shots else LAMBDA_ZERO_SHOT
    onehot = None
    if has_shots:
        shots_x = np.asarray(shots_x, dtype=np.float64)
        onehot = np.eye(num_classes)[np.asarray(shots_y, dtype=np.int64)]
    else:
        shots_x = None
    nodes = x if shots_x is None else np.concatenate([x, shots_x])
    if affinity is None:
        affinity = knn_affinity(nodes, k)
    affinity = (affinity + affinity.T).tocsr()
    k_used = max(1, min(k, len(nodes) - 1))
    log_prior = np.log(np.clip(np.asarray(prior, dtype=np.float64), 1e-12, None))
    z_all = np.asarray(prior, dtype=np.float64) if onehot is None else np.concatenate([prior, onehot])
    mu = init_mu(x, z_all[: len(x)], shots_x, onehot)
    var = np.full(x.shape[1], 1.0 / x.shape[1])
    for step in range(iterations + 1):
        z_all = update_z(gaussian_loglik(x, mu, var), log_prior, affinity, z_all, lam, k_used)
        if step == iterations:
            break
        z = z_all[: len(x)]
        mu = update_mu(x, z, shots_x, onehot, gamma)
        var = update_var(x, z, mu, shots_x, onehot, gamma)
    return z_all[: len(x)]


def _fingerprint(encoding: ImageEncoding) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for array in (encoding.embeddings, encoding.features):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@register_head
class TransCLIPHead(Head):
    """Any head plus TransCLIP over the batch it classifies; see the module docstring.

    Weights: the base head's arrays under ``base.``, and, when fitted with shots,
    ``shot_features``, ``shot_labels`` (float), ``val_embeddings``, ``val_features``, ``val_labels``.
    Config: ``base_method``, ``base_config``, ``neighbours``, ``gammas``."""

    method = "transclip"

    def __init__(self, model_id: str, classnames: list[str], weights: dict[str, np.ndarray], config: dict[str, Any]):
        super().__init__(model_id, classnames, weights, config)
        base_method = self.config.get("base_method")
        if base_method not in HEAD_TYPES or base_method == self.method:
            raise ClipxferError(f"transclip head: unknown base method {base_method!r}")
        base_weights = {name[len(BASE_PREFIX):]: value for name, value in self.weights.items()
                        if name.startswith(BASE_PREFIX)}
        self.base = HEAD_TYPES[base_method](model_id, classnames, base_weights, self.config.get("base_config", {}))
        self._memo: tuple[str, np.ndarray] | None = None

    @classmethod
    def wrap(cls, base: Head, data: FewShotData | None = None, neighbours: int = NEIGHBOURS) -> "TransCLIPHead":
        """``base`` made transductive; with ``data`` holding shots, they (and its validation images,
        to choose ``gamma``) go into the head."""
        weights = {BASE_PREFIX + name: value for name, value in base.weights.items()}
        config: dict[str, Any] = {
            "variant": f"{base.method}+trans",
            "base_method": base.method,
            "base_config": base.config,
            "neighbours": int(neighbours),
            "gammas": list(GAMMAS),
        }
        if data is not None and len(data.train_labels):
            weights.update(
                shot_features=l2_normalize(data.train.features),
                shot_labels=np.asarray(data.train_labels, dtype=np.float32),
            )
            if len(data.val_labels):
                weights.update(
                    val_embeddings=data.val.embeddings,
                    val_features=data.val.features,
                    val_labels=np.asarray(data.val_labels, dtype=np.float32),
                )
            config.update(fit_provenance(data))
        return cls(base.model_id, base.classnames, weights, config)

    @classmethod
    def fit(cls, data: FewShotData, base: str = "zeroshot", neighbours: int = NEIGHBOURS,
            **base_options: Any) -> "TransCLIPHead":
        """Fit the ``base`` method on ``data`` (``base_options`` go to it), then wrap it."""
        base_head = fit_head(base, data, **base_options)
        return cls.wrap(base_head, data, neighbours)

    def logits(self, encoding: ImageEncoding) -> np.ndarray:
        """``log z`` of TransCLIP over ``encoding`` as one batch (clipped at 1e-12)."""
        key = _fingerprint(encoding)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1].copy()
        z = self.assign(encoding)
        result = np.log(np.clip(z, 1e-12, None)).astype(np.float32)
        self._memo = (key, result)
        return result.copy()

    def assign(self, encoding: ImageEncoding) -> np.ndarray:
        """TransCLIP's ``z`` for the batch; with stored validation images, the ``gamma`` of
        :data:`GAMMAS` whose ``z`` scores them best (accuracy, then log-likelihood) is used."""
        n = len(encoding.embeddings)
        if n == 0:
            return np.zeros((0, len(self.classnames)))
        has_val = "val_labels" in self.weights
        batch = encoding
        if has_val:
            batch = ImageEncoding(
                np.concatenate([encoding.embeddings, self.weights["val_embeddings"]]),
                np.concatenate([encoding.features, self.weights["val_features"]]),
            )
        prior = self.base.predict_proba(batch).astype(np.float64)
        x = l2_normalize(batch.features).astype(np.float64)
        shots_x = self.weights.get("shot_features")
        shots_y = self.weights["shot_labels"].astype(np.int64) if shots_x is not None else None
        k = int(self.config.get("neighbours", NEIGHBOURS))
        nodes = x if shots_x is None else np.concatenate([x, shots_x.astype(np.float64)])
        affinity = knn_affinity(nodes, k)
        if shots_x is None:
            return transclip(x, prior, k=k, affinity=affinity)[:n]
        best, best_score = None, None
        for gamma in self.config.get("gammas", GAMMAS):
            z = transclip(x, prior, shots_x, shots_y, gamma=gamma, k=k, affinity=affinity)
            if not has_val:
                return z[:n]  # no validation images: the first gamma, no choice
            val_y = self.weights["val_labels"].astype(np.int64)
            val_z = z[n:]
            score = ((val_z.argmax(axis=1) == val_y).mean(),
                     np.log(np.clip(val_z[np.arange(len(val_y)), val_y], 1e-12, None)).mean())
            if best_score is None or score > best_score:
                best, best_score = z, score
        return best[:n]
