"""Parts encoded at a working resolution above the encoder's input, in overlapping tiles.

A small flaw must cover several feature cells to be seen: at the encoder's own input (224 px, the
finest map at stride 8) a 250-pixel part puts a 10-pixel speck in about one cell. At resolution
``R`` the part is resized to ``R x R`` and covered by overlapping tiles of the encoder's input size;
each tile is encoded as it is (so the OpenVINO graph and a ViT's fixed position embeddings still
apply), aggregated, and the tiles' feature grids are stitched into one ``R / stride`` grid, each cell
a weighted mean of the tiles that cover it, weighted towards tile centres so seams carry interior
features. Every detector then sees one grid per part, as at the input size.
"""

from __future__ import annotations

import math

import numpy as np

from ..encoders import Encoder
from ..errors import ClipxferError
from ..vector_math import l2_normalize

#: Tiles overlap by at least this share of their side.
MIN_OVERLAP = 0.25
#: The largest working resolution accepted (a 1,024-pixel part at lite's stride 8 is a 128 x 128 grid).
MAX_RESOLUTION = 2048


def check_resolution(resolution: int, input_size: int) -> int:
    """``resolution`` if it is a working size this encoder can tile, else a one-line error."""
    if not input_size <= resolution <= MAX_RESOLUTION:
        raise ClipxferError(
            f"--resolution {resolution}: choose from the encoder's input size {input_size} to {MAX_RESOLUTION}, or 'native'"
        )
    return int(resolution)


def tile_starts(resolution: int, tile: int, step_unit: int) -> list[int]:
    """Offsets of the tiles along one side: evenly spread from 0 to ``resolution - tile``, each a
    multiple of ``step_unit`` (the feature stride, so tile grids land on the stitched grid's cells),
    overlapping by at least :data:`MIN_OVERLAP` of a tile."""
    if resolution <= tile:
        return [0]
    count = math.ceil((resolution - tile) / (tile * (1 - MIN_OVERLAP))) + 1
    last = resolution - tile
    return sorted({int(round(last * i / (count - 1) / step_unit)) * step_unit for i in range(count)})


def snap_resolution(resolution: int, stride: int) -> int:
    """``resolution`` rounded up to a multiple of the feature stride."""
    return int(math.ceil(resolution / stride) * stride)


def _centre_weights(size: int) -> np.ndarray:
    """``(size, size)`` weights, 1 at a tile's border cells rising linearly to its centre."""
    ramp = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32) + 1.0
    return np.minimum.outer(ramp, ramp)


def stitch(tiles: np.ndarray, starts: list[int], cell: int, grid: int) -> np.ndarray:
    """``(n * t * t, g, g, c)`` tile grids (row-major tiles per image) -> ``(n, grid, grid, c)``.

    ``starts`` are tile offsets in pixels, ``cell`` the pixels per grid cell."""
    per_side = len(starts)
    n = len(tiles) // (per_side * per_side)
    g, c = tiles.shape[1], tiles.shape[-1]
    weights = _centre_weights(g)[..., None]
    total = np.zeros((n, grid, grid, c), np.float32)
    weight = np.zeros((1, grid, grid, 1), np.float32)
    tiles = tiles.reshape(n, per_side, per_side, g, g, c)
    for i, top in enumerate(starts):
        for j, left in enumerate(starts):
            y, x = top // cell, left // cell
            total[:, y : y + g, x : x + g] += tiles[:, i, j] * weights
            weight[:, y : y + g, x : x + g] += weights
    return total / weight


_STRIDES: dict[str, tuple[int, int]] = {}


def feature_strides(encoder: Encoder) -> tuple[int, int]:
    """Pixels per cell of the finest local map and of the joint-space grid (read once per encoder
    from one blank tile: 8 for lite, the patch size for ViTs)."""
    if encoder.id not in _STRIDES:
        features = encoder.encode_patches(np.zeros((1, encoder.input_size, encoder.input_size, 3), np.uint8))
        local = encoder.input_size // features.maps[0].shape[1]
        joint = encoder.input_size // features.joint.shape[1] if features.joint is not None else local
        _STRIDES[encoder.id] = (local, joint)
    return _STRIDES[encoder.id]


def working_resolution(encoder: Encoder, resolution: int) -> int:
    """``resolution`` checked and snapped up to a multiple of both feature strides."""
    check_resolution(resolution, encoder.input_size)
    return snap_resolution(resolution, math.lcm(*feature_strides(encoder)))


def encode_tiled(encoder: Encoder, pixels: np.ndarray, dense) -> tuple[np.ndarray, np.ndarray | None]:
    """A ``uint8 (n, R, R, 3)`` batch at a working resolution ``R`` (from :func:`working_resolution`)
    -> (stitched aggregated local features, stitched joint-space patches or None); ``dense`` is the
    one-tile encoder (:func:`~clipxfer.anomaly.patches.encode_pixels_dense`)."""
    size, resolution = encoder.input_size, pixels.shape[1]
    if resolution == size:
        return dense(encoder, pixels)
    local_cell, joint_cell = feature_strides(encoder)
    starts = tile_starts(resolution, size, math.lcm(local_cell, joint_cell))
    crops = np.stack([image[top : top + size, left : left + size] for image in pixels for top in starts for left in starts])
    local, joint = dense(encoder, crops)
    local = stitch(local, starts, local_cell, resolution // local_cell)
    if joint is not None:
        joint = stitch(joint, starts, joint_cell, resolution // joint_cell)
        joint = l2_normalize(joint)
    return local, joint
