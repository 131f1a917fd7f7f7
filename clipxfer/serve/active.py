"""Active learning: which unlabelled images a head is least sure about, spread out so a batch
is not ten near-copies of one picture.

Pure functions over arrays, plus :func:`suggest` (the API behind ``clipxfer suggest``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ClipxferError

STRATEGIES = ("margin", "entropy", "least-confident")
#: Candidates considered per proposed image: the most uncertain ``POOL_FACTOR * n`` items are
#: re-ranked for diversity; beyond that the uncertainty has fallen off anyway.
POOL_FACTOR = 10
#: The largest diversity weight: uncertainty is in [0, 1], so beyond this only diversity counts.
MAX_DIVERSITY = 10.0


def uncertainty(probs: np.ndarray, strategy: str = "margin") -> np.ndarray:
    """Per row, how unsure the probabilities are, in [0, 1] (1: most unsure).

    ``margin``: 1 - (top1 - top2); ``entropy``: normalised Shannon entropy;
    ``least-confident``: 1 - top1.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if strategy not in STRATEGIES:
        raise ClipxferError(f"unknown strategy '{strategy}': use one of {', '.join(STRATEGIES)}")
    if probs.shape[1] < 2:
        return np.zeros(len(probs))
    if strategy == "margin":
        top2 = np.sort(probs, axis=1)[:, -2:]
        return 1.0 - (top2[:, 1] - top2[:, 0])
    if strategy == "entropy":
        entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
        return entropy / np.log(probs.shape[1])
    return 1.0 - probs.max(axis=1)


def diverse_top(scores: np.ndarray, vectors: np.ndarray, n: int, diversity: float = 0.5) -> np.ndarray:
    """Indices of ``n`` rows chosen greedily by ``score - diversity * max cosine similarity to the
    rows already chosen`` (maximal marginal relevance) among the ``POOL_FACTOR * n`` best scores.

    ``vectors`` are unit rows; ``diversity=0`` gives the plain top-``n`` by score; it must be
    finite, in [0, MAX_DIVERSITY] (an infinite weight would pick one image ``n`` times).
    """
    if not (np.isfinite(diversity) and 0 <= diversity <= MAX_DIVERSITY):
        raise ClipxferError(f"diversity must be a number from 0 to {MAX_DIVERSITY:g}, not {diversity}")
    scores = np.asarray(scores, dtype=np.float64)
    n = min(int(n), len(scores))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    pool_size = min(len(scores), POOL_FACTOR * n)
    pool = np.argsort(-scores, kind="stable")[:pool_size]
    pool_vectors = np.asarray(vectors, dtype=np.float32)[pool]
    pool_scores = scores[pool]
    closest = np.full(pool_size, -np.inf)  # max similarity to anything chosen so far
    chosen: list[int] = []
    available = np.ones(pool_size, dtype=bool)
    for _ in range(n):
        penalty = np.where(np.isfinite(closest), closest, 0.0)
        value = np.where(available, pool_scores - diversity * penalty, -np.inf)
        best = int(np.argmax(value))
        chosen.append(best)
        available[best] = False
        closest = np.maximum(closest, pool_vectors @ pool_vectors[best])
    return pool[np.asarray(chosen, dtype=np.int64)]


def propose(
    probs: np.ndarray,
    vectors: np.ndarray,
    n: int,
    exclude: np.ndarray | None = None,
    strategy: str = "margin",
    diversity: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, uncertainty)`` of the ``n`` rows to label next; rows where ``exclude`` is True
    (already labelled) are never proposed."""
    unsure = uncertainty(probs, strategy)
    candidates = np.arange(len(unsure)) if exclude is None else np.flatnonzero(~np.asarray(exclude, bool))
    picked = candidates[diverse_top(unsure[candidates], np.asarray(vectors)[candidates], n, diversity)]
    return picked, unsure[picked]


@dataclass(frozen=True)
class Suggestion:
    """One image proposed for labelling: the head's best guess and how unsure it is."""

    rank: int
    id: int
    path: Path
    uncertainty: float
    label: str
    probability: float

    def to_dict(self) -> dict:
        """The stable JSON form of ``clipxfer suggest --json`` and ``/api/labels/suggest``."""
        return {
            "rank": self.rank,
            "id": self.id,
            "path": str(self.path),
            "uncertainty": round(self.uncertainty, 6),
            "label": self.label,
            "probability": round(self.probability, 6),
        }


def suggestions(
    head,
    ids: np.ndarray,
    paths: list[Path],
    encoding,
    n: int,
    exclude: np.ndarray | None = None,
    strategy: str = "margin",
    diversity: float = 0.5,
) -> list[Suggestion]:
    """The ``n`` items of an index snapshot (``ids, paths, encoding``) that ``head`` is least sure
    about, diversified; ``exclude`` masks rows that must not be proposed."""
    probs = head.predict_proba(encoding)
    picked, unsure = propose(probs, encoding.embeddings, n, exclude, strategy, diversity)
    best = probs[picked].argmax(axis=1) if len(picked) else np.zeros(0, dtype=np.int64)
    return [
        Suggestion(rank + 1, int(ids[i]), Path(paths[i]), float(u), head.classnames[b], float(probs[i, b]))
        for rank, (i, u, b) in enumerate(zip(picked, unsure, best))
    ]


def suggest(
    index_path: str | os.PathLike | None,
    head_path: str | os.PathLike,
    n: int = 20,
    strategy: str = "margin",
    diversity: float = 0.5,
    exclude_paths: list[str] | None = None,
    exclude_source: str | os.PathLike | None = None,
) -> list[Suggestion]:
    """The ``n`` indexed images a saved head is least sure about (``clipxfer suggest``).

    ``exclude_paths``: images never to propose (e.g. those already in the head's manifest); when
    none of them is in the index they are refused (a manifest of other images, or paths resolved
    wrongly), naming ``exclude_source`` (the manifest they came from).
    """
    from ..heads import load_head
    from ..index import Index

    if n < 1:
        raise ClipxferError(f"-n must be at least 1, not {n}")
    with Index.open(index_path) as idx:
        head = load_head(head_path, model_id=idx.model_id)
        ids, paths, encoding = idx.load_items()
    if len(ids) == 0:
        raise ClipxferError(f"index {index_path} is empty: index some images first")
    exclude = None
    if exclude_paths:
        excluded = {str(Path(p).resolve()) for p in exclude_paths}
        exclude = np.array([str(Path(p).resolve()) in excluded for p in paths])
        if not exclude.any():
            where = f"{exclude_source}: " if exclude_source else ""
            raise ClipxferError(
                f"{where}none of its {len(excluded)} paths is an image of the index {index_path}, so nothing "
                "would be excluded; give the manifest of images from this index (relative paths are read from "
                "the manifest's folder)"
            )
    return suggestions(head, ids, paths, encoding, n, exclude, strategy, diversity)
