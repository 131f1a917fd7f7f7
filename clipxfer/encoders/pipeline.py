"""The indexing encode pipeline: image files -> decoded uint8 batches -> encoder -> vectors.

Decoding runs in worker processes; a background thread encodes one batch while the main thread
gathers the next one and the caller stores the previous one (:func:`encode_decoded`), so the
model waits on decoding and storing as little as possible. A file that cannot be decoded becomes a
:class:`Failure` (path and a one-line reason) in the output stream instead of an exception.

Workers are forked where the platform allows, as torch's own DataLoader does, and like its
workers they run torch on one thread only (the bicubic resize, :func:`images.resize_bicubic`):
the thread pools they inherit are never entered, and a fork starts in milliseconds.
``forkserver``/``spawn`` re-import the main module in every worker, and when that module imports
torch (any script or notebook that loaded a model first), each worker spends seconds of CPU doing
so: measured on the 2-core benchmark machine, indexing fell from 30 to 18 images/s. Elsewhere
(macOS, Windows) ``spawn`` is used.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from ..errors import ClipxferError, ImageDecodeError
from ..images import bytes_model_input, load_model_input

if TYPE_CHECKING:  # torch stays out of the worker processes
    from .base import Encoder, ImageEncoding

DEFAULT_BATCH_SIZE = 64
# Paths per worker task: large enough that inter-process overhead is small, small enough that
# every worker has work while a batch is being encoded.
CHUNK_SIZE = 16
# The first batch is encoded as soon as this many images are decoded, so the model starts
# while the workers decode the rest instead of idling until a whole batch is ready.
FIRST_BATCH = 16


def default_workers() -> int:
    """Decode worker processes used when none are asked for."""
    return max(1, min(os.cpu_count() or 1, 8))


@dataclass(frozen=True)
class FileInfo:
    """What the index stores about one decoded file besides its vectors."""

    path: Path
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int


@dataclass(frozen=True)
class Failure:
    """A file (or keyed in-memory item) that could not be used, with the one-line reason."""

    path: Path | str
    reason: str


@dataclass(frozen=True)
class EncodedBatch:
    """One encoded batch: ``files[i]`` has row ``i`` of ``encoding``."""

    files: list[FileInfo]
    encoding: "ImageEncoding"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (how moved and renamed files are recognised)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _upright_size(path: Path) -> tuple[int, int]:
    """Width and height as displayed, i.e. after the EXIF orientation (header read only)."""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            width, height = height, width
    return width, height


def decode_file(path: Path, size: int) -> tuple[np.ndarray, FileInfo] | Failure:
    """Decode one file for a model with ``size`` px input; never raises for a bad file."""
    try:
        stat = path.stat()
        pixels = load_model_input(path, size)
        width, height = _upright_size(path)
        # Hashed after decoding: the bytes are in the page cache by now.
        info = FileInfo(path, stat.st_size, stat.st_mtime_ns, file_sha256(path), width, height)
        return pixels, info
    except ImageDecodeError as exc:
        return Failure(path, exc.reason)
    except PermissionError:
        return Failure(path, "permission denied (the file cannot be read)")
    except Exception as exc:  # anything else a hostile file triggers in a decoder
        return Failure(path, f"cannot decode ({type(exc).__name__}: {exc})".splitlines()[0])


@dataclass(frozen=True)
class ItemInfo:
    """What is kept about one in-memory image (a tar member, a parquet cell) besides its vectors."""

    key: str
    sha256: str
    width: int
    height: int
    size: int  # bytes


def decode_bytes(key: str, data: bytes | None, size: int) -> tuple[np.ndarray, ItemInfo] | Failure:
    """:func:`decode_file` for an image held in memory under a stable ``key``; never raises.

    ``data`` None means the item had no image at all (reported as such)."""
    if data is None:
        return Failure(key, "no image in this item")
    try:
        pixels, (width, height) = bytes_model_input(data, key, size)
    except ImageDecodeError as exc:
        return Failure(key, exc.reason)
    except Exception as exc:  # anything else a hostile file triggers in a decoder
        return Failure(key, f"cannot decode ({type(exc).__name__}: {exc})".splitlines()[0])
    return pixels, ItemInfo(key, hashlib.sha256(data).hexdigest(), width, height, len(data))


def _decode_chunk(decode, items: Sequence, size: int) -> list:
    """Worker task: ``decode(item, size)`` for a few items."""
    return [decode(item, size) for item in items]


def _chunks(items: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _init_worker() -> None:
    """Worker initialiser. Ctrl-C is the main process's to handle (it stops the pool cleanly);
    on Linux a worker also dies with its parent, so a kill -9 of ``clipxfer index`` leaves no
    orphaned decoders behind."""
    import signal

    import torch

    torch.set_num_threads(1)  # one decode per worker process; the parent's pool is not the worker's
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass


def _main_is_importable() -> bool:
    """Spawned workers re-import the main script; code piped to ``python -`` has none."""
    if "fork" in multiprocessing.get_all_start_methods():
        return True  # forked workers import nothing
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.isfile(main_file)


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def decoded_files(
    paths: Sequence[Path], size: int, workers: int | None = None, prefetch: int = 2 * DEFAULT_BATCH_SIZE
) -> Iterator[tuple[np.ndarray, FileInfo] | Failure]:
    """Decode ``paths`` in order, in ``workers`` processes (0: in this process).

    About ``prefetch`` images (at least two chunks per worker) are in flight: enough that the
    workers keep decoding the next batch while the caller encodes one, few enough to bound memory.
    """
    return decoded_items([Path(p) for p in paths], decode_file, size, workers, prefetch)


def decoded_items(
    items: Sequence, decode, size: int, workers: int | None = None, prefetch: int = 2 * DEFAULT_BATCH_SIZE
) -> Iterator:
    """``decode(item, size)`` for each item, in order, in ``workers`` processes (0: here).

    ``decode`` is a module-level function (it travels to the workers by name) that never raises
    for bad input; :func:`decoded_files` and the embedding sources (:mod:`clipxfer.embed`) use it.
    """
    workers = default_workers() if workers is None else workers
    if workers <= 0 or len(items) <= CHUNK_SIZE or not _main_is_importable():
        for item in items:
            yield decode(item, size)
        return
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=_pool_context(), initializer=_init_worker
    ) as pool:
        pending: deque[Future] = deque()
        chunks = _chunks(items, CHUNK_SIZE)
        try:
            for chunk in chunks:
                pending.append(pool.submit(_decode_chunk, decode, chunk, size))
                if len(pending) >= max(2 * workers, -(-prefetch // CHUNK_SIZE)):
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool:
            raise ClipxferError(
                "a decoding worker process died (a file crashed the image decoder?); what was encoded is kept: "
                "re-run with --workers 0 to find the file"
            ) from None
        finally:
            # On an early exit (Ctrl-C, fail-fast, a closed generator) drop queued work.
            for future in pending:
                future.cancel()


def device_decode_default(encoder: "Encoder") -> bool:
    """Whether :func:`encode_files` decodes JPEGs on the device: when the encoder runs on CUDA,
    unless ``CLIPXFER_DEVICE_DECODE=0`` (PIL in decode workers instead; benchmarks compare both)."""
    on_cuda = getattr(encoder, "device", None) is not None and encoder.device.type == "cuda"
    return on_cuda and os.environ.get("CLIPXFER_DEVICE_DECODE", "1") != "0"


def encode_files(
    encoder: "Encoder",
    paths: Iterable[str | os.PathLike],
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    device_decode: bool | None = None,
) -> Iterator[EncodedBatch | Failure]:
    """Decode ``paths`` in parallel and encode them ``batch_size`` at a time.

    Yields :class:`Failure` for each unreadable file as soon as it is seen, and an
    :class:`EncodedBatch` per full batch (the last one may be short), in input order.
    Decoding of the next batches continues in the workers while a batch is encoded.

    ``device_decode`` (default: :func:`device_decode_default`) decodes JPEGs on the encoder's
    device instead, see :func:`encode_files_on_device`.
    """
    if device_decode is None:
        device_decode = device_decode_default(encoder)
    paths = list(paths)
    if hasattr(encoder, "expect_images"):  # lets a runtime that still has to calibrate use these files
        encoder.expect_images(paths)
    if device_decode:
        yield from encode_files_on_device(encoder, paths, batch_size)
        return
    decoded = decoded_files(paths, encoder.input_size, workers, prefetch=2 * batch_size)
    for item in encode_decoded(encoder, decoded, batch_size):
        yield item if isinstance(item, Failure) else EncodedBatch(*item)


def encode_decoded(
    encoder: "Encoder", results: Iterable, batch_size: int
) -> Iterator[tuple[list, "ImageEncoding"] | Failure]:
    """Group decoded ``(pixels, info)`` results into batches of ``batch_size`` and encode them,
    yielding ``(infos, encoding)`` per batch and each :class:`Failure` as it comes, in input order.

    One batch is encoded in a background thread while the next one is gathered and the previous
    one is stored by the caller, so the model never waits for the hand-over of decoded images
    (torch and OpenVINO release the GIL while they compute). The first batch is smaller
    (:data:`FIRST_BATCH`) so encoding starts early. A batch already being encoded is yielded
    before any later failure: a caller that stops at a failure has everything before it.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipxfer-encode") as background:
        in_flight: deque[tuple[list, Future]] = deque()
        pixels: list[np.ndarray] = []
        infos: list = []
        limit = min(batch_size, FIRST_BATCH)

        def finished(keep: int) -> Iterator[tuple[list, "ImageEncoding"]]:
            """The batches in flight, oldest first, until ``keep`` are left encoding."""
            while len(in_flight) > keep:
                batch_infos, encoding = in_flight.popleft()
                yield batch_infos, encoding.result()

        for result in results:
            if isinstance(result, Failure):
                yield from finished(0)
                yield result
                continue
            pixels.append(result[0])
            infos.append(result[1])
            if len(infos) >= limit:
                in_flight.append((infos, background.submit(encoder.encode_pixels, np.stack(pixels))))
                pixels, infos, limit = [], [], batch_size
                yield from finished(1)  # the new batch encodes while the caller stores the previous one
        if infos:
            in_flight.append((infos, background.submit(encoder.encode_pixels, np.stack(pixels))))
        yield from finished(0)


