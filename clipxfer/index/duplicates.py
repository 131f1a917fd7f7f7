"""Duplicates in three tiers: exact files, copies of one image, and look-alikes.

- ``exact``: the same bytes (the SHA-256 the index stores).
- ``copy``: the same image resized, recompressed, cropped a little or recoloured. Candidate pairs are
  each file's nearest neighbours by model cosine (the encoder's probe features when the index stores
  them -- ``lite``: the image backbone, which keeps instance detail the shared text-image space drops --
  else the embeddings); only their images are read, once each, and compared pixel by pixel with the
  aligned thumbnail correlation (:mod:`clipxfer.index.alignment`: tolerant of small crops). A pair is a
  copy when the weighted mean of the two (:func:`copy_similarity`) is high *and* beats both files' best
  other candidate by a margin (a second photo of one scene, or another item of one kind, has rivals
  about as close). Both cut-offs are learned from the index itself: a seeded sample of its images is
  copied with each of those edits (:func:`copy_variants`) and encoded with the index's model; the
  cut-offs keep :data:`COPY_RECALL` and :data:`MARGIN_RECALL` of those copies -- so both adapt to the
  model and the collection. Several copies of one image rival each other: only pairs that stand out
  join a group.
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
from ..vector_math import l2_normalize
from . import alignment, store

#: Images of the index copied to learn the copy threshold.
LEARN_SAMPLE = 32
#: Share of learned copies the threshold keeps at least (its quantile from below is 1 - COPY_RECALL).
COPY_RECALL = 0.97
#: Share of learned copies the margin cut-off keeps: the margin is what separates copies from look-alikes,
#: so it trades a little recall for precision (chosen on a validation collection, benchmarks/dups_tiers.py --seed 0).
MARGIN_RECALL = 0.9
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
    copy_margin: float
    lookalike_threshold: float
    learned_from: int
    space: str  # "features" or "embeddings": where copies are compared
    images_compared: int = 0  # images read for the pixel check (those in candidate pairs)
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
            "copy_margin": round(self.copy_margin, 6),
            "lookalike_threshold": self.lookalike_threshold,
            "learned_from": self.learned_from,
            "space": self.space,
            "images_compared": self.images_compared,
            "groups": [g.to_dict() for g in self.groups],
        }
        if keep is not None:
            data["keep"] = keep
            data["delete"] = [str(p) for p in self.delete_list(keep)]
        return data



NEIGHBOURS = 8
#: Weight of the aligned thumbnail correlation against the model cosine in a pair's copy similarity
#: (chosen on validation collections: benchmarks/dups_tiers.py --seed 0, 4, 5).
PIXEL_WEIGHT = 2.0
#: The margin of a copy with no rival among the candidates (similarities lie in [-1, 1]).
NO_RIVAL = 3.0


class Windows:
    """Each indexed image's aligned windows (:func:`clipxfer.index.alignment.windows`), read once and
    only when a candidate pair needs them; an unreadable image has none (it matches no pixels)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._rows: dict[int, np.ndarray | None] = {}

    def __getitem__(self, row: int) -> np.ndarray | None:
        if row not in self._rows:
            try:
                img = open_image(self.paths[row], draft_size=4 * alignment.SIDE)
                self._rows[row] = alignment.signature(img)
            except (ImageDecodeError, OSError):
                self._rows[row] = None  # moved or damaged since indexing
        return self._rows[row]

    def __len__(self) -> int:
        return sum(w is not None for w in self._rows.values())


def copy_similarity(model_cosine: float, a: np.ndarray | None, b: np.ndarray | None) -> float:
    """The weighted mean of the model cosine and the aligned thumbnail correlation (:data:`PIXEL_WEIGHT`;
    the correlation is 0 when an image is unreadable)."""
    pixels = alignment.aligned_correlation(a, b) if a is not None and b is not None else 0.0
    return (float(model_cosine) + PIXEL_WEIGHT * pixels) / (1.0 + PIXEL_WEIGHT)


@dataclass
class CopyRule:
    """A pair is a candidate when its model cosine is at least ``candidate`` (the lowest that can still
    reach ``threshold``); a copy when its copy
    similarity (:func:`copy_similarity`) is at least ``threshold`` and beats both files' best *other*
    candidate (files with the same bytes aside) by at least ``margin``."""

    candidate: float
    threshold: float
    margin: float
    learned_from: int


def _neighbours(vectors: np.ndarray, queries: np.ndarray, k: int):
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    scores, ids = flat.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(vectors)))
    return ids, scores


