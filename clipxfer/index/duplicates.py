"""Duplicates in three tiers: exact files, copies of one image, and look-alikes.

- ``exact``: the same bytes (the SHA-256 the index stores).
- ``copy``: the same image resized, recompressed, cropped a little or recoloured. Two files are
  compared by the mean of their model cosine (the encoder's probe features when the index stores them
  -- ``lite``: the image backbone, which keeps instance detail the shared text-image space drops --
  else the embeddings) and the correlation of their grayscale thumbnails. A pair is a copy when that
  similarity is high *and* beats both files' best other match by a margin (a second photo of one
  scene, or another item of one kind, has rivals about as close). Both cut-offs are learned from the
  index itself: a seeded sample of its images is copied with each of those edits
  (:func:`copy_variants`) and encoded with the index's model; the cut-offs keep :data:`COPY_RECALL`
  and :data:`MARGIN_RECALL` of those copies -- so both adapt to the model and the collection. Several copies of one image rival
  each other: only pairs that stand out join a group.
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
from PIL import Image, ImageEnhance, ImageOps

from ..errors import ClipxferError, ImageDecodeError
from ..images import open_image
from . import store

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
            "groups": [g.to_dict() for g in self.groups],
        }
        if keep is not None:
            data["keep"] = keep
            data["delete"] = [str(p) for p in self.delete_list(keep)]
        return data


def _normalised(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


THUMBNAIL_SIDE = 24
NEIGHBOURS = 8


def thumbnail_vector(img: Image.Image) -> np.ndarray:
    """A grayscale THUMBNAIL_SIDE^2 thumbnail, mean-centred and normalised: the pixel layout a copy
    keeps through resizing, recompression and recolouring (brightness and contrast cancel out)."""
    small = ImageOps.grayscale(img.convert("RGB")).resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BOX)
    pixels = np.asarray(small, dtype=np.float32).ravel()
    pixels -= pixels.mean()
    return pixels / max(float(np.linalg.norm(pixels)), 1e-6)


def copy_space(model_vectors: np.ndarray, thumbnails: np.ndarray) -> np.ndarray:
    """Rows whose inner product is the mean of the model cosine and the thumbnail correlation."""
    return np.hstack([_normalised(model_vectors), thumbnails]).astype(np.float32) / np.sqrt(2.0)


@dataclass
class CopyRule:
    """A pair is a copy when its copy-space similarity is at least ``threshold`` and beats both
    files' best *other* match (files with the same bytes aside) by at least ``margin``."""

    threshold: float
    margin: float
    learned_from: int


def _best_other(neighbours, scores, i: int, exclude: set[int]) -> float:
    """Row ``i``'s best match outside ``exclude`` among its nearest rows (-1 when none)."""
    for m, score in zip(neighbours[i], scores[i]):
        if m >= 0 and int(m) not in exclude:
            return float(score)
    return -1.0


def _neighbours(vectors: np.ndarray, queries: np.ndarray, k: int):
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    scores, ids = flat.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(vectors)))
    return ids, scores


