"""N-way K-shot episodes: drawing them from a labelled pool and scoring prototypes on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ClipxferError
from ..vector_math import l2_normalize


@dataclass(frozen=True)
class Episode:
    """Rows of one N-way K-shot task; labels are 0..N-1 in the order of ``classes``."""

    classes: np.ndarray
    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray


def check_episode_shape(ways: int, shots: int, queries: int, where: str) -> None:
    """An episode has at least 2 classes, 1 support and 1 query image each, or one clear error."""
    if ways < 2 or shots < 1 or queries < 1:
        raise ClipxferError(f"{where}: need --ways >= 2, --shots >= 1 and at least 1 query (got {ways}, {shots}, {queries})")


def check_episode_pool(labels: np.ndarray, ways: int, shots: int, queries: int, where: str) -> np.ndarray:
    """The classes of ``labels`` with at least ``shots + queries`` rows, or one clear error."""
    check_episode_shape(ways, shots, queries, where)
    present, counts = np.unique(labels, return_counts=True)
    usable = present[counts >= shots + queries]
    if len(present) < ways:
        raise ClipxferError(f"{where}: {len(present)} classes but --ways {ways}: give at least {ways} classes or lower --ways")
    if len(usable) < ways:
        raise ClipxferError(
            f"{where}: only {len(usable)} classes have the {shots + queries} images an episode needs "
            f"({shots} shots + {queries} queries) but --ways is {ways}; add images or lower --shots/--ways"
        )
    return usable


def sample_episode(
    labels: np.ndarray, classes: np.ndarray, ways: int, shots: int, queries: int, rng: np.random.Generator
) -> Episode:
    """Draw ``ways`` of ``classes``, then ``shots`` support and ``queries`` query rows of each."""
    chosen = rng.choice(classes, size=ways, replace=False)
    support, query = [], []
    for members in (np.flatnonzero(labels == c) for c in chosen):
        picked = rng.choice(members, size=shots + queries, replace=False)
        support.append(picked[:shots])
        query.append(picked[shots:])
    return Episode(
        classes=chosen,
        support=np.concatenate(support),
        support_labels=np.repeat(np.arange(ways), shots),
        query=np.concatenate(query),
        query_labels=np.repeat(np.arange(ways), queries),
    )


def prototype_logits(support: np.ndarray, support_labels: np.ndarray, query: np.ndarray, ways: int) -> np.ndarray:
    """Cosine of each (normalised) query row to each class mean of the (normalised) support rows."""
    s, q = l2_normalize(support), l2_normalize(query)
    means = np.stack([s[support_labels == c].mean(axis=0) for c in range(ways)])
    return q @ l2_normalize(means).T


def episodes_accuracy(
    transform, x: np.ndarray, labels: np.ndarray, episodes: Sequence[Episode], ways: int
) -> np.ndarray:
    """Per-episode nearest-prototype accuracy of ``transform(features)`` (identity: raw prototypes)."""
    z = transform(x)
    return np.array([
        float((prototype_logits(z[e.support], e.support_labels, z[e.query], ways).argmax(1) == e.query_labels).mean())
        for e in episodes
    ])  # fmt: skip
