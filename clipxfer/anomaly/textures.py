"""A seeded, reproducible defect set from real texture photos (scikit-image's brick, grass, gravel).

There is no MVTec-AD here, so this builds its layout from real photos: many 250x250 crops are the
good parts, and synthetic defects with exact masks are pasted on other crops. Local defects
(scratch, hole, stain, missing_thread, colour_spot) cover a small area; point defects (speckle: a dot
1-5% of the side across) and faint scratches (1-2 px wide, low contrast) are the small and subtle
local kinds; global ones (colour_shift, blur, coarse) change the whole texture and have no mask, and
the texture changes (grain_scale, orientation, period) change only the grain while keeping each
channel's mean and contrast (standard deviation) those of the part they replace. All parts come from
one random process (see :func:`good_crop`), as parts from one production line do.

The synthetic flaws that choose a detector's settings (:mod:`clipxfer.anomaly.synthetic`) are other
code with other seeds: nothing here is used to choose anything.

Layout (MVTec-AD's)::

    OUT/<texture>/train/good/*.png
    OUT/<texture>/test/good/*.png, test/<defect>/*.png
    OUT/<texture>/ground_truth/<defect>/<name>_mask.png     local defects only
    OUT/defects.json                                         {"kinds": {defect: "local"|"global"}, ...}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..extras import import_extra

TEXTURES = ("brick", "grass", "gravel")
#: A constant tint per texture (the photos are greyscale); colour defects change it.
TINTS = {"brick": (1.0, 0.82, 0.7), "grass": (0.8, 1.0, 0.75), "gravel": (0.95, 0.92, 0.85)}
LOCAL_DEFECTS = ("scratch", "hole", "stain", "missing_thread", "colour_spot", "speckle", "faint_scratch")
GLOBAL_DEFECTS = ("colour_shift", "blur", "coarse", "grain_scale", "orientation", "period")
SIZE = 250


def texture_photo(name: str) -> np.ndarray:
    """The greyscale scikit-image photo ``name`` as float32 in [0, 1]."""
    skimage_data = import_extra("skimage.data", "data", "the texture set")

    return getattr(skimage_data, name)().astype(np.float32) / 255.0


def good_crop(photo: np.ndarray, tint: tuple, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One good part: a crop anywhere in the photo, rotated by up to 5 degrees, scaled by 0.9-1.1,
    randomly flipped, tinted, with a small brightness jitter; float32 RGB in [0, 1], ``size`` square.

    Every good image (fit, calibration, test) comes from this one process, so held-out good images
    are exchangeable with test good images, as the conformal guarantee assumes; the jitter means no
    test image repeats a training image even where their crops overlap.
    """
    side = int(round(size * rng.uniform(0.9, 1.1) * 1.1))  # 10% margin for the rotation's corners
    y = rng.integers(0, photo.shape[0] - side + 1)
    x = rng.integers(0, photo.shape[1] - side + 1)
    region = Image.fromarray((photo[y : y + side, x : x + side] * 255).astype(np.uint8))
    region = region.rotate(rng.uniform(-5, 5), resample=Image.BILINEAR)
    margin = (side - side / 1.1) / 2
    region = region.crop((margin, margin, side - margin, side - margin)).resize((size, size), Image.BICUBIC)
    crop = np.asarray(region, np.float32) / 255.0
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    rgb = crop[..., None] * np.asarray(tint, np.float32) * rng.uniform(0.96, 1.04)
    return np.clip(rgb, 0, 1).astype(np.float32)