def learn_copy_rule(
    paths: list[Path], vectors: np.ndarray, hashes: list[str], neighbours, scores,
    encode: Callable[[list[Image.Image]], np.ndarray], sample: int = LEARN_SAMPLE, seed: int = 0,
) -> CopyRule:
    """The copy rule from edited copies (:func:`copy_variants`) of up to ``sample`` of the images
    (seeded). ``vectors`` are the copy-space rows of ``paths`` (see :func:`copy_space`), ``hashes``
    their SHA-256, ``neighbours``/``scores`` each row's nearest rows; ``encode`` turns PIL images
    into model vectors."""
    rng = np.random.default_rng(seed)
    same_hash: dict[str, set[int]] = {}
    for row, digest in enumerate(hashes):
        same_hash.setdefault(digest, set()).add(row)
    originals, copies = [], []
    for row in rng.permutation(len(paths)):
        if len(originals) >= sample:
            break
        try:
            original = open_image(paths[row])
        except (ImageDecodeError, OSError):
            continue  # moved or damaged since indexing: learn from the others
        variants = copy_variants(original, rng)
        copies.append(copy_space(encode(variants), np.stack([thumbnail_vector(v) for v in variants])))
        originals.append(int(row))
    if not originals:
        raise ClipxferError("no indexed image could be read to learn what a copy looks like: run 'clipxfer index' again")
    similarity = [c @ vectors[o] for o, c in zip(originals, copies)]
    flat_similarity = np.concatenate(similarity)
    threshold = float(np.quantile(flat_similarity, 1.0 - COPY_RECALL))
    copy_neighbours, copy_scores = _neighbours(vectors, np.vstack(copies), NEIGHBOURS + 1)
    margins = []
    position = 0
    for o, sims in zip(originals, similarity):
        for sim in sims:
            # Rivals of a learned copy: indexed images other than its original, leaving out those closer
            # to the original than the copy is (copies of it the index already holds).
            rivals = {int(m) for m in copy_neighbours[position] if m >= 0 and float(vectors[m] @ vectors[o]) >= sim}
            margins.append(sim - _best_other(copy_neighbours, copy_scores, position, rivals | same_hash[hashes[o]]))
            position += 1
    # A copy is at least its original's best match: the margin cut never goes below 0.
    margin = max(0.0, float(np.quantile(margins, 1.0 - MARGIN_RECALL)))
    return CopyRule(threshold, margin, len(flat_similarity))


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

    thumbnails = np.zeros((len(ids), THUMBNAIL_SIDE**2), dtype=np.float32)
    for row, member in enumerate(members):
        try:
            thumbnails[row] = thumbnail_vector(open_image(member.path, draft_size=4 * THUMBNAIL_SIDE))
        except (ImageDecodeError, OSError):
            pass  # unreadable now: compared by its stored vector only
    vectors = copy_space(features if features is not None else embeddings, thumbnails)
    neighbours, scores = _neighbours(vectors, vectors, NEIGHBOURS + 1)
    hashes = [rows[int(i)].sha256 for i in ids]
    rule = learn_copy_rule([m.path for m in members], vectors, hashes, neighbours, scores, encode, learn_sample, seed)
    report.copy_threshold, report.copy_margin, report.learned_from = rule.threshold, rule.margin, rule.learned_from

    by_hash: dict[str, list[int]] = {}
    for row, digest in enumerate(hashes):
        by_hash.setdefault(digest, []).append(row)
    exact = [(rows_[0], other, 1.0) for rows_ in by_hash.values() if len(rows_) > 1 for other in rows_[1:]]
    same_file = {frozenset((i, j)) for rows_ in by_hash.values() for i in rows_ for j in rows_ if i != j}
    copies = []
    for i in range(len(ids)):
        for j, score in zip(neighbours[i], scores[i]):
            if j <= i or score < rule.threshold or frozenset((i, int(j))) in same_file:
                continue
            exclude = {i, int(j)} | set(by_hash[hashes[i]]) | set(by_hash[hashes[j]])
            best_other = max(_best_other(neighbours, scores, i, exclude), _best_other(neighbours, scores, int(j), exclude))
            if score - best_other >= rule.margin:
                copies.append((i, int(j), float(score)))
    copied = {frozenset(p[:2]) for p in copies} | same_file
    lookalikes = [p for p in pairs_above(_normalised(embeddings), lookalike_threshold)
                  if frozenset(p[:2]) not in copied]
    for tier, pairs in (("exact", exact), ("copy", copies), ("lookalike", lookalikes)):
        for rows_, score in _components(len(ids), pairs):
            report.groups.append(DuplicateGroup(tier, score, [members[r] for r in rows_]))
    report.groups.sort(key=lambda g: (TIERS.index(g.tier), -g.score, str(g.members[0].path)))
    return report