def learn_copy_rule(
    paths: list[Path], model: np.ndarray, hashes: list[str], windows: Windows,
    encode: Callable[[list[Image.Image]], np.ndarray], sample: int = LEARN_SAMPLE, seed: int = 0,
) -> CopyRule:
    """The copy rule from edited copies (:func:`copy_variants`) of up to ``sample`` of the images
    (seeded). ``model`` are the normalised model vectors of ``paths``, ``hashes`` their SHA-256,
    ``windows`` their aligned windows; ``encode`` turns PIL images into model vectors."""
    rng = np.random.default_rng(seed)
    same_hash: dict[str, set[int]] = {}
    for row, digest in enumerate(hashes):
        same_hash.setdefault(digest, set()).add(row)
    learned = []  # (original row, model vector, windows) of each edited copy
    for row in rng.permutation(len(paths)):
        if len({o for o, *_ in learned}) >= sample:
            break
        if windows[int(row)] is None:
            continue  # moved or damaged since indexing: learn from the others
        variants = copy_variants(open_image(paths[row]), rng)
        for vector, variant in zip(l2_normalize(encode(variants)), variants):
            learned.append((int(row), vector, alignment.signature(variant)))
    if not learned:
        raise ClipxferError("no indexed image could be read to learn what a copy looks like: run 'clipxfer index' again")
    cosines = np.array([vector @ model[o] for o, vector, _ in learned])
    similarity = np.array([copy_similarity(c, w, windows[o]) for c, (o, _, w) in zip(cosines, learned)])
    threshold = float(np.quantile(similarity, 1.0 - COPY_RECALL))
    # Below this model cosine a pair cannot reach the threshold even with identical pixels: skipping it
    # loses no copy, and spares reading its images.
    candidate = (1.0 + PIXEL_WEIGHT) * threshold - PIXEL_WEIGHT
    copy_neighbours, copy_scores = _neighbours(model, np.stack([v for _, v, _ in learned]), NEIGHBOURS + 1)
    margins = []
    for (o, _, w), sim, found, scores in zip(learned, similarity, copy_neighbours, copy_scores):
        rivals = [sim - NO_RIVAL]  # no rival among the candidates: nothing to stand out from
        for m, score in zip(found, scores):
            if m < 0 or int(m) in same_hash[hashes[o]] or score < candidate:
                continue
            rival = copy_similarity(score, w, windows[int(m)])
            # Images closer to the original than the copy is are copies of it the index already holds.
            if copy_similarity(model[m] @ model[o], windows[int(m)], windows[o]) < sim:
                rivals.append(rival)
        margins.append(sim - max(rivals))
    # A copy is at least its original's best match: the margin cut never goes below 0. When most learned
    # copies have no rival, the cut is the largest margin a copy with a rival had.
    with_rival = [m for m in margins if m < NO_RIVAL]
    margin = max(0.0, min(float(np.quantile(margins, 1.0 - MARGIN_RECALL)), max(with_rival, default=0.0)))
    return CopyRule(candidate, threshold, margin, len(learned))


def pairs_above(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
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
    report = DuplicateReport(1.0, 0.0, lookalike_threshold, 0, space)
    if len(ids) < 2:
        return report

    def encode(images):
        encoding = encoder.embed_images(images)
        return encoding.features if features is not None else encoding.embeddings

    model = l2_normalize(features if features is not None else embeddings)
    neighbours, scores = _neighbours(model, model, NEIGHBOURS + 1)
    hashes = [rows[int(i)].sha256 for i in ids]
    windows = Windows([m.path for m in members])
    rule = learn_copy_rule([m.path for m in members], model, hashes, windows, encode, learn_sample, seed)
    report.copy_threshold, report.copy_margin, report.learned_from = rule.threshold, rule.margin, rule.learned_from

    by_hash: dict[str, list[int]] = {}
    for row, digest in enumerate(hashes):
        by_hash.setdefault(digest, []).append(row)
    exact = [(rows_[0], other, 1.0) for rows_ in by_hash.values() if len(rows_) > 1 for other in rows_[1:]]
    same_file = {frozenset((i, j)) for rows_ in by_hash.values() for i in rows_ for j in rows_ if i != j}
    # Candidates: near in the model's space; only their images are read and compared pixel by pixel.
    candidates: dict[frozenset, float] = {}
    for i in range(len(ids)):
        for j, score in zip(neighbours[i], scores[i]):
            pair = frozenset((i, int(j)))
            if j < 0 or j == i or score < rule.candidate or pair in same_file or pair in candidates:
                continue
            candidates[pair] = copy_similarity(score, windows[i], windows[int(j)])
    best: dict[int, list[tuple[float, int]]] = {}
    for pair, sim in candidates.items():
        i, j = tuple(pair)
        best.setdefault(i, []).append((sim, j))
        best.setdefault(j, []).append((sim, i))

    def best_other(row: int, exclude: set[int]) -> float:
        return max((sim for sim, other in best.get(row, []) if other not in exclude), default=-NO_RIVAL)

    copies = []
    for pair, sim in candidates.items():
        i, j = sorted(pair)
        if sim < rule.threshold:
            continue
        exclude = {i, j} | set(by_hash[hashes[i]]) | set(by_hash[hashes[j]])
        if sim - max(best_other(i, exclude), best_other(j, exclude)) >= rule.margin:
            copies.append((i, j, sim))
    report.images_compared = len(windows)
    copied = {frozenset(p[:2]) for p in copies} | same_file
    lookalikes = [p for p in pairs_above(l2_normalize(embeddings), lookalike_threshold)
                  if frozenset(p[:2]) not in copied]
    for tier, pairs in (("exact", exact), ("copy", copies), ("lookalike", lookalikes)):
        for rows_, score in _components(len(ids), pairs):
            report.groups.append(DuplicateGroup(tier, score, [members[r] for r in rows_]))
    report.groups.sort(key=lambda g: (TIERS.index(g.tier), -g.score, str(g.members[0].path)))
    return report
