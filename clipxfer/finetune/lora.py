"""LoRA for ``--method lora``: which layers it adapts, adding the layers with ``peft``, and the factors
as adapter tensors."""

from __future__ import annotations

import numpy as np
import torch

from ..encoders.ids import LORA_PREFIX
from ..errors import ClipxferError
from ..extras import import_extra
from .parameters import is_tower, tower_blocks
from .settings import FinetuneSettings


def lora_targets(root: torch.nn.Module, attribute: str, settings: FinetuneSettings) -> list[str]:
    """Module names LoRA adapts in the last ``blocks`` blocks: the Linear and 1x1 Conv2d layers
    (EfficientNet's pointwise convolutions; a ViT's MLP projections) and a ViT's attention.

    ``nn.MultiheadAttention`` reads its projection weights directly instead of calling Linear
    layers, so it is targeted whole: peft's LoRA for it adapts the packed query/key/value
    projection (CLIP-LoRA's places, see :func:`_inject_lora`), and its ``out_proj`` is not
    targeted on its own (an adapter there would never run)."""
    names = [n for n, _ in root.named_parameters() if is_tower(n, attribute)]
    last = tower_blocks(names)[-settings.blocks :]
    attention = {n for n, m in root.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}
    inside_attention = {f"{n}.out_proj" for n in attention}
    targets = []
    for name, module in root.named_modules():
        inside = any(name.startswith(u + ".") for u in last) or name in ("conv_head",)
        if not inside or name in inside_attention:
            continue
        if name in attention or isinstance(module, torch.nn.Linear) or (
            isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
        ):
            targets.append(name)
    if not targets:
        raise ClipxferError(f"--method lora: no Linear, attention or 1x1 conv layers found in the last {settings.blocks} blocks")
    return targets


def _inject_lora(root: torch.nn.Module, targets: list[str], settings: FinetuneSettings) -> dict[str, torch.nn.Module]:
    """Add LoRA layers with peft; returns ``{target name: peft LoRA layer}``."""
    import_extra("peft", "finetune", "--method lora")
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, target_modules=targets, lora_dropout=0.0)
    inject_adapter_in_model(config, root)
    layers = {name: module for name, module in root.named_modules() if isinstance(module, LoraLayer)}
    # peft adapts an attention's output projection together with its query/key/value projection,
    # and peft 0.21 adds the output projection's delta twice in the forward pass. As in CLIP-LoRA's
    # default, only q, k and v move: the output projection's factors stay zero and frozen.
    output_projections = {name for name in layers if name.endswith(".base_layer.out_proj")}
    for name, param in root.named_parameters():
        param.requires_grad_("lora_" in name and not any(name.startswith(p + ".") for p in output_projections))
    return {name: layer for name, layer in layers.items() if name not in output_projections}


def lora_factors(layers: dict[str, torch.nn.Module], attribute: str, alpha: float = 1.0) -> dict[str, np.ndarray]:
    """LoRA factors as adapter tensors, scaling (and WiSE ``alpha``) folded into ``B``."""
    out = {}
    for wrapped_name, layer in layers.items():
        # peft nests the wrapped module as ``base_layer``; the adapter names the plain model's module.
        name = wrapped_name.replace(".base_layer", "")
        a = layer.lora_A["default"].weight.detach().float()
        b = layer.lora_B["default"].weight.detach().float() * (layer.scaling["default"] * alpha)
        out[f"{LORA_PREFIX}{attribute}.{name}.A"] = a.cpu().numpy()
        out[f"{LORA_PREFIX}{attribute}.{name}.B"] = b.cpu().numpy()
    return out
