"""Synthetic flaws pasted into held-out good parts: the validation that chooses a detector's settings
(working resolution, which detectors to fuse) when no real defect is at hand.

These are used only to choose settings, never reported as a result. They are deliberately other code
with other seeds than the benchmark's defects (:mod:`clipxfer.anomaly.textures`): flaws are cut from
the part itself (CutPaste, Li et al., CVPR 2021) or drawn generically (specks, faint lines), and the
global changes zoom or re-contrast the whole part, so choosing on them is not choosing on the test set.

Kinds: ``cutpaste`` (a patch of the part moved elsewhere), ``speckles`` (1-3 dots 1-3% of the side),
``thin_line`` (a 1-2 px line of low contrast), ``texture_swap`` (a region refilled with the part's own
texture at another scale), ``global_grain`` (the whole part zoomed 0.6x or 1.5x, mean and contrast
kept), ``global_contrast`` (contrast x0.6-0.75 or x1.35-1.6 about the mean).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..images import ImageLike, as_pil

#: Mixed into every draw, so no seed the benchmark's defect set uses gives the same random stream.
VALIDATION_SEED = 0x5A17


def _unit(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 255.0


def _box(rng: np.random.Generator, side: int, low: float, high: float) -> tuple[int, int, int, int]:
    """A random rectangle ``(left, top, width, height)`` inside ``side``, its area ``low``-``high`` of the part."""
    area = rng.uniform(low, high) * side * side
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    width = int(np.clip(np.sqrt(area * aspect), 4, side - 2))
    height = int(np.clip(area / width, 4, side - 2))
    return int(rng.integers(0, side - width)), int(rng.integers(0, side - height)), width, height


def cutpaste(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A patch (2-8% of the area) cut from one place, brightened or darkened a little, pasted elsewhere."""
    side = image.shape[0]
    left, top, width, height = _box(rng, side, 0.02, 0.08)
    patch = image[top : top + height, left : left + width] * rng.uniform(0.85, 1.15)
    x, y = int(rng.integers(0, side - width)), int(rng.integers(0, side - height))
    out = image.copy()
    out[y : y + height, x : x + width] = patch
    return out


def speckles(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One to three dots, each 1-3% of the side across, lighter or darker by 0.25-0.5."""
    side = image.shape[0]
    mask = Image.new("L", (side, side))
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        radius = max(1.0, rng.uniform(0.005, 0.015) * side)
        x, y = rng.uniform(radius, side - radius, size=2)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    delta = (1 if rng.random() < 0.5 else -1) * rng.uniform(0.25, 0.5)
    return np.clip(image + delta * alpha, 0, 1)


def thin_line(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A straight line 1-2 px wide and 20-50% of the side long, lighter or darker by 0.1-0.25."""
    side = image.shape[0]
    mask = Image.new("L", (side, side))
    length, angle = rng.uniform(0.2, 0.5) * side, rng.uniform(0, np.pi)
    x, y = rng.uniform(0.1 * side, 0.9 * side, size=2)
    end = (x + length * np.cos(angle), y + length * np.sin(angle))
    ImageDraw.Draw(mask).line([(x, y), end], fill=255, width=int(rng.integers(1, 3)))
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    delta = (1 if rng.random() < 0.5 else -1) * rng.uniform(0.1, 0.25)
    return np.clip(image + delta * alpha, 0, 1)


def _zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """The part's texture scaled by ``factor`` (above 1: a centre crop enlarged; below: the part
    shrunk and mirrored around itself to fill the side)."""
    side = image.shape[0]
    picture = Image.fromarray((image * 255).astype(np.uint8))
    if factor >= 1:
        crop = side / factor
        offset = (side - crop) / 2
        zoomed = picture.crop((offset, offset, offset + crop, offset + crop)).resize((side, side), Image.BICUBIC)
        return _unit(np.asarray(zoomed))
    small = _unit(np.asarray(picture.resize((max(2, int(side * factor)),) * 2, Image.BICUBIC)))
    reps = int(np.ceil(side / len(small))) + 1
    tiled = np.pad(small, ((0, len(small) * (reps - 1)), (0, len(small) * (reps - 1)), (0, 0)), mode="symmetric")
    return tiled[:side, :side]


def _keep_moments(changed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    mean, std = reference.mean(axis=(0, 1)), reference.std(axis=(0, 1))
    scaled = (changed - changed.mean(axis=(0, 1))) / np.maximum(changed.std(axis=(0, 1)), 1e-6)
    return np.clip(scaled * std + mean, 0, 1)


def texture_swap(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rectangle (3-10% of the area) refilled with the part's own texture at 0.5x or 2x scale."""
    side = image.shape[0]
    left, top, width, height = _box(rng, side, 0.03, 0.1)
    other = _zoom(image, 0.5 if rng.random() < 0.5 else 2.0)
    out = image.copy()
    region = (slice(top, top + height), slice(left, left + width))
    out[region] = _keep_moments(other[region], image[region])
    return out


def global_grain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The whole part zoomed 0.55-0.65x or 1.4-1.6x, with its own mean and contrast."""
    factor = rng.uniform(0.55, 0.65) if rng.random() < 0.5 else rng.uniform(1.4, 1.6)
    return _keep_moments(_zoom(image, factor), image)


def global_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast scaled by 0.6-0.75 or 1.35-1.6 about each channel's mean."""
    gain = rng.uniform(0.6, 0.75) if rng.random() < 0.5 else rng.uniform(1.35, 1.6)
    mean = image.mean(axis=(0, 1))
    return np.clip((image - mean) * gain + mean, 0, 1)


FLAWS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "cutpaste": cutpaste, "speckles": speckles, "thin_line": thin_line, "texture_swap": texture_swap,
    "global_grain": global_grain, "global_contrast": global_contrast,
}  # fmt: skip


def synthetic_flaw(item: ImageLike, kind: str, key: int, size: int | None = None) -> np.ndarray:
    """Good part ``item`` with one ``kind`` flaw, as ``uint8 (size, size, 3)`` (default: its own
    larger side); ``key`` (e.g. the part's row) seeds the flaw, so a part's flaw is the same every run."""
    picture = as_pil(item)
    side = size or max(picture.size)
    image = _unit(np.asarray(picture.resize((side, side), Image.BICUBIC)))
    rng = np.random.default_rng([VALIDATION_SEED, int(key), list(FLAWS).index(kind)])
    return (np.clip(FLAWS[kind](image, rng), 0, 1) * 255).round().astype(np.uint8)