def _blend(image: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    alpha = alpha[..., None]
    return image * (1 - alpha) + target * alpha


def _soft(mask: Image.Image, radius: float) -> np.ndarray:
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255.0


def _centre(rng: np.random.Generator, margin: int, size: int = SIZE) -> tuple[int, int]:
    return int(rng.integers(margin, size - margin)), int(rng.integers(margin, size - margin))


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright or dark polyline, 40-100 px long."""
    mask = Image.new("L", (SIZE, SIZE))
    x, y = _centre(rng, 60)
    points = [(x, y)]
    angle = rng.uniform(0, np.pi)
    for _ in range(int(rng.integers(2, 4))):
        angle += rng.uniform(-0.5, 0.5)
        step = rng.uniform(15, 35)
        x, y = x + step * np.cos(angle), y + step * np.sin(angle)
        points.append((x, y))
    ImageDraw.Draw(mask).line(points, fill=255, width=int(rng.integers(2, 4)), joint="curve")
    alpha = _soft(mask, 0.7)
    shade = 0.92 if rng.random() < 0.5 else 0.08
    return _blend(image, np.full_like(image, shade), 0.85 * alpha), alpha > 0.25


def hole(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark elliptical hole, 8-18 px radius, with a soft rim."""
    mask = Image.new("L", (SIZE, SIZE))
    x, y = _centre(rng, 30)
    rx, ry = rng.uniform(8, 18, size=2)
    ImageDraw.Draw(mask).ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
    alpha = _soft(mask, 1.5)
    return _blend(image, np.full_like(image, 0.04), alpha), alpha > 0.5


def stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An irregular brownish or dark blob, 15-30 px across (smoothed noise inside a disc)."""
    x, y = _centre(rng, 40)
    radius = rng.uniform(15, 30)
    noise = Image.fromarray((rng.random((SIZE, SIZE)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(6))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = np.clip(1.3 - np.hypot(xx - x, yy - y) / radius, 0, 1)
    noise = np.asarray(noise, np.float32)
    blob = disc + 0.35 * (noise - noise.mean()) / max(float(noise.std()), 1e-6)
    # Noise shapes the edge only near the disc; elsewhere it would scatter spots over the whole part.
    region = Image.fromarray((((blob > 0.6) & (disc > 0)) * 255).astype(np.uint8))
    alpha = _soft(region, 2.0)
    colour = np.asarray([0.45, 0.3, 0.15] if rng.random() < 0.5 else [0.25, 0.25, 0.25], np.float32)
    stained = image * colour / 0.6
    return _blend(image, np.clip(stained, 0, 1), 0.9 * alpha), alpha > 0.4


def missing_thread(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A straight band, 4-8 px wide and 60-150 px long, where the texture is missing (blurred flat)."""
    mask = Image.new("L", (SIZE, SIZE))
    width, length = rng.uniform(4, 8), rng.uniform(60, 150)
    x, y = _centre(rng, 20)
    if rng.random() < 0.5:
        box = [x - length / 2, y - width / 2, x + length / 2, y + width / 2]
    else:
        box = [x - width / 2, y - length / 2, x + width / 2, y + length / 2]
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    alpha = _soft(mask, 0.8)
    flat = np.stack([np.asarray(Image.fromarray((image[..., c] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(8)),
                                np.float32) / 255.0 for c in range(3)], axis=-1)  # fmt: skip
    return _blend(image, flat, alpha), alpha > 0.5


def colour_spot(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A local discolouration (channel gains), 15-30 px radius, soft-edged."""
    mask = Image.new("L", (SIZE, SIZE))
    x, y = _centre(rng, 40)
    rx, ry = rng.uniform(15, 30, size=2)
    ImageDraw.Draw(mask).ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
    alpha = _soft(mask, 4.0)
    gains = rng.permutation(np.asarray([1.35, 0.85, 0.6], np.float32))
    return _blend(image, np.clip(image * gains, 0, 1), alpha), alpha > 0.5


def colour_shift(image: np.ndarray, rng: np.random.Generator, **_) -> np.ndarray:
    """The whole part in another colour (channel gains)."""
    return np.clip(image * rng.permutation(np.asarray([1.25, 0.9, 0.75], np.float32)), 0, 1)


def blur(image: np.ndarray, rng: np.random.Generator, **_) -> np.ndarray:
    """The whole texture worn flat (Gaussian blur, sigma 2-3 px)."""
    sigma = rng.uniform(2, 3)
    return np.stack([np.asarray(Image.fromarray((image[..., c] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(sigma)),
                                np.float32) / 255.0 for c in range(3)], axis=-1)  # fmt: skip


def coarse(image: np.ndarray, rng: np.random.Generator, photo: np.ndarray, tint: tuple) -> np.ndarray:
    """The texture at 1.4-1.6x its scale (a smaller crop of the photo, enlarged)."""
    side = int(SIZE / rng.uniform(1.4, 1.6))
    small = good_crop(photo, tint, rng, size=side)
    enlarged = Image.fromarray((small * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
    return np.asarray(enlarged, np.float32) / 255.0


def speckle(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A point defect: a dark or bright dot 1-5% of the side across (3-12 px on 250), hard-edged."""
    mask = Image.new("L", (SIZE, SIZE))
    x, y = _centre(rng, 15)
    radius = rng.uniform(0.005, 0.025) * SIZE
    ImageDraw.Draw(mask).ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
    alpha = _soft(mask, 0.5)
    local = float(image[max(0, y - 12) : y + 12, max(0, x - 12) : x + 12].mean())
    # Away from the neighbourhood's brightness by 0.3-0.45, so the dot is seen but not glaring.
    shade = np.clip(local + (1 if local < 0.5 else -1) * rng.uniform(0.3, 0.45), 0, 1)
    return _blend(image, np.full_like(image, shade), alpha), alpha > 0.5


def faint_scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin low-contrast line: 1-2 px wide, 50-120 px long, lighter or darker by 0.12-0.2."""
    mask = Image.new("L", (SIZE, SIZE))
    x, y = _centre(rng, 60)
    angle, length = rng.uniform(0, np.pi), rng.uniform(50, 120)
    end = (x + length * np.cos(angle), y + length * np.sin(angle))
    ImageDraw.Draw(mask).line([(x, y), end], fill=255, width=int(rng.integers(1, 3)))
    alpha = _soft(mask, 0.4)
    delta = (1 if rng.random() < 0.5 else -1) * rng.uniform(0.12, 0.2)
    # The mask is the line grown by one pixel: its own pixels are too few to be a fair pixel target.
    region = np.asarray(mask.filter(ImageFilter.MaxFilter(3))) > 0
    return np.clip(image + delta * alpha[..., None], 0, 1), region


def match_moments(changed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``changed`` with each channel's mean and standard deviation set to those of ``reference``:
    a texture change that keeps brightness, contrast and colour."""
    axes = (0, 1)
    centred = changed - changed.mean(axis=axes)
    scaled = centred / np.maximum(changed.std(axis=axes), 1e-6) * reference.std(axis=axes)
    return np.clip(scaled + reference.mean(axis=axes), 0, 1).astype(np.float32)


def _resampled(photo: np.ndarray, tint: tuple, rng: np.random.Generator, scale_x: float, scale_y: float,
               angle: float = 0.0) -> np.ndarray:
    """A good crop of the photo whose texture is scaled by ``scale_x`` along ``angle`` (degrees) and
    ``scale_y`` across it: the crop is cut larger or smaller, rotated, resized and rotated back."""
    big = int(SIZE * 1.5)
    crop = good_crop(photo, tint, rng, size=big)
    grey = Image.fromarray((crop.mean(axis=-1) / float(np.mean(tint)) * 255).clip(0, 255).astype(np.uint8))
    grey = grey.rotate(angle, resample=Image.BILINEAR)
    grey = grey.resize((int(big * scale_x), int(big * scale_y)), Image.BICUBIC).rotate(-angle, resample=Image.BILINEAR)
    left, top = (grey.width - SIZE) // 2, (grey.height - SIZE) // 2
    texture = np.asarray(grey.crop((left, top, left + SIZE, top + SIZE)), np.float32) / 255.0
    return texture[..., None] * np.asarray(tint, np.float32)


def grain_scale(image: np.ndarray, rng: np.random.Generator, photo: np.ndarray, tint: tuple) -> np.ndarray:
    """The grain finer (0.55-0.7x) or coarser (1.5-1.7x), with the part's own mean and contrast per channel."""
    scale = rng.uniform(0.55, 0.7) if rng.random() < 0.5 else rng.uniform(1.5, 1.7)
    return match_moments(_resampled(photo, tint, rng, scale, scale), image)


def orientation(image: np.ndarray, rng: np.random.Generator, photo: np.ndarray, tint: tuple) -> np.ndarray:
    """The grain drawn out (1.6-1.9x) along a random direction, so it runs one way; mean and contrast kept."""
    return match_moments(_resampled(photo, tint, rng, rng.uniform(1.6, 1.9), 1.0, rng.uniform(0, 180)), image)


def period(image: np.ndarray, rng: np.random.Generator, photo: np.ndarray, tint: tuple) -> np.ndarray:
    """The repeat along one axis (rows or columns, like a weave's period) 0.65-0.75x or 1.35-1.5x; mean and contrast kept."""
    factor = rng.uniform(0.65, 0.75) if rng.random() < 0.5 else rng.uniform(1.35, 1.5)
    scales = (factor, 1.0) if rng.random() < 0.5 else (1.0, factor)
    return match_moments(_resampled(photo, tint, rng, *scales), image)


LOCAL: dict[str, Callable] = {name: globals()[name] for name in LOCAL_DEFECTS}
GLOBAL: dict[str, Callable] = {name: globals()[name] for name in GLOBAL_DEFECTS}


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)


def build_texture_set(
    out: str | os.PathLike,
    textures: tuple[str, ...] = TEXTURES,
    train_good: int = 120,
    test_good: int = 60,
    per_local: int = 12,
    per_global: int = 12,
    seed: int = 0,
) -> Path:
    """Write the defect set under ``out`` (layout in the module docstring); the same seed writes
    the same files. Returns ``out``."""
    out = Path(out)
    for number, name in enumerate(textures):
        photo, tint = texture_photo(name), TINTS.get(name, (1.0, 1.0, 1.0))
        rng = np.random.default_rng([seed, number])
        root = out / name
        for i in range(train_good):
            _save(good_crop(photo, tint, rng), root / "train" / "good" / f"{i:03d}.png")
        for i in range(test_good):
            _save(good_crop(photo, tint, rng), root / "test" / "good" / f"{i:03d}.png")
        for kind, paste in LOCAL.items():
            for i in range(per_local):
                image, mask = paste(good_crop(photo, tint, rng), rng)
                _save(image, root / "test" / kind / f"{i:03d}.png")
                _save(mask.astype(np.float32)[..., None].repeat(3, -1), root / "ground_truth" / kind / f"{i:03d}_mask.png")
        for kind, change in GLOBAL.items():
            for i in range(per_global):
                image = change(good_crop(photo, tint, rng), rng, photo=photo, tint=tint)
                _save(image, root / "test" / kind / f"{i:03d}.png")
    kinds = {**{k: "local" for k in LOCAL}, **{k: "global" for k in GLOBAL}}
    meta = {"seed": seed, "textures": list(textures), "kinds": kinds, "size": SIZE,
            "train_good": train_good, "test_good": test_good, "per_local": per_local, "per_global": per_global}  # fmt: skip
    (out / "defects.json").write_text(json.dumps(meta, indent=2))
    return out
