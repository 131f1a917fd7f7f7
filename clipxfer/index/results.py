"""What the index hands back: search hits, near-duplicate pairs, and the report of an update run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..encoders.pipeline import Failure


@dataclass(frozen=True)
class Hit:
    """One search result; ``path`` is absolute."""

    rank: int
    score: float
    path: Path
    id: int
    relevance: float | None = None  # 1 - q-value, when a relevance cutoff was asked for

    def to_dict(self) -> dict:
        """The stable JSON form: ``rank``, ``score``, ``path`` (and ``relevance`` when computed)."""
        data = {"rank": self.rank, "score": round(self.score, 6), "path": str(self.path)}
        if self.relevance is not None:
            data["relevance"] = round(self.relevance, 6)
        return data


@dataclass
class UpdateReport:
    """What one ``clipxfer index`` run did."""

    index: str
    root: str
    model_id: str
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[Failure] = field(default_factory=list)
    total: int = 0
    recovered: int = 0  # rows kept from a damaged database by --rebuild
    damaged_copy: str | None = None  # where --rebuild kept a damaged database it could not fully read

    def to_dict(self) -> dict:
        """The stable JSON form: counts, ``failed_count`` and ``failed`` as {path, reason} objects."""
        data = asdict(self)
        data["failed"] = [{"path": str(f.path), "reason": f.reason} for f in self.failed]
        data["failed_count"] = len(self.failed)
        return data


@dataclass(frozen=True)
class DuplicatePair:
    """Two indexed images whose embeddings have cosine similarity ``score``."""

    score: float
    a: Path
    b: Path

    def to_dict(self) -> dict:
        return {"score": round(self.score, 6), "a": str(self.a), "b": str(self.b)}
