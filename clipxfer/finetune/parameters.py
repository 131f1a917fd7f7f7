"""Which parameters of the image tower a fine-tuning method moves directly (LoRA's are in :mod:`.lora`)."""

from __future__ import annotations

import re
from typing import Sequence

import torch

from .settings import FinetuneSettings


def tower_blocks(names: Sequence[str]) -> list[str]:
    """The ordered block prefixes of a tower: timm EfficientNet stages (``blocks.N``) or ViT
    residual blocks (``visual.transformer.resblocks.N``)."""
    units: list[str] = []
    for name in names:
        match = re.match(r"(blocks\.\d+|visual\.transformer\.resblocks\.\d+)\.", name)
        if match and match.group(1) not in units:
            units.append(match.group(1))
    return units


def is_tower(name: str, attribute: str) -> bool:
    """Parameters of the image tower proper: not lite's ConSE ImageNet classifier, not CLIP's text side."""
    if attribute == "model":
        return name.startswith("visual.")
    return not name.startswith("classifier.")


def _is_top(name: str) -> bool:
    """Layers after the last block, which ``partial`` and ``lora`` always move."""
    return name.startswith(("conv_head.", "bn2.", "visual.ln_post.", "visual.proj"))


def moving_parameters(root: torch.nn.Module, attribute: str, settings: FinetuneSettings) -> list[str]:
    """Names (relative to ``root``) of the parameters the method trains directly (none for LoRA)."""
    names = [n for n, _ in root.named_parameters() if is_tower(n, attribute)]
    if settings.strategy in ("lp-ft", "full"):
        return names
    if settings.strategy == "lora":
        return []
    last = tower_blocks(names)[-settings.blocks :]  # partial and top
    return [n for n in names if _is_top(n) or any(n.startswith(u + ".") for u in last)]
