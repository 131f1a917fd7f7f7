"""The training images as pixels: decoded once, then augmented afresh every epoch."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..images import ImageLike, load_model_input


def decode_pixels(images: Sequence[ImageLike], size: int) -> np.ndarray:
    """Images decoded once to ``uint8 (n, size, size, 3)``: every epoch augments these."""
    return np.stack([load_model_input(item, size) for item in images])


def augment_batch(pixels: np.ndarray, generator: torch.Generator, crop_scale: float) -> torch.Tensor:
    """Per image: random resized crop (area ``crop_scale``..1, aspect 3/4..4/3), horizontal flip,
    brightness and contrast jitter of +-10%; ``uint8 (n, s, s, 3)`` in and out."""
    batch = torch.as_tensor(pixels).permute(0, 3, 1, 2).float()
    n, _, height, width = batch.shape
    out = torch.empty_like(batch)
    for i in range(n):
        draw = torch.rand(6, generator=generator).tolist()
        area = (crop_scale + (1 - crop_scale) * draw[0]) * height * width
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * draw[1])
        h = min(height, int(round(math.sqrt(area / aspect))))
        w = min(width, int(round(math.sqrt(area * aspect))))
        top, left = int(draw[2] * (height - h)), int(draw[3] * (width - w))
        crop = batch[i : i + 1, :, top : top + h, left : left + w]
        image = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
        if draw[4] < 0.5:
            image = image.flip(-1)
        mean = image.mean()
        contrast = 1 + 0.2 * (torch.rand(1, generator=generator).item() - 0.5)
        brightness = 1 + 0.2 * (draw[5] - 0.5)
        out[i] = ((image - mean) * contrast + mean) * brightness
    return out.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
