"""Duplicates in three tiers: exact files, copies of one image, and look-alikes.

- ``exact``: the same bytes (the SHA-256 the index stores).
- ``copy``: the same image resized, recompressed, cropped a little or recoloured. The similarity
  threshold is learned from the index itself: a seeded sample of its images is copied with each of
  those edits (:func:`copy_variants`), the copies are encoded with the index's model, and the threshold
  lies between the copies and the images' nearest *other* images in the index: halfway from the
  :data:`COPY_RECALL` quantile (from below) of copy-to-original similarity down to the
  :data:`DISTINCT_QUANTILE` quantile of nearest-other-image similarity (or at the former when
  the two overlap) -- so it adapts to the model and to the collection. Copies are compared in the encoder's probe-feature space when the index stores one (``lite``:
  the image backbone, which keeps instance detail the shared text-image space drops), else in the
  embedding space.
- ``lookalike``: embedding similarity at least the user's threshold (a second photo of the same scene,
  another item of the same kind), pairs not already in a tier above.

Pairs of a tier are grouped by connected components (a copy of a copy is in the same group).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance

from ..errors import ClipxferError, ImageDecodeError
from ..images import open_image
from . import store

#: Images of the index copied to learn the copy threshold.
LEARN_SAMPLE = 32
#: Share of learned copies the threshold keeps at least (its quantile from below is 1 - COPY_RECALL).
COPY_RECALL = 0.97
#: Quantile of the sampled images' nearest-other-image similarity taken as "distinct images" (a high
#: quantile rather than the maximum, so a few real copies in the sample do not move it).
DISTINCT_QUANTILE = 0.95
TIERS = ("exact", "copy", "lookalike")
KEEP_RULES = ("newest", "largest")


def copy_variants(img: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    """The edits a copy of a photo goes through: resized, JPEG-recompressed, cropped a little,
    recoloured (one variant each, with seeded strengths)."""
    img = img.convert("RGB")
    width, height = img.size
    factor = rng.uniform(0.25, 0.6) if min(width, height) >= 64 else rng.uniform(1.5, 3.0)
    resized = img.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.LANCZOS)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(rng.integers(20, 45)))
    recompressed = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    margin = rng.uniform(0.03, 0.08, size=4)
    box = (round(width * margin[0]), round(height * margin[1]),
           width - round(width * margin[2]), height - round(height * margin[3]))
    cropped = img.crop(box) if box[2] > box[0] and box[3] > box[1] else img
    recoloured = ImageEnhance.Color(img).enhance(rng.uniform(0.0, 0.6))
    recoloured = ImageEnhance.Brightness(recoloured).enhance(rng.uniform(0.85, 1.2))
    return [resized, recompressed, cropped, recoloured]


@dataclass(frozen=True)
class Member:
    """One file of a group."""

    id: int
    path: Path
    size: int
    mtime_ns: int
    width: int
    height: int

    def to_dict(self) -> dict:
        modified = datetime.fromtimestamp(self.mtime_ns / 1e9, timezone.utc).isoformat(timespec="seconds")
        return {"path": str(self.path), "size": self.size, "width": self.width, "height": self.height,
                "modified": modified}


@dataclass
class DuplicateGroup:
    """Files of one tier that are duplicates of each other; ``score`` is the lowest similarity of
    the pairs that joined them (1 for exact files)."""

    tier: str
    score: float
    members: list[Member]

    def keep(self, rule: str) -> Member:
        """The member a ``--keep`` rule keeps: ``newest`` (latest mtime) or ``largest`` (most pixels,
        then most bytes); ties go to the first path."""
        if rule == "newest":
            return max(self.members, key=lambda m: (m.mtime_ns, -self.members.index(m)))
        return max(self.members, key=lambda m: (m.width * m.height, m.size, -self.members.index(m)))

    def to_dict(self) -> dict:
        return {"tier": self.tier, "score": round(self.score, 6), "members": [m.to_dict() for m in self.members]}


@dataclass
class DuplicateReport:
    """The groups of each tier and the thresholds used (``copy_threshold`` learned from
    ``learned_from`` copies of the index's own images)."""

    copy_threshold: float
    lookalike_threshold: float
    learned_from: int
    space: str  # "features" or "embeddings": where copies are compared
    groups: list[DuplicateGroup] = field(default_factory=list)

    def delete_list(self, rule: str) -> list[Path]:
        """Files a ``--keep`` rule would delete: all but one of each exact and copy group (look-alikes
        are different photos and are never listed)."""
        if rule not in KEEP_RULES:
            raise ClipxferError(f"--keep {rule}: use one of {', '.join(KEEP_RULES)}")
        delete = []
        for group in self.groups:
            if group.tier in ("exact", "copy"):
                kept = group.keep(rule)
                delete.extend(m.path for m in group.members if m is not kept)
        return delete

    def to_dict(self, keep: str | None = None) -> dict:
        data = {
            "copy_threshold": round(self.copy_threshold, 6),
            "lookalike_threshold": self.lookalike_threshold,
            "learned_from": self.learned_from,
            "space": self.space,
            "groups": [g.to_dict() for g in self.groups],
        }
        if keep is not None:
            data["keep"] = keep
            data["delete"] = [str(p) for p in self.delete_list(keep)]
        return data


def _normalised(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def learn_copy_threshold(
    paths: list[Path], vectors: np.ndarray, hashes: list[str], encode: Callable[[list[Image.Image]], np.ndarray],
    sample: int = LEARN_SAMPLE, seed: int = 0,
) -> tuple[float, int]:
    """The copy threshold from edited copies of up to ``sample`` of the images (seeded), and how many
    copies it was learned from. ``vectors`` are the stored (normalised) vectors of ``paths``, ``hashes``
    their SHA-256 (files with the same bytes are not "other images"); ``encode`` turns PIL images into
    vectors of the same space."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    copies, distinct = [], []
    hashes = np.asarray(hashes, dtype=object)
    for row in order:
        if len(distinct) >= sample:
            break
        try:
            original = open_image(paths[row])
        except (ImageDecodeError, OSError):
            continue  # moved or damaged since indexing: learn from the others
        copies.extend(_normalised(encode(copy_variants(original, rng))) @ vectors[row])
        others = vectors[hashes != hashes[row]]
        if len(others):
            distinct.append(float(np.max(others @ vectors[row])))
    if not copies:
        raise ClipxferError("no indexed image could be read to learn what a copy looks like: run 'clipxfer index' again")
    low_copy = float(np.quantile(copies, 1.0 - COPY_RECALL))
    high_distinct = float(np.quantile(distinct, DISTINCT_QUANTILE)) if distinct else -1.0
    threshold = (low_copy + high_distinct) / 2 if high_distinct < low_copy else low_copy
    return threshold, len(copies)


def _pairs_above(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Row pairs (i < j) with inner product >= ``threshold`` (exact, by FAISS range search)."""
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    pairs = []
    for start in range(0, len(vectors), 4096):
        lims, scores, found = flat.range_search(vectors[start : start + 4096], float(threshold))
        for row in range(len(lims) - 1):
            i = start + row
            for j, score in zip(found[lims[row] : lims[row + 1]], scores[lims[row] : lims[row + 1]]):
                if j > i:
                    pairs.append((i, int(j), float(score)))
    return pairs


def _components(count: int, pairs) -> list[tuple[list[int], float]]:
    """Connected components of ``pairs`` (with at least two rows) and the lowest score joining each."""
    parent = list(range(count))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _ in pairs:
        parent[find(i)] = find(j)
    lowest: dict[int, float] = {}
    for i, _, score in pairs:
        root = find(i)
        lowest[root] = min(lowest.get(root, 1.0), score)
    groups: dict[int, list[int]] = {}
    for i, j, _ in pairs:
        groups.setdefault(find(i), []).extend((i, j))
    return [(sorted(set(rows)), lowest[root]) for root, rows in groups.items()]


def find_duplicates(
    conn, root: Path, dim: int, feature_dim: int | None, encoder, lookalike_threshold: float,
    learn_sample: int = LEARN_SAMPLE, seed: int = 0,
) -> DuplicateReport:
    """The three tiers over the index behind ``conn`` (see the module docstring)."""
    if not -1.0 <= lookalike_threshold <= 1.0:
        raise ClipxferError(f"--threshold {lookalike_threshold}: give a cosine similarity between -1 and 1")
    ids, rel_paths, embeddings, features = store.vectors(conn, dim, feature_dim)
    rows = {row.id: row for row in store.rows(conn)}
    members = [Member(int(i), root / p, rows[int(i)].size, rows[int(i)].mtime_ns, rows[int(i)].width,
                      rows[int(i)].height) for i, p in zip(ids, rel_paths)]
    space = "features" if features is not None else "embeddings"
    copy_vectors = _normalised(features if features is not None else embeddings)
    report = DuplicateReport(1.0, lookalike_threshold, 0, space)
    if len(ids) < 2:
        return report

    def encode(images):
        encoding = encoder.embed_images(images)
        return encoding.features if features is not None else encoding.embeddings

    report.copy_threshold, report.learned_from = learn_copy_threshold(
        [m.path for m in members], copy_vectors, [rows[int(i)].sha256 for i in ids], encode, learn_sample, seed)

    by_hash: dict[str, list[int]] = {}
    for row, item_id in enumerate(ids):
        by_hash.setdefault(rows[int(item_id)].sha256, []).append(row)
    exact = [(rows_[0], other, 1.0) for rows_ in by_hash.values() if len(rows_) > 1 for other in rows_[1:]]
    same_file = {frozenset((i, j)) for rows_ in by_hash.values() for i in rows_ for j in rows_ if i != j}
    copies = [p for p in _pairs_above(copy_vectors, report.copy_threshold) if frozenset(p[:2]) not in same_file]
    copied = {frozenset(p[:2]) for p in copies} | same_file
    lookalikes = [p for p in _pairs_above(_normalised(embeddings), lookalike_threshold)
                  if frozenset(p[:2]) not in copied]
    for tier, pairs in (("exact", exact), ("copy", copies), ("lookalike", lookalikes)):
        for rows_, score in _components(len(ids), pairs):
            report.groups.append(DuplicateGroup(tier, score, [members[r] for r in rows_]))
    report.groups.sort(key=lambda g: (TIERS.index(g.tier), -g.score, str(g.members[0].path)))
    return report
