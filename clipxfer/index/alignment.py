"""Aligned thumbnail correlation: the copy-specific signal ``dups`` checks candidate pairs with.

A copy keeps its original's pixel layout through resizing, recompression and recolouring, but a
small crop shifts and stretches it -- on a 28-pixel image a one-pixel crop moves it as much as two
different garments of one kind differ. So two images are compared as if one were a crop of the
other: one's thumbnail is shrunk to every whole-pixel size per axis down to :data:`MIN_KEEP` (up to
20 % cropped in all) and slid over the other's at every whole-pixel shift; the pair's correlation is the
best normalised cross-correlation found, either way round. The thumbnails keep the detail band (the
image less its blur), which a copy keeps and another item of one kind does not; brightness and
contrast cancel out.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageOps

#: Side of the grayscale thumbnail an image is compared by.
SIDE = 32
#: Share of the side kept by the crops tried, per axis.
#: The smallest share of the side a crop keeps; every whole-pixel size from SIDE down to it is tried
#: (a detail band misaligned by half a pixel already loses much of its correlation).
MIN_KEEP = 0.8
SIZES = tuple(range(SIDE, round(SIDE * MIN_KEEP) - 1, -1))
#: Blur (thumbnail pixels) taken away to leave the detail band.
DETAIL_SIGMA = 2.0


def _unit(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels - pixels.mean()
    return pixels / max(float(np.linalg.norm(pixels)), 1e-6)


def thumbnail(img: Image.Image) -> np.ndarray:
    """The image as a SIDE x SIDE float32 grayscale detail thumbnail."""
    from scipy.ndimage import gaussian_filter

    gray = ImageOps.grayscale(img.convert("RGB")).resize((SIDE, SIDE), Image.BICUBIC)
    pixels = np.asarray(gray, dtype=np.float32)
    return pixels - gaussian_filter(pixels, DETAIL_SIGMA)


def templates(thumb: np.ndarray) -> list[np.ndarray]:
    """``thumb`` shrunk to each pair of :data:`SIZES` (rows x columns), each mean-centred, unit norm."""
    image = Image.fromarray(np.asarray(thumb, dtype=np.float32), mode="F")
    return [_unit(np.asarray(image.resize((w, h), Image.BILINEAR), dtype=np.float32)) for h in SIZES for w in SIZES]


def _best_placement(thumb: np.ndarray, template: np.ndarray) -> float:
    """The best normalised cross-correlation of ``template`` over every placement inside ``thumb``."""
    views = sliding_window_view(thumb, template.shape).reshape(-1, template.size)
    views = views - views.mean(axis=1, keepdims=True)
    norms = np.maximum(np.linalg.norm(views, axis=1), 1e-6)
    return float(((views @ template.ravel()) / norms).max())


def aligned_correlation(a: tuple[np.ndarray, list[np.ndarray]], b: tuple[np.ndarray, list[np.ndarray]]) -> float:
    """The best correlation of one image placed as a crop of the other, either way round; ``a`` and
    ``b`` are ``(thumbnail(img), templates(thumbnail(img)))``."""
    return max(max(_best_placement(a[0], t) for t in b[1]), max(_best_placement(b[0], t) for t in a[1]))


def signature(img: Image.Image) -> tuple[np.ndarray, list[np.ndarray]]:
    """What :func:`aligned_correlation` compares: the thumbnail and its shrunk templates."""
    thumb = thumbnail(img)
    return thumb, templates(thumb)
