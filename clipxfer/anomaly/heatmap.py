"""Anomaly maps drawn over their images (PNG overlays)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import ImageLike, as_pil


def map_to_image_size(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A square model-input map stretched back to the original ``(width, height)`` (bilinear)."""
    return np.asarray(Image.fromarray(anomaly_map.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def overlay(image: ImageLike, anomaly_map: np.ndarray, low: float, high: float, opacity: float = 0.5) -> Image.Image:
    """The image with ``anomaly_map`` in the jet colour map on top: ``low`` and below is blue,
    ``high`` (the detector's threshold) and above is red."""
    from matplotlib import colormaps

    picture = as_pil(image)
    values = map_to_image_size(anomaly_map, picture.size)
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0, 1)
    colours = colormaps["jet"](scaled)[..., :3]
    blended = (1 - opacity) * np.asarray(picture, np.float32) / 255.0 + opacity * colours
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def write_overlay(image: ImageLike, anomaly_map: np.ndarray, low: float, high: float, path: str | os.PathLike) -> Path:
    """Write :func:`overlay` as a PNG to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, anomaly_map, low, high).save(path)
    return path
