"""Encoder ids and ``--model`` specs as plain strings: the one torch-free place that knows their shape.

An encoder id names the weights an embedding came from (every artifact records it and refuses
another). Its parts::

    lite:efficientnet-lite0+all-MiniLM-L6-v2:conse-top10      the offline encoder
    open_clip:ViT-B-32:laion2b_s34b_b79k                      an open_clip model and its weights
    open_clip:clipxfer-tiny:random-seed0                      random init (``tiny``, ``MODEL:random``)
    <id>@int8                                                  the same weights, run quantized
    <float id>+ft-<16 hex>                                     fine-tuned by an adapter file

A spec is what ``--model`` takes: ``lite``, ``tiny``, ``MODEL:TAG`` or ``BASE+ADAPTER.safetensors``.
Everything here is string and hash work, so artifacts' ids can be read and compared without loading
a model (and without importing torch).
"""

from __future__ import annotations

import hashlib

import numpy as np

DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"
LITE = "lite"
TINY = "tiny"
LITE_ID = "lite:efficientnet-lite0+all-MiniLM-L6-v2:conse-top10"
OPEN_CLIP_PREFIX = "open_clip:"
TINY_MODEL = "clipxfer-tiny"
RANDOM_TAG = "random"
RANDOM_SEED = 0
#: Ends the id of an encoder whose image tower runs quantized to int8 (its embeddings differ).
INT8_SUFFIX = "@int8"
#: Joins a base spec and an adapter file made by ``clipxfer finetune``: ``lite+adapted.safetensors``.
ADAPTER_JOIN = "+"
ADAPTER_SUFFIX = ".safetensors"
#: Joins a base id and the hash of an adapter's tensors: ``<base id>+ft-<hash>``.
ADAPTED_MARK = "+ft-"
#: Tensor-name prefixes of an adapter's encoder part: full parameter values, or LoRA factors.
ENCODER_PREFIX = "encoder/"
LORA_PREFIX = "lora/"

#: adapted encoder id -> the spec that loaded it in this process (an id holds no file path).
_ADAPTED_SPECS: dict[str, str] = {}


def weights_id(model_id: str) -> str:
    """The id of the float weights a model runs: without the ``@int8`` of a quantized runtime
    (compiled graphs are cached by it; fine-tuned adapters name their base by it)."""
    return model_id.removesuffix(INT8_SUFFIX)


def is_int8(model_id: str) -> bool:
    """True for the id of an encoder run in int8."""
    return model_id.endswith(INT8_SUFFIX)


def adapted_id(base_id: str, tensors: dict[str, np.ndarray]) -> str:
    """``<base weights id>+ft-<16 hex>``: the hash covers every encoder tensor's name, shape and bytes.
    Fine-tuning changes the float weights (a runtime quantizes the result when it is loaded), so the
    base is named without ``@int8``."""
    base_id = weights_id(base_id)
    digest = hashlib.sha256(base_id.encode())
    for name in sorted(tensors):
        if name.startswith((ENCODER_PREFIX, LORA_PREFIX)):
            value = np.ascontiguousarray(tensors[name], dtype=np.float32)
            digest.update(f"{name}:{value.shape}".encode())
            digest.update(value.tobytes())
    return f"{base_id}{ADAPTED_MARK}{digest.hexdigest()[:16]}"


def base_of(model_id: str) -> str | None:
    """The base encoder id of an adapted id, or None for a plain one."""
    base, mark, _ = model_id.rpartition(ADAPTED_MARK)
    return base if mark else None


def split_adapter_spec(spec: str) -> tuple[str, str | None]:
    """``'lite+a.safetensors'`` -> ``('lite', 'a.safetensors')``; a spec without an adapter -> ``(spec, None)``."""
    base_spec, join, adapter = spec.partition(ADAPTER_JOIN)
    if join and adapter.endswith(ADAPTER_SUFFIX):
        return base_spec, adapter
    return spec, None


def adapter_spec(base_spec: str, adapter: str) -> str:
    """The ``--model`` value of an adapted encoder: ``BASE+ADAPTER``."""
    return f"{base_spec}{ADAPTER_JOIN}{adapter}"


def remember_adapted_spec(model_id: str, spec: str) -> None:
    """Record the spec that loaded the adapted encoder ``model_id``, so :func:`spec_for_id` can name it."""
    _ADAPTED_SPECS[model_id] = spec


def switch_hint(made_with: str, used: str) -> str:
    """The option that makes encoder ``used`` into ``made_with``: ``--precision fp32`` or ``--precision int8``
    when only the precision differs (the weights are the same), else ``--model SPEC``."""
    if weights_id(made_with) == weights_id(used) and is_int8(made_with) != is_int8(used):
        return "--precision int8" if is_int8(made_with) else "--precision fp32"
    return f"--model {spec_for_id(made_with)}"


def spec_for_id(model_id: str) -> str:
    """The ``--model`` value that rebuilds the encoder with this id (best effort for files)."""
    model_id = weights_id(model_id)  # the precision is not part of the spec
    base_id = base_of(model_id)
    if base_id is not None:  # the id holds no path: the spec this process loaded, else a placeholder
        if model_id in _ADAPTED_SPECS:
            return _ADAPTED_SPECS[model_id]
        return adapter_spec(spec_for_id(base_id), f"ADAPTER{ADAPTER_SUFFIX}")
    if model_id == LITE_ID:
        return LITE
    name = model_id.removeprefix(OPEN_CLIP_PREFIX)
    if name == f"{TINY_MODEL}:{RANDOM_TAG}-seed{RANDOM_SEED}":
        return TINY
    return name.removesuffix(f"-seed{RANDOM_SEED}")
