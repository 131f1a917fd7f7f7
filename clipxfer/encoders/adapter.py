"""The adapter file as an encoder reads it: what fine-tuning changed in an encoder, applied in place.

An adapter is a head file (``clipxfer-head/1``, method ``finetune``, see
:mod:`clipxfer.heads.finetune`) whose tensors are the head's linear parts plus, under
``encoder/<module>.<parameter>``, the full values of the parameters that moved (``lp-ft``,
``partial``, ``full``), or, under ``lora/<module>.A`` / ``.B``, LoRA factors merged into the
frozen weights at load time (``W + scaling * B @ A``). Its config names the base encoder id; its
model id is ``<base id>+ft-<hash of those tensors>`` (:func:`clipxfer.encoders.ids.adapted_id`), so
indexes and heads made with the adapted encoder refuse the plain one and the other way round. The hash is
recomputed from the tensors on every load and a file whose tensors do not match its id is refused: the id
(and the OpenVINO graph cached under it, :mod:`.openvino_runtime`) always means these weights.
This module reads the file itself (:mod:`.artifacts`); the head side of it is loaded by ``heads/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ClipxferError
from .artifacts import DETECTOR_FORMAT, HEAD_FORMAT, read_artifact_metadata, read_artifact_tensors
from .base import Encoder
from .ids import ENCODER_PREFIX, LORA_PREFIX, adapted_id, spec_for_id


@dataclass(frozen=True)
class Adapter:
    """An adapter file: the adapted encoder's id, its config (``base_model_id`` and the recipe) and
    every tensor it holds (the head's too)."""

    path: Path
    model_id: str
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]


def trainable_root(encoder: Encoder) -> tuple[str, torch.nn.Module]:
    """``(attribute, module)`` of the encoder's image tower, the part fine-tuning moves: lite's
    EfficientNet (``image_model``) or an open_clip model (``model``, its ``visual`` tower)."""
    for attribute in ("image_model", "model"):
        module = getattr(encoder, attribute, None)
        if isinstance(module, torch.nn.Module):
            return attribute, module
    raise ClipxferError(f"model '{encoder.id}' has no image tower clipxfer can fine-tune")


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, shape: torch.Size) -> torch.Tensor:
    """The weight change of one LoRA pair for a Linear (``out, in``) or 1x1 Conv2d (``out, in, 1, 1``)."""
    delta = b.reshape(b.shape[0], -1).float() @ a.reshape(a.shape[0], -1).float()
    return (scaling * delta).reshape(shape)


def run_in_torch(encoder: Encoder) -> Encoder:
    """Detach ``encoder``'s compiled runtimes (OpenVINO image tower and patch graph), which hold the
    weights they were built from: an encoder whose weights change runs its torch modules."""
    if encoder.image_runtime is not None or encoder.patch_runtime is not None:
        from ..device import precision_name

        encoder.image_runtime = encoder.patch_runtime = None
        encoder.runtime, encoder.precision = "torch", precision_name(encoder.dtype)
    return encoder


@torch.no_grad()
def apply_tensors(encoder: Encoder, tensors: dict[str, np.ndarray]) -> None:
    """Write an adapter's encoder tensors into ``encoder`` in place (its dtype and device kept).
    LoRA factors are stored with their scaling folded into ``B``."""
    attribute, root = trainable_root(encoder)
    # The registry attaches a runtime for the adapted weights after applying an adapter.
    run_in_torch(encoder)
    for name, value in tensors.items():
        if name.startswith(ENCODER_PREFIX):
            target_name = name[len(ENCODER_PREFIX):]
            owner, _, rest = target_name.partition(".")
            if owner != attribute:
                raise ClipxferError(f"adapter tensor '{name}' does not belong to this model's {attribute}")
            try:
                param = root.get_parameter(rest)
            except AttributeError:
                raise ClipxferError(f"adapter tensor '{name}' names no parameter of model '{encoder.id}'") from None
            if tuple(param.shape) != tuple(value.shape):
                raise ClipxferError(f"adapter tensor '{name}' has shape {tuple(value.shape)}, the model {tuple(param.shape)}")
            param.copy_(torch.as_tensor(value).to(param.dtype))
    for name in tensors:
        if name.startswith(LORA_PREFIX) and name.endswith(".A"):
            module_name = name[len(LORA_PREFIX):-2]
            owner, _, rest = module_name.partition(".")
            if owner != attribute:
                raise ClipxferError(f"adapter tensor '{name}' does not belong to this model's {attribute}")
            module = root.get_submodule(rest)
            # LoRA on attention adapts the packed query/key/value projection (see train.lora_targets).
            weight = module.in_proj_weight if isinstance(module, torch.nn.MultiheadAttention) else module.weight
            a = torch.as_tensor(tensors[name])
            b = torch.as_tensor(tensors[f"{LORA_PREFIX}{module_name}.B"])
            delta = lora_delta(a, b, 1.0, weight.shape)
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


