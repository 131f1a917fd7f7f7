"""What ``/api/search`` and ``/api/search/image`` add to a plain query: query arithmetic (terms
joined by + and -, see :mod:`clipxfer.index.query`), filters and the relevance cutoff, checked
with one clear 400 each."""

from __future__ import annotations

import numpy as np
from fastapi import Query

from ..index.filters import Filters
from ..index.query import Term, parse_query, query_vector
from ..index.relevance import check_min_relevance


def filter_params(
    path: str | None = Query(None, max_length=1000, description="Glob on the path relative to the indexed folder."),
    modified_after: str | None = Query(None, max_length=64, description="YYYY-MM-DD[THH:MM]"),
    modified_before: str | None = Query(None, max_length=64, description="YYYY-MM-DD[THH:MM]"),
    min_width: int | None = None,
    min_height: int | None = None,
) -> Filters:
    """The filter query parameters (as on ``clipxfer search``), checked."""
    return Filters.from_options(path, modified_after, modified_before, min_width, min_height)


def relevance_param(min_relevance: float | None = None) -> float | None:
    """``min_relevance`` (a level in [0, 1)), checked."""
    return check_min_relevance(min_relevance)


def text_terms(q: str | None) -> list[Term]:
    """The parsed terms of ``q`` (none for an empty or missing one)."""
    return parse_query(q) if q is not None and q.strip() else []


def is_plain_text(terms: list[Term]) -> bool:
    """True for one text term of weight 1 (a query from before arithmetic: its vector is the text's)."""
    return len(terms) == 1 and terms[0].kind == "text" and terms[0].weight == 1.0


def combined_vector(state, terms: list[Term], image_vector: np.ndarray | None = None) -> np.ndarray:
    """The search vector for an uploaded image (when given, the first term) and ``terms``; texts come
    from the server's text cache; ``image:`` terms naming server files are refused."""
    if image_vector is not None:
        terms = [Term(1.0, "image", "<upload>"), *terms]

    def encode_image(value: str) -> np.ndarray:
        if value == "<upload>" and image_vector is not None:
            return image_vector
        return query_vector([Term(1.0, "image", value)], None, None)  # refused: files on the server are private

    def encode_texts(texts: list[str]) -> np.ndarray:
        return np.stack([state.text_vector(text) for text in texts])

    return query_vector(terms, encode_texts, encode_image)
