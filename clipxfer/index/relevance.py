"""A relevance cutoff with a meaning: how far a hit's score stands out from the query's own scores.

A fixed cosine threshold fails because score levels differ between queries, between text and image
queries and between models. Here each query gets its own null: its scores against a sample of the
index (most images do not match any one query), summarised robustly by the median and the spread of
the lower half (which matches cannot inflate) as a normal distribution. For a hit with score ``s``:

- ``p(s)``: the null's chance of a score at least ``s``;
- the estimated false-discovery rate of keeping everything scoring ``>= s``: the expected number of
  non-matches that high, ``N * p(s)``, over the number of images that high (its rank among the hits,
  or ``N`` times the sample's fraction at least ``s`` when larger); made monotone in ``s`` (q-values);
- ``relevance = 1 - q``: keep a hit when ``relevance >= P``, so ``P = 0.95`` asks for at most about
  5 % of the hits kept being chance-level scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from ..errors import ClipxferError

#: Stored vectors the null is estimated from (evenly spread over the index).
NULL_SAMPLE = 20_000
#: ``--min-relevance`` given without a value.
DEFAULT_MIN_RELEVANCE = 0.95
#: The normal quantile one standard deviation below the median.
_ONE_SIGMA_BELOW = float(ndtr(-1.0))


def check_min_relevance(value) -> float | None:
    """``value`` as a level in [0, 1), or one clear error."""
    if value is None:
        return None
    try:
        level = float(value)
    except (TypeError, ValueError):
        level = float("nan")
    if not 0.0 <= level < 1.0:
        raise ClipxferError(
            f"--min-relevance {value}: give a level between 0 and 1 (0.95: at most about 5% of the kept hits are chance)"
        )
    return level


@dataclass(frozen=True)
class ScoreNull:
    """One query's chance-level scores: ``location`` and ``scale`` of a normal fitted robustly,
    the sorted sample scores, and ``total`` (how many images the search ranges over)."""

    location: float
    scale: float
    sample: np.ndarray
    total: int

    @classmethod
    def fit(cls, sample_scores: np.ndarray, total: int) -> "ScoreNull":
        """The null from one query's scores against a sample of the index."""
        scores = np.sort(np.asarray(sample_scores, dtype=np.float64))
        if len(scores) == 0:
            return cls(0.0, 1.0, scores, max(total, 1))
        location = float(np.median(scores))
        scale = location - float(np.quantile(scores, _ONE_SIGMA_BELOW))
        if not scale > 1e-9:  # a degenerate sample (one image, identical scores): fall back to the spread
            scale = max(float(scores.std()), 1e-6)
        return cls(location, scale, scores, max(int(total), 1))

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """The null's chance of a score at least each of ``scores``."""
        return ndtr(-(np.asarray(scores, dtype=np.float64) - self.location) / self.scale)

    def relevance(self, scores: np.ndarray) -> np.ndarray:
        """``1 - q`` for hits with ``scores`` in descending order (the top of the ranking)."""
        scores = np.asarray(scores, dtype=np.float64)
        if len(scores) == 0:
            return scores
        expected_false = self.total * self.p_values(scores)
        at_least = len(self.sample) - np.searchsorted(self.sample, scores, side="left")
        observed = np.maximum(np.arange(1, len(scores) + 1), self.total * at_least / max(len(self.sample), 1))
        fdr = np.minimum(1.0, expected_false / observed)
        q = np.minimum.accumulate(fdr[::-1])[::-1]
        return 1.0 - q


def query_nulls(queries: np.ndarray, sample: np.ndarray, total: int) -> list[ScoreNull]:
    """One :class:`ScoreNull` per query row from its scores against ``sample`` (stored vectors)."""
    scores = np.asarray(queries, dtype=np.float32) @ np.asarray(sample, dtype=np.float32).T
    return [ScoreNull.fit(row, total) for row in scores]
