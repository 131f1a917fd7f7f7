"""Images -> locally aggregated multi-scale patch features (PatchCore's "locally aware" features).

Anomaly detection sees the whole image: it is resized to the encoder's square input without the
centre crop classification uses, so a defect near the border is not cut away and every map
position maps back onto the original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..encoders import Encoder
from ..images import ImageLike, as_pil
from .tiling import encode_tiled

#: Side of the neighbourhood each patch feature is averaged over (PatchCore's p = 3).
NEIGHBOURHOOD = 3


@dataclass
class DensePatches:
    """Patch features of a batch of images, on one grid.

    ``local``: ``(n, h, w, c)`` aggregated multi-scale features (what the memory bank holds).
    ``joint``: ``(n, h', w', dim)`` text-comparable patch embeddings, or None (see
    :class:`~clipxfer.encoders.PatchFeatures`). ``sizes``: the original ``(width, height)`` of each image.
    """

    local: np.ndarray
    joint: np.ndarray | None
    sizes: list[tuple[int, int]]


def whole_image(item: ImageLike, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The full image squashed to ``size x size`` uint8 RGB, and its original ``(width, height)``."""
    img = as_pil(item)
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8), img.size


def aggregate(maps: Sequence[np.ndarray], neighbourhood: int = NEIGHBOURHOOD) -> np.ndarray:
    """Average each map over a ``neighbourhood`` window, bring every map to the finest grid
    (bilinear), and concatenate channels: ``(n, h, w, sum c_i)`` float32."""
    finest = maps[0].shape[1:3]
    parts = []
    for feature_map in maps:
        x = torch.from_numpy(np.ascontiguousarray(feature_map)).permute(0, 3, 1, 2)
        # Zero padding counts, as in PatchCore's reference code (torch's AvgPool2d default): border
        # patches then differ from interior ones in both the bank and the test image, so they are
        # matched to border patches. Without it, good parts' edges were the highest-scoring patches.
        x = F.avg_pool2d(x, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=True)
        if tuple(x.shape[2:]) != tuple(finest):
            x = F.interpolate(x, size=finest, mode="bilinear", align_corners=False)
        parts.append(x)
    return torch.cat(parts, dim=1).permute(0, 2, 3, 1).contiguous().numpy()


def encode_pixels_dense(encoder: Encoder, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A ``uint8 (n, s, s, 3)`` batch -> (aggregated local features, joint-space patches or None)."""
    features = encoder.encode_patches(pixels)
    return aggregate(features.maps), features.joint


def encode_at_resolution(encoder: Encoder, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`encode_pixels_dense` for a ``uint8 (n, R, R, 3)`` batch at any working resolution
    ``R`` (overlapping tiles stitched back when ``R`` is above the encoder's input; see :mod:`.tiling`)."""
    return encode_tiled(encoder, pixels, encode_pixels_dense)


def encode_dense(
    encoder: Encoder,
    images: Sequence[ImageLike],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    resolution: int | None = None,
) -> DensePatches:
    """Decode and encode ``images`` into :class:`DensePatches`, ``batch_size`` at a time, each
    squashed to ``resolution`` (default: the encoder's input size; a working size from
    :func:`~clipxfer.anomaly.tiling.working_resolution`). An unreadable image raises
    :class:`~clipxfer.errors.ImageDecodeError`."""
    size = resolution or encoder.input_size
    local_parts, joint_parts, sizes = [], [], []
    for start in range(0, len(images), batch_size):
        decoded = [whole_image(item, size) for item in images[start : start + batch_size]]
        local, joint = encode_at_resolution(encoder, np.stack([pixels for pixels, _ in decoded]))
        local_parts.append(local)
        if joint is not None:
            joint_parts.append(joint)
        sizes.extend(size for _, size in decoded)
        if progress:
            progress(len(decoded))
    if not local_parts:
        raise ValueError("encode_dense needs at least one image")
    joint = np.concatenate(joint_parts) if joint_parts else None
    return DensePatches(np.concatenate(local_parts), joint, sizes)


def take_patches(patches: DensePatches, rows: Sequence[int]) -> DensePatches:
    """The images at ``rows`` of ``patches``."""
    rows = np.asarray(rows, dtype=np.int64)
    joint = patches.joint[rows] if patches.joint is not None else None
    return DensePatches(patches.local[rows], joint, [patches.sizes[i] for i in rows])
