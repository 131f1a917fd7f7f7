"""The OpenVINO runtime for image towers (optional extra: ``pip install 'clipxfer[openvino]'``).

An encoder's image tower (:meth:`Encoder.image_graph`) is converted to OpenVINO once, with the
uint8 -> normalised-float step built into the graph, optionally quantized to int8 by nncf
(post-training, static), and cached on disk under ``cache_dir()/openvino/`` keyed by encoder id,
precision, OpenVINO version and this module's format version (an adapted encoder's id carries the
hash of its adapter's tensors, checked on load, so its graph is keyed by the weights themselves). Later
loads reuse the files after checking their SHA-256 (a damaged or stale cache is rebuilt, never trusted);
a cache that cannot be written (read-only ``CLIPXFER_CACHE``) gives one warning line and a model built
in a temporary folder for the run.

int8 calibration uses the images about to be encoded when there are enough of them
(:meth:`OpenVinoImageTower.expect_images`, called by the indexing pipeline), else a small set
made from scikit-image's sample photos; the cache metadata records which. Inference uses the
THROUGHPUT hint and an ``AsyncInferQueue``: each batch is split into requests of a few images
that the plugin's streams take as they come free. An int8 graph runs the layers nncf left in float
in bf16 where the CPU has bf16 natively (:func:`inference_precision`).

Nothing outside ``encoders/`` knows this module exists: the encoder id says ``@int8`` when the
numbers differ from the float model, and that is all an index or head sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..device import cpu_has_fast_bf16
from ..errors import ClipxferError
from ..extras import import_extra
from ..paths import cache_dir
from .ids import INT8_SUFFIX, weights_id

if TYPE_CHECKING:
    from .base import Encoder

#: Bump when the saved graph changes meaning (inputs, outputs, quantization recipe).
CACHE_FORMAT = 2
#: Images drawn from the user's folder for int8 calibration, and the fewest that count as enough.
CALIBRATION_IMAGES = 64
MIN_FOLDER_IMAGES = 16
CALIBRATION_BATCH = 8
#: Images per inference request. Small requests let the streams share a batch unevenly: when
#: decoding takes a core from one stream, the other takes more requests instead of waiting for
#: it at the end of the batch (on 2 cores, batches of 8 run as fast as batches of 64).
REQUEST_IMAGES = 8
#: OpenVINO's inference precision hint for each precision name (for int8: see :func:`inference_precision`).
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


def import_openvino():
    """``openvino``, or one line naming the extra to install."""
    return import_extra("openvino", "openvino", "the OpenVINO runtime")


def import_nncf():
    """``nncf`` (int8 quantization), or one line naming the extra to install."""
    return import_extra("nncf", "openvino", "int8")


def inference_precision(precision: str, bf16_native: bool) -> str:
    """OpenVINO's inference precision hint for a model run at ``precision``.

    An int8 graph still runs the layers nncf left unquantized (a ViT's layer norms, softmax and
    GELU; lite's stem and depthwise convolutions) in this precision: bf16 on a CPU with native
    bf16, f32 elsewhere (emulated bf16 is 4x slower). See benchmarks/RESULTS.md, "int8 remainder".
    """
    if precision == "int8":
        return "bf16" if bf16_native else "f32"
    return INFERENCE_PRECISION[precision]


def openvino_version() -> str:
    return import_openvino().get_version()


def cache_key(encoder_id: str, precision: str, kind: str = "image") -> dict:
    """What decides a cached model's contents. The float precisions share one fp32 graph: bf16
    and fp16 are only an inference hint when it is compiled. ``kind``: ``image`` (the tower)
    or ``patches`` (the dense patch features, :meth:`Encoder.patch_graph`)."""
    stored = "int8" if precision == "int8" else "fp32"
    return {"encoder_id": encoder_id, "graph": kind, "precision": stored, "openvino": openvino_version(),
            "format": CACHE_FORMAT}


def cache_folder(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "openvino" / digest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def is_transformer(module: torch.nn.Module) -> bool:
    """True for attention models (ViTs), which nncf quantizes with its transformer recipe."""
    return any("Attention" in type(m).__name__ for m in module.modules())


# --------------------------------------------------------------------------- calibration


def shipped_calibration_images(size: int) -> list[np.ndarray]:
    """scikit-image's sample photos, each whole, mirrored and as two zoomed crops (76 images)."""
    from ..images import load_model_input
    from ..sample_photos import SAMPLE_PHOTOS, sample_photo

    images = []
    for name in SAMPLE_PHOTOS:
        photo = sample_photo(name)
        height, width = photo.shape[:2]
        views = [photo, photo[:, ::-1], photo[: height * 2 // 3, : width * 2 // 3], photo[height // 3 :, width // 3 :]]
        images.extend(load_model_input(np.ascontiguousarray(view), size) for view in views)
    return images


def folder_calibration_images(paths: Sequence[Path], size: int, limit: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    """Up to ``limit`` decodable images spread evenly over ``paths`` (unreadable files skipped)."""
    from ..images import load_model_input

    if not paths:
        return []
    picks = np.unique(np.linspace(0, len(paths) - 1, num=min(len(paths), 2 * limit)).round().astype(int))
    images = []
    for i in picks:
        try:
            images.append(load_model_input(paths[i], size))
        except Exception:  # a broken file is the pipeline's to report, not calibration's
            continue
        if len(images) >= limit:
            break
    return images


def calibration_set(paths: Sequence[Path] | None, size: int) -> tuple[list[np.ndarray], dict]:
    """The images to calibrate int8 on, and a record of where they came from."""
    images = folder_calibration_images(paths or [], size)
    if len(images) >= MIN_FOLDER_IMAGES:
        folder = os.path.commonpath([str(Path(p).parent) for p in paths]) if paths else ""
        return images, {"source": "folder", "folder": folder, "images": len(images)}
    images = shipped_calibration_images(size)
    return images, {"source": "clipxfer sample photos (scikit-image)", "images": len(images)}


# --------------------------------------------------------------------------- building


def _convert(encoder: "Encoder", kind: str = "image"):
    """The encoder's image (or patch) graph as an OpenVINO model taking uint8 NHWC batches;
    returns it, whether it is a transformer, and whether its last output is joint-space patches."""
    module = encoder.image_graph() if kind == "image" else encoder.patch_graph()
    has_joint = bool(getattr(module, "has_joint", False))
    graph = module.float().eval().requires_grad_(False)
    return convert_graph(graph, encoder), is_transformer(graph), has_joint


def convert_graph(graph: torch.nn.Module, encoder: "Encoder", size: int | None = None):
    """``graph`` (normalised fp32 NCHW pixels of ``encoder``'s input size, or ``size`` -> tensors) as an
    OpenVINO model taking uint8 NHWC batches, the scaling and normalisation built in (also used by ``export/``)."""
    ov = import_openvino()
    from openvino.preprocess import PrePostProcessor

    size = size or encoder.input_size
    example = torch.zeros(2, 3, size, size)
    # Tracing needs requires_grad off under no_grad; torch's tracer warns that it is deprecated.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(graph, example_input=example, input=[(-1, 3, size, size)])
    # uint8 NHWC in, scaled and normalised inside the graph: the caller hands over decoded pixels as they are.
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).mean(
        [255.0 * m for m in encoder.mean]
    ).scale([255.0 * s for s in encoder.std])
    return ppp.build()


def quantize_model(model, transformer: bool, images: list[np.ndarray], keep_float: Sequence[str] = ()):
    """``model`` quantized to int8 by nncf on ``images`` with this module's recipe (also used by ``export/``);
    the layers named in ``keep_float`` stay float."""
    nncf = import_nncf()
    batches = [np.stack(images[i : i + CALIBRATION_BATCH]) for i in range(0, len(images), CALIBRATION_BATCH)]
    if transformer:
        # Transformer recipe: SmoothQuant (moves activation outliers into the weights) and
        # accurate attention inputs; see README "OpenVINO runtime".
        options = {"model_type": nncf.ModelType.TRANSFORMER}
        if keep_float:
            options["ignored_scope"] = nncf.IgnoredScope(names=list(keep_float))
    else:
        # Depthwise convolutions lose most under per-tensor int8, and so does the stem convolution,
        # whose weights nncf cuts to 7 bits (its overflow fix for CPUs without VNNI). Both are a
        # small share of the work, so they stay float: lite's embedding cosine to fp32 went from
        # 0.977 (depthwise float) to 0.9975 (stem too), see benchmarks/RESULTS.md.
        stem = _first_convolution(model)
        names = [stem] if stem else []
        options = {"ignored_scope": nncf.IgnoredScope(types=["GroupConvolution"], names=names + list(keep_float))}
    # nncf draws progress bars and logs INFO lines on stdout, which belongs to results (--json):
    # bars go to stderr, and its log says only errors while it runs.
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return nncf.quantize(
                model,
                nncf.Dataset(batches),
                subset_size=len(batches),
                preset=nncf.QuantizationPreset.MIXED,
                **options,
            )
    finally:
        nncf_log.setLevel(level)


def _first_convolution(model) -> str | None:
    """Name of the first convolution a model's input meets (its stem), if any."""
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Convolution":
            return op.get_friendly_name()
    return None


def nncf_recipe(transformer: bool) -> dict:
    """The nncf options :func:`_quantize` uses, as recorded in the cache metadata."""
    if transformer:
        return {"model_type": "TRANSFORMER", "preset": "MIXED", "smooth_quant": "nncf default for transformers"}
    return {"model_type": None, "preset": "MIXED", "ignored_types": ["GroupConvolution"], "ignored": "the stem convolution"}


def build_model(encoder: "Encoder", precision: str, folder: Path, calibration_paths: Sequence[Path] | None,
                kind: str = "image") -> None:
    """Convert (and for int8 quantize) ``encoder``'s image tower (or patch graph) into ``folder``, atomically."""
    ov = import_openvino()
    started = time.perf_counter()
    precision = "int8" if precision == "int8" else "fp32"
    what = "int8 (converting, then calibrating with nncf)" if precision == "int8" else precision
    print(f"building the OpenVINO {what} {kind} model for {encoder.id}; once, cached in {folder}", file=sys.stderr)
    model, transformer, has_joint = _convert(encoder, kind)
    meta = {**cache_key(weights_id(encoder.id), precision, kind), "transformer": transformer,
            "has_joint": has_joint}
    if precision == "int8":
        images, meta["calibration"] = calibration_set(calibration_paths, encoder.input_size)
        meta["nncf"] = {"version": import_nncf().__version__, **nncf_recipe(transformer)}
        model = quantize_model(model, transformer, images)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Weights stay fp32 on disk (OpenVINO would otherwise compress them to fp16).
    ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
    meta["sha256"] = {name: _sha256(tmp / name) for name in ("model.xml", "model.bin")}
    meta["build_seconds"] = round(time.perf_counter() - started, 1)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same build first; its copy is as good
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built the OpenVINO {precision} {kind} model in {meta['build_seconds']:.0f} s", file=sys.stderr)


def read_cached(folder: Path, key: dict):
    """The cached model and its metadata, or None when missing, stale or damaged."""
    ov = import_openvino()
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if any(meta.get(field) != value for field, value in key.items()):
            return None
        for name, digest in meta["sha256"].items():
            if _sha256(folder / name) != digest:
                return None
        return ov.Core().read_model(str(folder / "model.xml")), meta
    except Exception:  # unreadable JSON, missing files, a graph OpenVINO rejects: rebuild
        return None


# --------------------------------------------------------------------------- running


class OpenVinoImageTower:
    """An encoder's image tower compiled by OpenVINO for the CPU.

    Built (or read from the cache) on first use, so loading an encoder for text only never pays
    for it. Call it with a ``uint8 (n, size, size, 3)`` batch; it returns the graph's outputs as
    numpy arrays, in order.
    """

    def __init__(self, encoder: "Encoder", precision: str, streams: int | None = None, kind: str = "image",
                 inference_hint: str | None = None):
        """``inference_hint``: OpenVINO's inference precision (``f32``, ``bf16``); default
        :func:`inference_precision`'s choice for this model on this CPU."""
        if precision not in INFERENCE_PRECISION:
            raise ClipxferError(f"OpenVINO precision '{precision}' is not supported: use fp32, bf16 or int8")
        self.encoder = encoder
        self.precision = precision
        self.streams = streams
        self.kind = kind
        self.inference_hint = inference_hint
        #: For ``patches``: whether the last output is joint-space patch embeddings (from the cache metadata).
        self.has_joint = False
        self.calibration_paths: list[Path] | None = None
        self.metadata: dict | None = None
        self._queue = None
        # One call at a time: the infer queue and its callback are shared, and a call already
        # spreads its batch over every stream (the server encodes uploads from several threads).
        self._lock = threading.Lock()

    def expect_images(self, paths: Sequence) -> None:
        """Note the images about to be encoded; int8 calibrates on them if it still has to be built."""
        if self._queue is None and self.calibration_paths is None:
            self.calibration_paths = [Path(p) for p in paths]

    def load(self):
        """The compiled model, from the cache or built now (and cached)."""
        if self._queue is not None:
            return self._queue
        ov = import_openvino()
        key = cache_key(weights_id(self.encoder.id), self.precision, self.kind)
        try:
            folder = cache_folder(key)
        except OSError as exc:  # the cache root cannot even be created
            folder = self._temporary_folder(key, exc)
        cached = read_cached(folder, key)
        if cached is None:
            if (folder / "meta.json").exists():
                print(f"warning: the cached OpenVINO model in {folder} is stale or damaged; rebuilding", file=sys.stderr)
            try:
                build_model(self.encoder, self.precision, folder, self.calibration_paths, self.kind)
            except OSError as exc:  # a read-only cache: build this run's copy elsewhere
                folder = self._temporary_folder(key, exc, folder)
                build_model(self.encoder, self.precision, folder, self.calibration_paths, self.kind)
            cached = read_cached(folder, key)
            if cached is None:
                raise ClipxferError(f"could not build a usable OpenVINO model in {folder}: delete it and retry")
        model, self.metadata = cached
        self.has_joint = bool(self.metadata.get("has_joint", False))
        self.cache_folder = folder
        config = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_PRECISION_HINT": self.inference_hint
            or inference_precision(self.precision, cpu_has_fast_bf16()),
        }
        if self.streams:
            config["NUM_STREAMS"] = str(self.streams)
        if self.precision == "fp16" and "FP16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ClipxferError("this CPU has no fp16 arithmetic for OpenVINO: use --precision bf16, fp32 or int8")
        compiled = ov.Core().compile_model(model, "CPU", config)
        self.requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = ov.AsyncInferQueue(compiled, self.requests)
        return self._queue

    def _temporary_folder(self, key: dict, error: OSError, folder: Path | None = None) -> Path:
        """A folder in a temporary directory (removed when this tower is) for a model the cache cannot
        hold, with one warning line: the run goes on, the model is built again next time."""
        import tempfile

        where = folder or os.environ.get("CLIPXFER_CACHE") or "the cache folder"
        print(f"warning: cannot write the OpenVINO model cache in {where} ({error.strerror or error}); building it in "
              "a temporary folder for this run only (set CLIPXFER_CACHE to a writable folder to keep it)",
              file=sys.stderr)
        self._temporary = tempfile.TemporaryDirectory(prefix="clipxfer-openvino-")
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return Path(self._temporary.name) / digest

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            return self._infer(pixels)

    def _infer(self, pixels: np.ndarray) -> list[np.ndarray]:
        queue = self.load()
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        parts = np.array_split(pixels, min(len(pixels), max(self.requests, -(-len(pixels) // REQUEST_IMAGES))))
        results: list = [None] * len(parts)

        def done(request, index):
            results[index] = [request.get_output_tensor(i).data.copy() for i in range(len(request.model_outputs))]

        queue.set_callback(done)
        for index, part in enumerate(parts):
            queue.start_async(part, userdata=index)
        queue.wait_all()
        return [np.concatenate([part[i] for part in results]) for i in range(len(results[0]))]


def attach(encoder: "Encoder", precision: str) -> "Encoder":
    """Run ``encoder``'s image tower in OpenVINO from now on; int8 marks the id ``@int8``."""
    import_openvino()
    if precision == "int8":
        import_nncf()
        encoder.id = encoder.id + INT8_SUFFIX
    encoder.image_runtime = OpenVinoImageTower(encoder, precision)
    # Dense patch features (anomaly detection) run the float graph whatever the tower's precision:
    # detectors' thresholds are calibrated on distances between these features, and OpenVINO fp32
    # gives torch's numbers (relative error ~2e-6 on lite) about 3x faster; bf16 moved them by ~4%.
    encoder.patch_runtime = OpenVinoImageTower(encoder, "fp32", kind="patches")
    encoder.runtime = "openvino"
    encoder.precision = precision
    return encoder
