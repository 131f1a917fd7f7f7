"""Query arithmetic: ``2*"a red dress" + summer - "long sleeves"`` parsed into weighted terms and
combined into one search vector.

Grammar (whitespace is free around operators and ``*``)::

    query  := [sign] term (sign term)*
    sign   := "+" | "-"            an operator: at the start, or after whitespace or a closing quote
    term   := [number "*"] atom
    atom   := '"' text '"' | "'" text "'"     quoted text (may hold + and -)
            | "image:" path | "image:" quoted  an image file (command line only)
            | words                           bare text, up to the next operator

A ``-`` inside a word (``t-shirt``) is part of the text; ``a - b`` is a subtraction. A query with no
operator is one text term, as before. Each term's vector is L2-normalised, multiplied by its weight
(negative after ``-``), the terms are summed and the sum is L2-normalised again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import ClipxferError

IMAGE_PREFIX = "image:"
_NUMBER = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*\*")


@dataclass(frozen=True)
class Term:
    """One weighted part of a query: ``kind`` is ``text`` or ``image`` (``value`` a file path)."""

    weight: float
    kind: str
    value: str


class QueryError(ClipxferError):
    """A malformed query, with the column where it went wrong and what was expected there."""

    def __init__(self, query: str, position: int, expected: str):
        self.query, self.position, self.expected = query, position, expected
        super().__init__(f"query {query!r}, column {position + 1}: {expected}")


def parse_query(query: str) -> list[Term]:
    """The terms of ``query`` (see the module docstring); :class:`QueryError` when malformed."""
    if not isinstance(query, str) or not query.strip():
        raise ClipxferError("the search query is empty: give some words describing the images to find")
    return _Parser(query).parse()


class _Parser:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def fail(self, expected: str, position: int | None = None):
        raise QueryError(self.text, self.pos if position is None else position, expected)

    def parse(self) -> list[Term]:
        terms = []
        self.skip_space()
        sign = 1.0
        if self.pos < len(self.text) and self.text[self.pos] in "+-":
            sign = -1.0 if self.text[self.pos] == "-" else 1.0
            self.pos += 1
        while True:
            terms.append(self.term(sign))
            self.skip_space()
            if self.pos >= len(self.text):
                return terms
            operator = self.text[self.pos]
            if operator not in "+-":
                self.fail(f"expected + or - between terms, found {operator!r}")
            sign = -1.0 if operator == "-" else 1.0
            self.pos += 1

    def term(self, sign: float) -> Term:
        self.skip_space()
        start = self.pos
        weight = 1.0
        number = _NUMBER.match(self.text, self.pos)
        if number:
            weight = float(number.group(1))
            self.pos = number.end()
            self.skip_space()
        if self.pos >= len(self.text):
            after = "'*'" if number else ("'+' or '-'" if start > 0 else "the start")
            self.fail(f"expected a quoted text, words or image:PATH after {after}")
        if self.text.startswith(IMAGE_PREFIX, self.pos):
            self.pos += len(IMAGE_PREFIX)
            if self.pos < len(self.text) and self.text[self.pos] in "\"'":
                value = self.quoted()
            else:
                value = self.words(stop_at_space=True)
            if not value:
                self.fail("expected a file path after image:")
            return Term(sign * weight, "image", value)
        if self.text[self.pos] in "\"'":
            value = self.quoted()
            if not value.strip():
                self.fail("expected some text inside the quotes", self.pos - 2)
            return Term(sign * weight, "text", value)
        value = self.words(stop_at_space=False)
        if not value:
            self.fail(f"expected a quoted text, words or image:PATH, found {self.text[self.pos]!r}")
        return Term(sign * weight, "text", value)

    def quoted(self) -> str:
        quote, start = self.text[self.pos], self.pos
        end = self.text.find(quote, self.pos + 1)
        if end < 0:
            self.fail(f"this {quote} is never closed", start)
        self.pos = end + 1
        return self.text[start + 1 : end]

    def words(self, stop_at_space: bool) -> str:
        """Bare text up to the next operator (a + or - at a word start) or the end."""
        start = self.pos
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char.isspace():
                if stop_at_space:
                    break
                rest = self.text[self.pos :].lstrip()
                if not rest or rest[0] in "+-":
                    break
            elif char in "\"'" and self.pos == start:
                break
            self.pos += 1
        return self.text[start : self.pos].strip()


def format_terms(terms: Sequence[Term]) -> str:
    """A canonical text form of ``terms`` (for titles and logs)."""
    parts = []
    for i, term in enumerate(terms):
        sign = "-" if term.weight < 0 else "+"
        weight = abs(term.weight)
        value = f"{IMAGE_PREFIX}{term.value}" if term.kind == "image" else f'"{term.value}"'
        text = value if weight == 1 else f"{weight:g}*{value}"
        parts.append(("-" + text) if i == 0 and sign == "-" else text if i == 0 else f"{sign} {text}")
    return " ".join(parts)


def combine(terms: Sequence[Term], vectors: np.ndarray) -> np.ndarray:
    """The normalised weighted sum of the terms' vectors (one row per term, normalised first)."""
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(terms), -1)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    weights = np.array([t.weight for t in terms], dtype=np.float32)[:, None]
    total = (weights * vectors / np.maximum(norms, 1e-12)).sum(axis=0)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6 * max(1.0, float(np.abs(weights).sum())):
        raise ClipxferError(f"the query {format_terms(terms)} adds up to nothing (its terms cancel out): change a weight")
    return (total / norm).astype(np.float32)


def query_vector(
    terms: Sequence[Term],
    encode_texts: Callable[[list[str]], np.ndarray],
    encode_image: Callable[[str], np.ndarray] | None,
) -> np.ndarray:
    """One unit search vector for ``terms``: texts through ``encode_texts`` (one call for all),
    each image through ``encode_image`` (None: image terms are refused, as on the web API)."""
    texts = [t.value for t in terms if t.kind == "text"]
    text_vectors = iter(encode_texts(texts) if texts else [])
    rows = []
    for term in terms:
        if term.kind == "text":
            rows.append(next(text_vectors))
        elif encode_image is None:
            raise ClipxferError(f"image:{term.value}: image terms are not accepted here; upload the image instead")
        else:
            rows.append(encode_image(term.value))
    return combine(terms, np.stack(rows))
