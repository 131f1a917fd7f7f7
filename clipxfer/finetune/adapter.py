"""The adapter file: what fine-tuning changed in an encoder, and the encoder id it defines.

An adapter is a head file (``clipxfer-head/1``, method ``finetune``, see
:mod:`clipxfer.heads.finetune`) whose tensors are the head's linear parts plus, under
``encoder/<module>.<parameter>``, the full values of the parameters that moved (``lp-ft``,
``partial``, ``full``), or, under ``lora/<module>.A`` / ``.B``, LoRA factors merged into the
frozen weights at load time (``W + scaling * B @ A``). Its config names the base encoder id; its
model id is ``<base id>+ft-<hash of those tensors>``, so indexes and heads made with the adapted
encoder refuse the plain one and the other way round.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..encoders.base import Encoder
from ..errors import ClipxferError

ENCODER_PREFIX = "encoder/"
LORA_PREFIX = "lora/"
ID_MARK = "+ft-"


def trainable_root(encoder: Encoder) -> tuple[str, torch.nn.Module]:
    """``(attribute, module)`` of the encoder's image tower, the part fine-tuning moves: lite's
    EfficientNet (``image_model``) or an open_clip model (``model``, its ``visual`` tower)."""
    for attribute in ("image_model", "model"):
        module = getattr(encoder, attribute, None)
        if isinstance(module, torch.nn.Module):
            return attribute, module
    raise ClipxferError(f"model '{encoder.id}' has no image tower clipxfer can fine-tune")


def adapted_id(base_id: str, tensors: dict[str, np.ndarray]) -> str:
    """``<base weights id>+ft-<16 hex>``: the hash covers every encoder tensor's name, shape and bytes.
    Fine-tuning changes the float weights (a runtime quantizes the result when it is loaded), so the
    base is named without ``@int8``."""
    from ..encoders.openvino_runtime import weights_id

    base_id = weights_id(base_id)
    digest = hashlib.sha256(base_id.encode())
    for name in sorted(tensors):
        if name.startswith((ENCODER_PREFIX, LORA_PREFIX)):
            value = np.ascontiguousarray(tensors[name], dtype=np.float32)
            digest.update(f"{name}:{value.shape}".encode())
            digest.update(value.tobytes())
    return f"{base_id}{ID_MARK}{digest.hexdigest()[:16]}"


def base_of(model_id: str) -> str | None:
    """The base encoder id of an adapted id, or None for a plain one."""
    base, mark, _ = model_id.rpartition(ID_MARK)
    return base if mark else None


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


def read_adapter(path: str | os.PathLike):
    """The adapter at ``path`` as a loaded :class:`~clipxfer.heads.finetune.FinetuneHead`."""
    from ..heads.base import load_head, read_head_metadata

    path = Path(path)
    meta = read_head_metadata(path)
    if meta.get("method") != "finetune" or "base_model_id" not in meta.get("config", {}):
        raise ClipxferError(f"{path}: a clipxfer {meta.get('method')} head, not an adapter made by 'clipxfer finetune'")
    return load_head(path)


def load_adapted(base: Encoder, path: str | os.PathLike) -> Encoder:
    """``base`` with the adapter at ``path`` applied (in place) and its id set to the adapted id.

    An adapter made for another base model is refused with one line naming both."""
    head = read_adapter(path)
    expected = head.config["base_model_id"]
    if expected != base.id:
        from ..encoders.registry import spec_for_id

        raise ClipxferError(
            f"{path}: this adapter was made for model '{expected}', not '{base.id}': "
            f"use --model {spec_for_id(expected)}+{path}"
        )
    apply_tensors(base, head.weights)
    base.id = head.model_id
    base.adapter_path = str(path)
    return base
