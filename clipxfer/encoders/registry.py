"""The one place that turns a model name (``--model SPEC``) into an encoder."""

from __future__ import annotations

import logging
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ClipxferError
from .ids import (
    DEFAULT_MODEL,
    LITE,
    TINY,
    TINY_MODEL,
    adapter_spec,
    is_int8,
    remember_adapted_spec,
    spec_for_id,
    split_adapter_spec,
)  # fmt: skip

if TYPE_CHECKING:
    from .base import Encoder

SPEC_HELP = (
    "use 'lite' (offline), 'tiny' (tests), a MODEL:PRETRAINED pair from 'clipxfer models', "
    "MODEL:random, MODEL:/path/to/checkpoint, or hf-hub:ORG/NAME; "
    "add +ADAPTER.safetensors for a model fine-tuned by 'clipxfer finetune' (lite+adapted.safetensors)"
)


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``'ViT-B-32:laion2b_s34b_b79k'`` -> (model, tag); a bare model name gets its first tag."""
    import open_clip

    if spec.startswith("hf-hub:"):
        return spec, None
    model, _, tag = spec.partition(":")
    if model not in open_clip.list_models():
        raise ClipxferError(f"unknown model '{spec}': {SPEC_HELP}")
    if tag:
        if tag == "random" or Path(tag).expanduser().is_file():
            return model, tag
        if tag not in open_clip.list_pretrained_tags_by_model(model):
            known = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
            raise ClipxferError(
                f"unknown pretrained tag '{tag}' for {model} (known: {known}); or give a checkpoint path that exists"
            )
        return model, tag
    tags = open_clip.list_pretrained_tags_by_model(model)
    if not tags:
        raise ClipxferError(f"{model} has no pretrained weights in open_clip: use {model}:random or {model}:/path")
    return model, tags[0]


def load_encoder(spec: str | None = None, device: str | None = None, precision: str | None = None) -> Encoder:
    """Build the encoder named by ``spec``.

    ``None``/``'default'`` is open_clip ViT-B-32 (LAION-2B) when its weights are cached or
    downloadable, else the offline ``lite`` encoder with one warning line on stderr.
    ``precision`` is ``auto``, ``fp32``, ``bf16``, ``fp16`` or ``int8``, optionally prefixed by a
    runtime (``openvino:int8``, ``torch:auto``); see :func:`clipxfer.device.choose_compute`.
    """
    from ..device import choose_compute, choose_device, join_compute, precision_name, split_compute

    compute = choose_compute(choose_device(device), precision)
    # The torch model is built in the precision torch runs; OpenVINO converts from fp32.
    torch_precision = compute.precision if compute.runtime == "torch" else "fp32"
    encoder = _load_torch_encoder(spec, device, torch_precision)
    runtime, asked = split_compute(precision)
    if compute.precision == "int8" and asked == "auto" and not encoder.int8_by_default:
        compute = choose_compute(encoder.device, join_compute(runtime, "float"))
    if compute.runtime == "openvino":
        from .openvino_runtime import attach

        return attach(encoder, compute.precision)
    encoder.runtime, encoder.precision = "torch", precision_name(encoder.dtype)
    return encoder


def load_text_encoder(spec: str | None = None, device: str | None = None, precision: str | None = None) -> Encoder:
    """The encoder named by ``spec``, loaded to embed text queries only: its text tower runs as in
    :func:`load_encoder` (same device and torch precision, so the same vectors), but no OpenVINO
    image tower is compiled and ``lite`` leaves out its image model. Its id is the weights id
    (no ``@int8`` mark: int8 applies to the image tower only).
    open_clip checkpoints hold both towers in one file, so an open_clip model still loads both.
    """
    from ..device import choose_compute, choose_device, precision_name

    compute = choose_compute(choose_device(device), precision)
    torch_precision = compute.precision if compute.runtime == "torch" else "fp32"
    encoder = _load_torch_encoder(spec, device, torch_precision, text_only=True)
    encoder.runtime, encoder.precision = "torch", precision_name(encoder.dtype)
    return encoder


def _load_torch_encoder(spec: str | None, device: str | None, precision: str, text_only: bool = False) -> Encoder:
    from .lite import LiteEncoder

    if spec in (None, "", "default"):
        from .openclip import MissingWeightsError

        try:
            return _load_torch_encoder(DEFAULT_MODEL, device, precision)
        except MissingWeightsError:
            print(
                f"warning: {DEFAULT_MODEL} weights are not available offline; using the 'lite' encoder "
                "(far weaker than CLIP). Pass --model to choose.",
                file=sys.stderr,
            )
            return LiteEncoder(device, precision, text_only=text_only)
    base_spec, adapter = split_adapter_spec(spec)
    if adapter is not None:
        from .adapter import load_adapted

        encoder = load_adapted(load_encoder(base_spec, device, precision), adapter)
        remember_adapted_spec(encoder.id, adapter_spec(base_spec, str(Path(adapter).resolve())))
        return encoder
    if spec == LITE:
        return LiteEncoder(device, precision, text_only=text_only)
    from .openclip import OpenClipEncoder  # after lite: importing open_clip costs seconds

    if spec == TINY:
        return _quiet(OpenClipEncoder, TINY_MODEL, None, device, precision)
    model, tag = _split_spec(spec)
    return _quiet(OpenClipEncoder, model, tag, device, precision)


def precision_for_id(model_id: str, requested: str | None = None) -> str | None:
    """The ``precision`` to load the encoder of an artifact made with ``model_id``.

    An explicit precision is kept (and the ids are compared as usual). ``auto`` becomes the
    choice the id allows: int8 for an ``@int8`` id, the fastest float option otherwise, so an
    index built with one precision is reopened with a matching one on any machine.
    """
    from ..device import join_compute, split_compute
    runtime, precision = split_compute(requested)
    if precision != "auto":
        return requested
    return join_compute(runtime, "int8" if is_int8(model_id) else "float")


def load_encoder_for_id(model_id: str, model: str | None = None, device: str | None = None,
                        precision: str | None = "auto") -> Encoder:  # fmt: skip
    """The encoder to use an artifact (detector, defect-type head) made with ``model_id``: ``model`` when
    given, else the one the id names, in the precision :func:`precision_for_id` picks for it."""
    return load_encoder(model or spec_for_id(model_id), device=device, precision=precision_for_id(model_id, precision))


def load_encoder_for_results(spec: str | None, model_ids) -> Encoder:
    """``load_encoder(spec)`` to resume results made with ``model_ids``: with one id, in the
    precision it names (float or int8), as an index is reopened, so results made on one machine
    resume on another whatever ``auto`` picks there; with none, ``auto``."""
    ids = sorted(set(model_ids))
    return load_encoder(spec, precision=precision_for_id(ids[0]) if len(ids) == 1 else None)


def _quiet(factory, *args):
    """open_clip logs 'initialized randomly' at WARNING for random models; the id says so already."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        return factory(*args)
    finally:
        root.setLevel(previous)


