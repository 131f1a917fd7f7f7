"""The FastAPI app: search, classify, anomaly scores, index info, the labelling loop, metrics,
and the web page (``static/``), over the Python API only.

Threads: an :class:`~clipxfer.index.Index` holds a SQLite connection that belongs to the thread
that opened it, so index calls (FAISS search, info) run in the event-loop thread, where they take
about a millisecond; decoding, encoding and fitting run in the thread pool.
"""

from __future__ import annotations

import hmac
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Body, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import ClipxferError, ImageDecodeError
from .labels import LABEL_FILE, LabelStore
from .session import Catalog, LabellingSession
from .thumbnails import LARGE_SIZE, ThumbnailCache, render_jpeg

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_K = 1000
TOKEN_COOKIE = "clipxfer_token"
#: Text query embeddings kept in memory (on top of the on-disk text cache).
TEXT_CACHE_SIZE = 4096
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; object-src 'none'; frame-ancestors 'none'",
}


@dataclass
class ServeConfig:
    """What ``clipxfer serve`` was started with."""

    index: Path | None = None
    heads: list[Path] = field(default_factory=list)
    detector: Path | None = None
    token: str | None = None
    labels: Path | None = None
    label_method: str = "probe"
    refit_every: int = 3
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    device: str | None = None


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


def detector_score(detector, encoder, image) -> dict[str, Any]:
    """``{score, decision (ok|defect), threshold}`` of one decoded image, like a row of
    ``clipxfer anomaly score --json``."""
    from ..anomaly.patches import encode_dense

    result = detector.score(encode_dense(encoder, [image]))
    threshold = float(detector.threshold)
    return {
        "score": round(float(result.scores[0]), 6),
        "decision": "defect" if bool(detector.decide(result.scores)[0]) else "ok",
        "threshold": threshold if np.isfinite(threshold) else None,
    }


def conformal_set(head, probs: np.ndarray, alpha: float, where: str) -> dict[str, Any] | None:
    """The conformal prediction set of one image at level ``alpha`` (``{prediction_set, conformal}``)
    when the head carries a calibration (``config["calibration"]``, stored by the training
    commands), else None. Uses :mod:`clipxfer.calibrate.sets`, as ``predict --conformal`` does."""
    if not head.config.get("calibration"):
        return None
    try:
        from ..calibrate.sets import conformal_sets, head_calibration
    except ImportError:  # a clipxfer without classifier calibration
        return None
    sets = conformal_sets(probs[None], head_calibration(head, where), alpha)
    return {"prediction_set": sets.set_names(head.classnames)[0], "conformal": sets.summary()}


class NotFound(ClipxferError):
    """An id or name the server does not know (answered with 404)."""


class ServeState:
    """Everything one app serves: the index (per thread), its snapshot, heads, detector, labels."""

    def __init__(self, config: ServeConfig):
        import faiss
        import torch

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
        self.session = LabellingSession(self.catalog, self.encoder, LabelStore(labels_path), config.label_method,
                                        config.refit_every)
        self._local = threading.local()
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_lock = threading.Lock()

    def index(self):
        """This thread's open Index (the FAISS vectors load on the first search)."""
        from ..index import Index

        idx = getattr(self._local, "index", None)
        if idx is None:
            idx = self._local.index = Index.open(self.index_path)
        return idx

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
        self.session.close()


def unreadable_is_404(make, item_id_or_path, *args):
    """``make(...)``, with an indexed file that no longer decodes (moved, deleted, damaged since
    indexing) reported as 404 rather than as a bad request."""
    try:
        return make(item_id_or_path, *args)
    except ImageDecodeError as exc:
        raise NotFound(f"indexed image can no longer be read: {exc.reason}") from None


def _hits_json(hits) -> list[dict]:
    """``search --json`` rows plus the item ``id`` (for thumbnails and similar-image links)."""
    return [{**hit.to_dict(), "id": hit.id, "name": hit.path.name} for hit in hits]


def _check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise ClipxferError(f"k must be between 1 and {MAX_K}, not {k}")
    return k


