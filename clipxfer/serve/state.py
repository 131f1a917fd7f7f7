"""What the routes share: :class:`ServeState`, the index (one connection per thread), its item
catalog, the heads and detector, the thumbnail and text-query caches, the labelling session and
the request metrics."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import ClipxferError
from .config import ServeConfig
from .labels import LABEL_FILE, LabelStore
from .session import Catalog, LabellingSession
from .thumbnails import ThumbnailCache

#: Text query embeddings kept in memory (on top of the on-disk text cache).
TEXT_CACHE_SIZE = 4096
READ_ONLY_LABELS = ("labels are read-only under --workers above 1 (each worker process would hold its own copy); "
                    "start clipxfer serve with --workers 1 to label")


class NotFound(ClipxferError):
    """An id or name the server does not know (answered with 404)."""


def load_detector(path: Path, model_id: str):
    """A saved anomaly detector for ``model_id``, through :mod:`clipxfer.anomaly` (imported only
    when a detector is asked for)."""
    try:
        from ..anomaly import load_detector as load
    except ImportError:
        raise ClipxferError(
            f"{path}: this clipxfer has no anomaly detection (clipxfer.anomaly); start without --detector"
        ) from None
    return load(path, model_id=model_id)


def request_metrics(registry):
    """The Prometheus request counter and latency histogram, by route (recorded by
    :class:`~clipxfer.serve.middleware.GuardMiddleware`)."""
    from prometheus_client import Counter, Histogram

    requests = Counter("clipxfer_requests_total", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram(
        "clipxfer_request_seconds", "HTTP request latency", ["method", "route"], registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    return requests, latency


class ServeState:
    """Everything one app serves: the index (per thread), its snapshot, heads, detector, labels, metrics."""

    def __init__(self, config: ServeConfig):
        import faiss
        import torch
        from prometheus_client import CollectorRegistry

        from ..heads import load_head
        from ..index import Index, resolve_index_path

        # Requests run in parallel threads, each with one query or image: intra-op threads add
        # little but their wake-ups, which on a busy 2-core machine cost 20-30 ms per FAISS search
        # (1.4 ms single-threaded) and 1-2 s per lite text or image encoding (90-150 ms) (RESULTS.md).
        faiss.omp_set_num_threads(1)
        torch.set_num_threads(1)
        self.config = config
        self.index_path = resolve_index_path(config.index)
        with Index.open(self.index_path) as idx:
            self.model_id = idx.model_id
            self.encoder = idx.encoder(device=config.device)
            self.catalog = Catalog(*idx.load_items())
        self.heads = {}
        for path in config.heads:
            name = Path(path).name.removesuffix(".safetensors")
            if name in self.heads or name == "labelling":
                raise ClipxferError(f"{path}: two heads named '{name}'; rename one file")
            self.heads[name] = load_head(path, model_id=self.model_id)
        self.detector = load_detector(Path(config.detector), self.model_id) if config.detector else None
        self.thumbnails = ThumbnailCache(self.index_path)
        labels_path = Path(config.labels) if config.labels else self.index_path / LABEL_FILE
        store = LabelStore(labels_path, read_only=READ_ONLY_LABELS if config.labels_read_only else None)
        self.session = LabellingSession(self.catalog, self.encoder, store, config.label_method, config.refit_every)
        self._local = threading.local()
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.requests_total, self.latency = request_metrics(self.registry)

    def index(self):
        """This thread's open Index (the FAISS vectors load on the first search)."""
        from ..index import Index

        idx = getattr(self._local, "index", None)
        if idx is None:
            idx = self._local.index = Index.open(self.index_path)
        return idx

    def item_path(self, item_id: int) -> Path:
        """The path of indexed image ``item_id``; NotFound (404) for an unknown id."""
        try:
            return self.catalog.path(item_id)
        except ClipxferError as exc:
            raise NotFound(str(exc)) from None

    def remembered_text_vector(self, text: str) -> np.ndarray | None:
        """The query's embedding if it is in memory (no I/O: safe to call in the event loop)."""
        with self._text_lock:
            vector = self._text_cache.get(text)
            if vector is not None:
                self._text_cache.move_to_end(text)
            return vector

    def text_vector(self, text: str) -> np.ndarray:
        """The query's embedding: memory, then the on-disk text cache, then the text encoder."""
        from ..index.textcache import cached_text_embeddings

        vector = self.remembered_text_vector(text)
        if vector is not None:
            return vector
        vector = cached_text_embeddings(self.encoder, [text])[0]
        with self._text_lock:
            self._text_cache[text] = vector
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return vector

    def close(self) -> None:
        """Stop the labelling session and remove temporary thumbnails."""
        self.session.close()
        self.thumbnails.close()