@lru_cache(maxsize=4)
def cached_text_encoder(spec: str | None = None, device: str | None = None, precision: str | None = None) -> Encoder:
    """:func:`load_text_encoder`, memoised per process."""
    return load_text_encoder(spec, device, precision)


@lru_cache(maxsize=4)
def cached_encoder(spec: str | None = None, device: str | None = None, precision: str | None = None) -> Encoder:
    """:func:`load_encoder`, memoised per process (tests and the bench reuse one model)."""
    return load_encoder(spec, device, precision)


BACKENDS = [
    {"spec": LITE, "description": "offline: EfficientNet-Lite0 + MiniLM aligned by ConSE (far weaker than CLIP)"},
    {"spec": TINY, "description": "tiny random-init open_clip model, for tests"},
    {"spec": "MODEL:PRETRAINED", "description": "any open_clip pair below (weights via the Hugging Face cache)"},
    {"spec": "MODEL:random", "description": "open_clip architecture with random weights (benchmarks)"},
    {"spec": "MODEL:/path", "description": "open_clip architecture with a local checkpoint file"},
    {"spec": "hf-hub:ORG/NAME", "description": "open_clip model from the Hugging Face hub"},
    {"spec": "BASE+ADAPTER.safetensors", "description": "BASE fine-tuned by 'clipxfer finetune' (e.g. lite+adapted.safetensors)"},
]


def available_models() -> dict:
    """Backends, every open_clip ``model:pretrained`` pair with its cached flag, and the default."""
    from .catalog import list_pretrained_pairs

    pairs = list_pretrained_pairs()
    default_cached = any(p["spec"] == DEFAULT_MODEL and p["cached"] for p in pairs)
    return {"backends": BACKENDS, "open_clip": pairs, "default": DEFAULT_MODEL, "default_cached": default_cached}