def _not_an_adapter(path: Path, meta: dict[str, Any]) -> ClipxferError:
    """One line saying what the file at ``path`` is instead of an adapter, and how it is used."""
    if meta.get("format") == DETECTOR_FORMAT:
        return ClipxferError(f"{path}: an anomaly detector (made by 'clipxfer anomaly fit'), not a fine-tuning "
                             f"adapter: use it with 'clipxfer anomaly score FOLDER --detector {path}'")
    if meta.get("format") == HEAD_FORMAT and meta.get("method") != "finetune":
        return ClipxferError(f"{path}: a clipxfer {meta.get('method')} head, not a fine-tuning adapter: use it with "
                             f"'clipxfer predict {path} IMAGES'; --model BASE+ADAPTER takes a file made by "
                             "'clipxfer finetune'")
    return ClipxferError(f"{path}: not a fine-tuning adapter (format {meta.get('format')!r}): --model BASE+ADAPTER "
                         "takes a file made by 'clipxfer finetune'")


def read_adapter(path: str | os.PathLike) -> Adapter:
    """The adapter at ``path``, checked: a clipxfer head file of method ``finetune`` that names its base
    model, with finite tensors whose hash is the one its model id carries (:func:`~.ids.adapted_id`),
    so an id always stands for the weights that are applied (and the OpenVINO graph cached for it);
    anything else is one line naming the file."""
    path = Path(path)
    meta = read_artifact_metadata(path, "adapter", "make one with 'clipxfer finetune'")
    if meta.get("format") != HEAD_FORMAT or meta.get("method") != "finetune":
        raise _not_an_adapter(path, meta)
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("base_model_id"), str) \
            or not isinstance(meta.get("model_id"), str):
        raise ClipxferError(f"{path}: damaged fine-tuning adapter (no base model or model id): "
                            "make it again with 'clipxfer finetune'")
    tensors = read_artifact_tensors(path, "adapter")
    for name, value in tensors.items():
        if not np.isfinite(value).all():
            raise ClipxferError(f"{path}: tensor '{name}' holds values that are not finite (NaN or infinity)")
    if adapted_id(config["base_model_id"], tensors) != meta["model_id"]:
        raise ClipxferError(f"{path}: the adapter's tensors do not match its model id {meta['model_id']} "
                            "(changed after 'clipxfer finetune' wrote it): make it again with 'clipxfer finetune'")
    return Adapter(path, meta["model_id"], config, tensors)


def load_adapted(base: Encoder, path: str | os.PathLike) -> Encoder:
    """``base`` with the adapter at ``path`` applied (in place) and its id set to the adapted id.

    An adapter made for another base model is refused with one line naming both."""
    adapter = read_adapter(path)
    expected = adapter.config["base_model_id"]
    if expected != base.id:
        raise ClipxferError(
            f"{path}: this adapter was made for model '{expected}', not '{base.id}': "
            f"use --model {spec_for_id(expected)}+{path}"
        )
    apply_tensors(base, adapter.tensors)
    base.id = adapter.model_id
    base.adapter_path = str(path)
    return base