def encode_files_on_device(
    encoder: "Encoder", paths: Iterable[str | os.PathLike], batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None
) -> Iterator[EncodedBatch | Failure]:
    """:func:`encode_files` for GPUs: threads read and hash the next batches' files while the
    device decodes (nvjpeg), resizes and encodes the current one (see :mod:`clipxfer.encoders.gpu_decode`).

    Files the device decoder does not take (PNGs, CMYK or rotated JPEGs, broken files) are
    decoded with PIL in this process, so results match :func:`encode_files` file for file; within
    a batch, device-decoded files come first.
    """
    import torch

    from .gpu_decode import decode_on_device, default_reader_threads, read_file

    batches = _chunks([Path(p) for p in paths], batch_size)
    with ThreadPoolExecutor(max_workers=threads or default_reader_threads()) as pool:
        window: deque[list[Future]] = deque()

        def read_ahead() -> None:
            chunk = next(batches, None)
            if chunk:
                window.append([pool.submit(read_file, path) for path in chunk])

        read_ahead()
        read_ahead()  # two batches in flight: one being read while one is encoded
        while window:
            raws = [future.result() for future in window.popleft()]
            read_ahead()
            batch = decode_on_device(raws, encoder.input_size, encoder.device)
            files = [
                FileInfo(raw.path, raw.size, raw.mtime_ns, raw.sha256, width, height)
                for raw, (height, width) in zip(batch.decoded, batch.sizes)
            ]
            extra_pixels = []
            for raw in batch.fallback:
                result = decode_file(raw.path, encoder.input_size)
                if isinstance(result, Failure):
                    yield result
                    continue
                extra_pixels.append(result[0])
                files.append(result[1])
            if not files:
                continue
            pixels = batch.pixels
            if extra_pixels:
                extra = torch.from_numpy(np.stack(extra_pixels)).to(pixels.device)
                pixels = torch.cat([pixels, extra])
            yield EncodedBatch(files, encoder.encode_pixels(pixels))
