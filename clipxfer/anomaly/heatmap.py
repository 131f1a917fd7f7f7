"""Anomaly maps drawn over their images (PNG overlays)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ClipxferError
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


def overlay_path(heatmaps: str | os.PathLike, root: str | os.PathLike, image: str | os.PathLike) -> Path:
    """Where the overlay of ``image`` (below ``root``) goes: the same subfolder under ``heatmaps``
    and the whole file name plus ``.png`` (``a/part.jpg`` -> ``a/part.jpg.png``), so ``part.jpg`` and
    ``part.png`` get one map each."""
    relative = Path(image).relative_to(root)
    return Path(heatmaps) / relative.parent / f"{relative.name}.png"


def check_heatmap_folder(heatmaps: str | os.PathLike, root: str | os.PathLike, images: list[Path]) -> list[Path]:
    """The overlay path of each of ``images`` (below ``root``), after refusing a ``heatmaps`` folder that
    would mix maps with the images: one that is, holds or lies inside ``root`` and already has files
    (a new or empty one is fine), or any overlay path that is one of the images."""
    folder, source = Path(heatmaps).resolve(), Path(root).resolve()
    overlaps = folder == source or source in folder.parents or folder in source.parents
    if overlaps and folder.is_dir() and any(folder.iterdir()):
        raise ClipxferError(f"--heatmaps {heatmaps}: this folder is, holds or lies inside the scored folder {root} and "
                            "is not empty, so overlays could overwrite or be mixed with images: choose a new folder")
    targets = [overlay_path(heatmaps, root, image) for image in images]
    inputs = {Path(image).resolve() for image in images}
    for target in targets:
        if target.resolve() in inputs:
            raise ClipxferError(f"--heatmaps {heatmaps}: the overlay {target} would overwrite a scored image: "
                                "choose a new folder")
    return targets