async def _read_upload(file: UploadFile, limit: int) -> bytes:
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload is over the {limit:,}-byte limit")
    if not data:
        raise HTTPException(400, "empty upload: send an image file")
    return data


def decode_upload(data: bytes):
    """Uploaded bytes -> RGB PIL image through the indexer's safe decoder (size, bombs, corrupt
    files). Raises ImageDecodeError naming 'upload', never the temporary file."""
    from ..images import open_image

    with tempfile.TemporaryDirectory(prefix="clipxfer-upload-") as folder:
        path = Path(folder) / "upload"
        path.write_bytes(data)
        try:
            return open_image(path)
        except ImageDecodeError as exc:
            raise ImageDecodeError("upload", exc.reason) from None


def _metrics(registry):
    from prometheus_client import Counter, Histogram

    requests = Counter("clipxfer_requests_total", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram(
        "clipxfer_request_seconds", "HTTP request latency", ["method", "route"], registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    return requests, latency


def create_app(config: ServeConfig) -> FastAPI:
    """The app for ``config`` (the index, heads and detector are loaded now; errors are ClipxferError)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    state = ServeState(config)
    registry = CollectorRegistry()
    requests_total, latency = _metrics(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.index().search_vectors(np.zeros((1, state.encoder.dim), np.float32), 1)  # load FAISS now
        yield
        state.close()

    app = FastAPI(title="clipxfer", version=__version__, lifespan=lifespan,
                  description="Search, classify and label an image index made by clipxfer.")
    app.state.clipxfer = state

    # -- middleware: token, size cap, headers, metrics -----------------------------------
    # Pure ASGI rather than @app.middleware: that wrapper runs every request through an extra
    # task and stream, a cost every request pays.
    app.add_middleware(GuardMiddleware, config=config, requests_total=requests_total, latency=latency)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ClipxferError)
    async def bad_input(request: Request, exc: ClipxferError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def item_path(item_id: int) -> Path:
        try:
            return state.catalog.path(item_id)
        except ClipxferError as exc:
            raise NotFound(str(exc)) from None

    # -- search ---------------------------------------------------------------------------
    @app.get("/api/health")
    async def health():
        """Liveness: the model and the number of indexed images."""
        return {"status": "ok", "model": state.model_id, "count": len(state.catalog), "version": __version__}

    @app.get("/api/info")
    async def info():
        """The same object as ``clipxfer info --json``."""
        return state.index().info()

    @app.get("/api/search")
    async def search(q: str = Query(..., min_length=1, max_length=1000), k: int = 20, min_score: float | None = None):
        """Images matching a text query: ``search --json`` rows plus ``id`` and ``name``."""
        _check_k(k)
        vector = state.remembered_text_vector(q)
        if vector is None:
            vector = await run_in_threadpool(state.text_vector, q)
        return _hits_json(state.index().search_vectors(vector, k, min_score)[0])

    @app.post("/api/search/image")
    async def search_image(file: UploadFile = File(...), k: int = 20, min_score: float | None = None):
        """Images similar to an uploaded image."""
        _check_k(k)
        data = await _read_upload(file, config.max_upload_bytes)
        image = await run_in_threadpool(decode_upload, data)
        encoding = await run_in_threadpool(state.encoder.embed_images, [image])
        return _hits_json(state.index().search_vectors(encoding.embeddings, k, min_score)[0])

    @app.get("/api/similar/{item_id}")
    async def similar(item_id: int, k: int = 20):
        """Indexed images nearest to indexed image ``item_id`` (itself left out)."""
        _check_k(k)
        item_path(item_id)
        vector = state.catalog.encoding.embeddings[state.catalog.row(item_id)]
        hits = [h for h in state.index().search_vectors(vector, k + 1)[0] if h.id != item_id][:k]
        rows = _hits_json(hits)
        for rank, row in enumerate(rows, 1):
            row["rank"] = rank
        return rows

    @app.get("/api/items/{item_id}")
    async def item(item_id: int):
        """Path and name of an indexed image."""
        path = item_path(item_id)
        return {"id": item_id, "path": str(path), "name": path.name}

    # -- images, by id only ---------------------------------------------------------------
    @app.get("/api/thumb/{item_id}")
    async def thumbnail(item_id: int):
        """A cached JPEG thumbnail of indexed image ``item_id``."""
        path = item_path(item_id)
        thumb = await run_in_threadpool(unreadable_is_404, state.thumbnails.thumbnail, item_id, path)
        return FileResponse(thumb, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})

    @app.get("/api/image/{item_id}")
    async def image(item_id: int):
        """Indexed image ``item_id`` as a JPEG at most 1024 pixels on a side."""
        path = item_path(item_id)
        data = await run_in_threadpool(unreadable_is_404, render_jpeg, path, LARGE_SIZE)
        return Response(data, media_type="image/jpeg")

    # -- heads and detector ---------------------------------------------------------------
    @app.get("/api/heads")
    async def heads():
        """Loaded heads (and ``labelling``, the head of the labelling loop once fitted)."""
        loaded = dict(state.heads)
        if state.session.head is not None:
            loaded["labelling"] = state.session.head
        return [{"name": n, "method": h.method, "classes": h.classnames, "model": h.model_id}
                for n, h in loaded.items()]

    @app.post("/api/classify")
    async def classify(file: UploadFile = File(...), head: str | None = None, k: int = 5, alpha: float = 0.1):
        """Classify an upload with a loaded head: ``predict --json`` plus ``top_k`` and, for a
        calibrated head, the conformal ``prediction_set`` at level ``alpha`` (coverage >= 1 - alpha)."""
        if head is None:
            if len(state.heads) != 1:
                raise ClipxferError(f"name a head with ?head= (loaded: {', '.join(state.heads) or 'none'})")
            head = next(iter(state.heads))
        if head == "labelling":
            chosen = state.session.head_for_export()
        elif head in state.heads:
            chosen = state.heads[head]
        else:
            raise NotFound(f"no head named '{head}' (loaded: {', '.join(state.heads) or 'none'}; start with --head)")
        _check_k(k)
        data = await _read_upload(file, config.max_upload_bytes)
        image = await run_in_threadpool(decode_upload, data)
        encoding = await run_in_threadpool(state.encoder.embed_images, [image])
        probs = chosen.predict_proba(encoding)[0]
        order = np.argsort(-probs)[: min(k, len(probs))]
        name = Path(file.filename or "upload").name
        prediction = {
            "path": name,
            "label": chosen.classnames[order[0]],
            "probability": float(probs[order[0]]),
            "probabilities": {n: float(p) for n, p in zip(chosen.classnames, probs)},
            "top_k": [{"label": chosen.classnames[i], "probability": float(probs[i])} for i in order],
        }
        conformal = conformal_set(chosen, probs, alpha, f"head '{head}'")
        if conformal is not None:
            prediction["prediction_set"] = conformal["prediction_set"]
        result = {"head": head, "method": chosen.method, "model": chosen.model_id, "classes": chosen.classnames,
                  "predictions": [prediction]}
        if conformal is not None:
            result["conformal"] = conformal["conformal"]
        return result

    @app.post("/api/anomaly")
    async def anomaly(file: UploadFile = File(...)):
        """Anomaly score of an upload with the loaded detector (409 when none is loaded)."""
        if state.detector is None:
            raise HTTPException(409, "no detector loaded: start clipxfer serve with --detector DET.safetensors")
        data = await _read_upload(file, config.max_upload_bytes)
        image = await run_in_threadpool(decode_upload, data)
        result = await run_in_threadpool(detector_score, state.detector, state.encoder, image)
        return {"path": Path(file.filename or "upload").name, **result}

    # -- labelling ------------------------------------------------------------------------
    @app.get("/api/labels")
    async def labels_state():
        """Classes, labels by item id, method, and the latest cross-validated evaluation."""
        return state.session.state()

    @app.put("/api/labels/classes")
    async def set_classes(classes: list[str] = Body(..., embed=True)):
        """Name the classes (in order: key 1 is the first)."""
        await run_in_threadpool(state.session.set_classes, classes)
        return state.session.state()

    @app.put("/api/labels/method")
    async def set_method(method: str = Body(..., embed=True)):
        """``probe`` or ``tip``: the head the loop refits."""
        state.session.set_method(method)
        return state.session.state()

    @app.put("/api/labels/{item_id}")
    async def set_label(item_id: int, label: str | None = Body(..., embed=True)):
        """Label indexed image ``item_id`` (``null`` removes its label); written before the reply."""
        item_path(item_id)
        await run_in_threadpool(state.session.label, item_id, label)
        return state.session.state()

    @app.post("/api/labels/undo")
    async def undo():
        """Revert the last label change."""
        item_id = await run_in_threadpool(state.session.undo)
        return {"undone": item_id, **state.session.state()}

    @app.get("/api/labels/suggest")
    async def suggest(n: int = 12, strategy: str = "margin", diversity: float = 0.5):
        """The next images to label: least certain under the current head, diversified."""
        if not 1 <= n <= 200:
            raise ClipxferError(f"n must be between 1 and 200, not {n}")
        return await run_in_threadpool(state.session.suggest, n, strategy, diversity)

    @app.get("/api/labels/manifest.csv")
    async def export_manifest():
        """The labels as a CSV manifest (``path,label``) for ``clipxfer probe`` and friends."""
        return PlainTextResponse(state.session.store.manifest_csv(), media_type="text/csv",
                                 headers={"Content-Disposition": 'attachment; filename="labels.csv"'})

    @app.get("/api/labels/head.safetensors")
    async def export_head():
        """The latest fitted head as a file ``clipxfer predict`` loads."""
        chosen = state.session.head_for_export()
        with tempfile.TemporaryDirectory(prefix="clipxfer-head-") as folder:
            data = chosen.save(Path(folder) / "head.safetensors").read_bytes()
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{chosen.method}-labels.safetensors"'})

    # -- metrics and the page -------------------------------------------------------------
    @app.get("/metrics")
    async def metrics():
        """Prometheus metrics: request counts and latencies by route and status."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class GuardMiddleware:
    """Token check and upload cap before the app; security headers, the token cookie and the
    request metrics after it."""

    def __init__(self, app, config: ServeConfig, requests_total, latency):
        self.app, self.config = app, config
        self.requests_total, self.latency = requests_total, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import MutableHeaders

        start = time.perf_counter()
        request = Request(scope)
        path = scope["path"]
        token = request.query_params.get("token") if self.config.token and path == "/" else None
        status = [500]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    # FastAPI's /docs page loads Swagger UI from a CDN with inline script: no CSP there.
                    if key not in headers and (key != "Content-Security-Policy" or path not in ("/docs", "/redoc")):
                        headers.append(key, value)
                if token and message["status"] == 200:
                    cookie = Response()
                    cookie.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                    headers.append("set-cookie", cookie.headers["set-cookie"])
            await send(message)

        refusal = _refusal(request, self.config)
        try:
            if refusal is not None:
                await refusal(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")
            self.requests_total.labels(scope["method"], name, str(status[0])).inc()
            self.latency.labels(scope["method"], name).observe(time.perf_counter() - start)


def _refusal(request: Request, config: ServeConfig) -> Response | None:
    """The response refusing a request (bad token, upload over the cap), or None to let it through."""
    if config.token and request.url.path != "/api/health":
        given = (
            request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            or request.cookies.get(TOKEN_COOKIE, "")
            or (request.query_params.get("token", "") if request.url.path == "/" else "")
        )
        if not hmac.compare_digest(given.encode(), config.token.encode()):
            return JSONResponse({"detail": "missing or wrong token: open /?token=TOKEN or send "
                                           "'Authorization: Bearer TOKEN'"}, status_code=401)
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > config.max_upload_bytes + 64 * 1024  # multipart framing
        except ValueError:
            return JSONResponse({"detail": "bad Content-Length"}, status_code=400)
        if too_big:
            return JSONResponse({"detail": f"request body is over the {config.max_upload_bytes:,}-byte upload limit"},
                                status_code=413)
    return None
