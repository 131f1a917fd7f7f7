"""The ``Index`` class: open an index folder and search it (text, image, vectors), find near
duplicates, describe it; :meth:`Index.update` creates or refreshes one (see :mod:`clipxfer.index.writer`).
The folder layout and why a crash at any moment leaves a loadable index: :mod:`clipxfer.index.layout`.

Readers (search, info) open SQLite read-only and write nothing when the folder is not
writable, so an index on read-only media or owned by another user can still be searched. A
damaged database is reported in one line, with ``clipxfer index --rebuild`` to rebuild it from
the images (keeping every row that can still be read).
"""

from __future__ import annotations

import math
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..encoders.pipeline import DEFAULT_BATCH_SIZE
from ..errors import ClipxferError
from . import faiss_cache, filtered, store, vectors
from .errors import model_mismatch, rebuild_hint, reports_damage, sqlite_error
from .filters import NO_FILTERS, Filters
from .layout import DB_FILE, resolve_index_path
from .lock import writer_pid
from .query import parse_query, query_vector
from .relevance import NULL_SAMPLE, check_min_relevance, query_nulls
from .results import DuplicatePair, Hit, UpdateReport
from .writer import update_index

if TYPE_CHECKING:
    from ..encoders.base import Encoder, ImageEncoding


def _check_search_options(k, min_score) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClipxferError(f"-k {k}: the number of results must be a whole number of at least 1")
    if min_score is not None and not math.isfinite(min_score):
        raise ClipxferError(f"--min-score {min_score}: give a number, a cosine similarity between -1 and 1")


def _scores_possible(index, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> bool:
    """False when FAISS returned scores that unit vectors cannot have (a damaged cache)."""
    found = ids >= 0
    limit = vectors.score_bound(index) * np.linalg.norm(queries, axis=1, keepdims=True)
    return bool(np.all(np.isfinite(scores[found])) and np.all(np.abs(scores) <= limit, where=found))


class Index:
    """An indexed image folder: search by text or image, near duplicates, stored vectors.

    Open an existing index with :meth:`open`; create or refresh one with :meth:`update`.
    """

    def __init__(self, folder: Path, conn, meta: dict[str, str]):
        self.path = Path(folder)
        self._conn = conn
        self._meta = meta
        self._faiss = None
        self._null_sample: np.ndarray | None = None  # stored vectors the relevance null is fitted on
        self._cache_generation: str | None = None  # set when the FAISS file on disk is current

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> "Index":
        """Open an existing index for reading (``None``: the default location)."""
        folder = resolve_index_path(path)
        if not (folder / DB_FILE).is_file():
            raise ClipxferError(f"no index at {folder}: build one with 'clipxfer index DIR --index {folder}'")
        try:
            conn = store.connect_readonly(folder / DB_FILE)
        except sqlite3.Error as exc:
            raise sqlite_error(folder, exc) from None
        try:
            meta = store.get_metadata(conn) if store.has_schema(conn) else None
            if meta is None or "model_id" not in meta:
                conn.close()
                pid = writer_pid(folder)
                if pid is not None:
                    raise ClipxferError(
                        f"index {folder} is being built by another process (pid {pid}): "
                        "try again when its first batch is saved"
                    )
                if meta is None:
                    raise ClipxferError(
                        f"index {folder} is empty or damaged (index.sqlite has no tables); nothing in it can be "
                        f"recovered: rebuild it with {rebuild_hint(folder)}"
                    )
                raise ClipxferError(
                    f"index {folder} is incomplete (its first run stopped early): run 'clipxfer index' again"
                )
        except sqlite3.Error as exc:
            conn.close()
            raise sqlite_error(folder, exc) from None
        return cls(folder, conn, meta)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- properties ----------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """Id of the encoder every vector in this index was made with."""
        return self._meta["model_id"]

    @property
    def model_spec(self) -> str:
        """The ``--model`` value that rebuilds :attr:`model_id`'s encoder."""
        from ..encoders.ids import spec_for_id

        return self._meta.get("model_spec") or spec_for_id(self.model_id)

    @property
    def root(self) -> Path:
        """The indexed folder (absolute)."""
        return Path(self._meta["root"])

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def index_type(self) -> str:
        """Requested index type: flat, hnsw, ivf or auto."""
        return self._meta["index_type"]

    @reports_damage
    def __len__(self) -> int:
        return store.count(self._conn)

    @reports_damage
    def sha256_of(self, item_id: int) -> str | None:
        """SHA-256 of the bytes item ``item_id`` was indexed from (None for an unknown id)."""
        row = self._conn.execute("SELECT sha256 FROM items WHERE id = ?", (int(item_id),)).fetchone()
        return None if row is None else row[0]

    # -- the FAISS cache -----------------------------------------------------------------
    def _vectors(self):
        """The FAISS index for the committed rows: the saved file if current, else rebuilt."""
        if self._faiss is None:
            self._faiss = self._load_or_rebuild()
        return self._faiss

    def _load_or_rebuild(self, trust_file: bool = True):
        """The saved FAISS index when current, else one rebuilt from SQLite (see :mod:`.faiss_cache`)."""
        index, self._cache_generation = faiss_cache.load_or_rebuild(self.path, self._conn, self.dim, trust_file)
        return index

    # -- reading -------------------------------------------------------------------------
    @reports_damage
    def load_encoding(self) -> tuple[list[Path], "ImageEncoding"]:
        """Absolute paths and stored vectors of all items, by id (features = embeddings when
        the encoder has no separate probe features)."""
        _, paths, encoding = self.load_items()
        return paths, encoding

    def load_items(self) -> tuple[np.ndarray, list[Path], "ImageEncoding"]:
        """Row ids (the ``Hit.id`` values), absolute paths and stored vectors of all items, by id,
        in one snapshot."""
        from ..encoders.base import ImageEncoding

        feature_dim = int(self._meta["feature_dim"]) if self._meta.get("store_features") == "1" else None
        ids, paths, embeddings, features = store.vectors(self._conn, self.dim, feature_dim)
        embeddings = embeddings.copy()
        encoding = ImageEncoding(embeddings, embeddings if features is None else features)
        return ids, [self.root / p for p in paths], encoding

    def encoder(self, model: "str | Encoder | None" = None, device: str | None = None, precision: str | None = None):
        """The encoder matching this index; ``model`` (a spec or encoder) must be that model."""
        from ..encoders.registry import cached_encoder, precision_for_id

        if model is None or isinstance(model, str):
            encoder = cached_encoder(model or self.model_spec, device, precision_for_id(self.model_id, precision))
        else:
            encoder = model
        if encoder.id != self.model_id:
            raise model_mismatch(self.path, self.model_id, self.model_spec, encoder.id)
        return encoder

    @reports_damage
    def allowed_ids(self, filters: Filters | None) -> np.ndarray | None:
        """Ids of the items passing ``filters`` (None when there is no filter)."""
        if filters is None or not filters.active:
            return None
        return filters.allowed_ids(self._conn, self.root)

    def _relevance_sample(self) -> np.ndarray:
        if self._null_sample is None:
            self._null_sample = store.sample_vectors(self._conn, self.dim, NULL_SAMPLE)
        return self._null_sample

    @reports_damage
    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        min_score: float | None = None,
        filters: Filters | None = None,
        min_relevance: float | None = None,
    ) -> list[list[Hit]]:
        """Top-``k`` hits for each query row (unit vectors in this index's space).

        ``filters`` restrict the search to the files passing them (inside the search: ``k`` hits
        come back whenever ``k`` files pass); ``min_relevance`` keeps only hits whose score stands
        out from the query's own scores over the index (see :mod:`clipxfer.index.relevance`) and
        sets each hit's ``relevance``."""
        _check_search_options(k, min_score)
        min_relevance = check_min_relevance(min_relevance)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.shape[1] != self.dim:
            raise ClipxferError(f"query vectors have {queries.shape[1]} dimensions, index {self.path} has {self.dim}")
        index = self._vectors()
        allowed = self.allowed_ids(filters)
        if index.ntotal == 0 or (allowed is not None and len(allowed) == 0):
            return [[] for _ in queries]
        if allowed is None:
            scores, ids = vectors.search(index, queries, k)
            if not _scores_possible(index, queries, scores, ids):
                # Only a damaged FAISS file gives these: rebuild it from SQLite and search again.
                self._faiss = index = self._load_or_rebuild(trust_file=False)
                scores, ids = vectors.search(index, queries, k)
        else:
            scores, ids = filtered.search_allowed(index, self._conn, self.dim, queries, k, allowed)
        nulls = None
        if min_relevance is not None:
            total = index.ntotal if allowed is None else len(allowed)
            nulls = query_nulls(queries, self._relevance_sample(), total)
        paths = store.paths_for(self._conn, {int(i) for i in ids.ravel() if i >= 0})
        results = []
        for row, (row_scores, row_ids) in enumerate(zip(scores, ids)):
            found = [(float(s), int(i)) for s, i in zip(row_scores, row_ids) if i >= 0 and int(i) in paths]
            relevance = [None] * len(found) if nulls is None else nulls[row].relevance([s for s, _ in found])
            hits = []
            for (score, item_id), level in zip(found, relevance):
                if min_score is not None and score < min_score:
                    break
                if min_relevance is not None and level < min_relevance:
                    break
                level = None if level is None else float(level)
                hits.append(Hit(len(hits) + 1, score, self.root / paths[item_id], item_id, level))
            results.append(hits)
        return results

    def search(
        self,
        query: str | None = None,
        k: int = 10,
        model=None,
        images=(),
        filters: Filters | None = None,
        min_score: float | None = None,
        min_relevance: float | None = None,
        device: str | None = None,
    ) -> list[Hit]:
        """Images best matching a query in the grammar of :mod:`clipxfer.index.query`
        (``2*"red dress" - "long sleeves"``), after ``images`` (paths, PIL images or arrays, each
        one term of weight 1); the query may then start with + or -. Text embeddings are cached on disk:
        a query of cached texts only loads no model, new texts only the text tower (unless images need
        the whole encoder anyway)."""
        from .query import Term
        from .textcache import cached_texts

        images = list(images)
        if not images and (query is None or not str(query).strip()):
            raise ClipxferError("the search query is empty: give some words describing the images to find")
        _check_search_options(k, min_score)
        check_min_relevance(min_relevance)
        sources = {(str(image) if isinstance(image, (str, os.PathLike)) else f"<image {i + 1}>"): image
                   for i, image in enumerate(images)}
        terms = [Term(1.0, "image", name) for name in sources]
        if query is not None and str(query).strip():
            terms += parse_query(str(query))  # after images, a leading sign is optional: "- blurry"
        needs_images = any(term.kind == "image" for term in terms)
        if isinstance(model, str) and model != self.model_spec and not needs_images:
            self.text_encoder(model, device)  # another name for this model, or a wrong one: say so first

        def encode_texts(texts: list[str]) -> np.ndarray:
            if needs_images or (model is not None and not isinstance(model, str)):
                return self.encoder(model, device=device).encode_texts(texts)
            return self.text_encoder(model, device).encode_texts(texts)

        def encode_image(value: str) -> np.ndarray:
            if value not in sources and not Path(value).is_file():
                raise ClipxferError(f"image:{value}: no such image file; give the path of an image to search by")
            return self.encoder(model, device=device).encode_images([sources.get(value, Path(value))])[0]

        vector = query_vector(terms, lambda texts: cached_texts(self.model_id, self.dim, texts, encode_texts),
                              encode_image)
        return self.search_vectors(vector, k, min_score, filters or NO_FILTERS, min_relevance)[0]

    def text_encoder(self, model: str | None = None, device: str | None = None, precision: str | None = None):
        """This index's encoder loaded for text queries only (see
        :func:`clipxfer.encoders.registry.load_text_encoder`); ``model`` must name this index's model."""
        from ..encoders.ids import weights_id
        from ..encoders.registry import cached_text_encoder, precision_for_id

        encoder = cached_text_encoder(model or self.model_spec, device, precision_for_id(self.model_id, precision))
        if weights_id(encoder.id) != weights_id(self.model_id):
            raise model_mismatch(self.path, self.model_id, self.model_spec, encoder.id)
        return encoder

    def search_text(
        self, query: str, k: int = 10, model=None, min_score: float | None = None, device: str | None = None
    ) -> list[Hit]:
        """Images best matching a text query. Query embeddings are cached on disk: a repeated query
        loads no model, a new one only the text tower. ``model``: an encoder, or a spec that must
        name this index's model (checked by loading it, unless it is the index's own spec)."""
        from .textcache import cached_texts

        if not isinstance(query, str) or not query.strip():
            raise ClipxferError("the search query is empty: give some words describing the images to find")
        _check_search_options(k, min_score)
        if model is not None and not isinstance(model, str):
            encode = self.encoder(model).encode_texts
        else:
            if model not in (None, self.model_spec):
                self.text_encoder(model, device)  # another name for this model, or a wrong one: say so first

            def encode(texts):
                return self.text_encoder(model, device).encode_texts(texts)

        return self.search_vectors(cached_texts(self.model_id, self.dim, [query], encode), k, min_score)[0]

    def search_image(self, image, k: int = 10, model=None, min_score: float | None = None) -> list[Hit]:
        """Images most similar to ``image`` (a path, PIL image or uint8 array)."""
        _check_search_options(k, min_score)
        encoder = self.encoder(model)
        return self.search_vectors(encoder.encode_images([image]), k, min_score)[0]

    @reports_damage
    def duplicates(self, threshold: float = 0.95) -> list[DuplicatePair]:
        """Pairs of items with cosine similarity >= ``threshold``, most similar first (exact)."""
        from .duplicates import pairs_above

        ids, paths, embeddings, _ = store.vectors(self._conn, self.dim)
        pairs = [DuplicatePair(score, self.root / paths[i], self.root / paths[j])
                 for i, j, score in pairs_above(embeddings, threshold)]
        pairs.sort(key=lambda p: (-p.score, str(p.a), str(p.b)))
        return pairs

    @reports_damage
    def duplicate_groups(self, threshold: float = 0.95, model=None, learn_sample: int | None = None, seed: int = 0):
        """Exact files, copies (threshold learned from edited copies of this index's images, encoded
        with ``model``) and look-alikes (embedding similarity >= ``threshold``) as a
        :class:`~clipxfer.index.duplicates.DuplicateReport` (see :mod:`clipxfer.index.duplicates`)."""
        from .duplicates import LEARN_SAMPLE, find_duplicates

        feature_dim = int(self._meta["feature_dim"]) if self._meta.get("store_features") == "1" else None
        return find_duplicates(self._conn, self.root, self.dim, feature_dim, self.encoder(model), float(threshold),
                               LEARN_SAMPLE if learn_sample is None else learn_sample, seed)

    @reports_damage
    def info(self) -> dict:
        """Model id, count, dimensions, index type, bytes on disk, last update (stable keys)."""
        self._meta = store.get_metadata(self._conn)
        # A current cache file names its own type; only an old or stale one needs faiss to tell.
        factory = faiss_cache.current_factory(self.path, self._conn) or vectors.describe(self._vectors())

        def iso(stamp: str | None):
            return datetime.fromtimestamp(float(stamp), timezone.utc).isoformat(timespec="seconds") if stamp else None

        return {
            "index": str(self.path),
            "root": str(self.root),
            "model_id": self.model_id,
            "model_spec": self.model_spec,
            "count": len(self),
            "dim": self.dim,
            "feature_dim": int(self._meta["feature_dim"]),
            "index_type": self.index_type,
            "faiss": factory,
            "bytes_on_disk": sum(p.stat().st_size for p in self.path.iterdir() if p.is_file()),
            "created": iso(self._meta.get("created")),
            "updated": iso(self._meta.get("updated")),
        }

    # -- writing -------------------------------------------------------------------------
    @classmethod
    def update(
        cls,
        root: str | os.PathLike,
        model: "str | Encoder | None" = None,
        path: str | os.PathLike | None = None,
        index_type: str | None = None,
        workers: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        fail_fast: bool = False,
        progress: bool = False,
        device: str | None = None,
        precision: str | None = None,
        rebuild: bool = False,
    ) -> UpdateReport:
        """Create or refresh the index at ``path`` for the images below ``root``.

        New and changed files are encoded, deleted ones removed, moved or renamed ones found by
        content hash and kept without re-encoding. Unreadable files and folders are reported in
        ``report.failed`` (with ``fail_fast``: the run stops with a ClipxferError after saving
        what it did); the indexed images of a folder that cannot be read are kept. ``model``
        defaults to the index's own model, or the default model for a new index; another model
        than the index's is refused. ``rebuild`` starts a new database from the rows of the old
        one that can still be read (for a damaged index), then updates it as usual.
        """
        return update_index(
            root,
            model=model,
            path=path,
            index_type=index_type,
            workers=workers,
            batch_size=batch_size,
            fail_fast=fail_fast,
            progress=progress,
            device=device,
            precision=precision,
            rebuild=rebuild,
        )
