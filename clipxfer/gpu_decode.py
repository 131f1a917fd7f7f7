"""Batched JPEG decoding and resizing on the model's device (nvjpeg on CUDA).

On a GPU, PIL decoding in worker processes caps indexing at about a thousand images a second;
the model itself runs tens of thousands. Here file bytes are read by threads, decoded in batches
by ``torchvision.io.decode_jpeg`` on the device, resized per group of equal sizes with one
antialiased bicubic interpolate each, and centre-cropped, so pixels never come back to the CPU.

Only plain JPEGs take this path. Anything else (PNG, CMYK or EXIF-rotated JPEGs, files the
batch decoder rejects) is handed back for the PIL path in :mod:`clipxfer.images`, which handles
every case; this module is an accelerator, not a second decoder to keep correct.
The same code runs on the CPU (``device='cpu'``), which is how the tests check it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


@dataclass
class DeviceBatch:
    """Decoded ``pixels`` (uint8, NHWC, on the device) for ``decoded`` paths; ``fallback`` are
    the paths this module leaves to the PIL path."""

    decoded: list[Path]
    pixels: torch.Tensor
    fallback: list[Path]


def _is_plain_jpeg(path: Path, data: bytes) -> bool:
    """A JPEG that nvjpeg can decode as displayed: RGB/grey, no EXIF rotation."""
    if not data.startswith(JPEG_MAGIC):
        return False
    from PIL import Image

    try:
        with Image.open(path) as img:  # header only; no pixel decoding
            return img.mode in ("RGB", "L") and img.getexif().get(EXIF_ORIENTATION, 1) == 1
    except Exception:
        return False


def read_files(paths: Sequence[Path], threads: int = 16) -> list[bytes | None]:
    """File contents, read concurrently (file reads release the GIL); None for unreadable files."""

    def read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(read, paths))


def resize_center_crop_batch(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """CHW uint8 images of any sizes -> NHWC uint8 ``(n, size, size, 3)``: the short side resized
    to ``size`` (bicubic, antialiased) and a centred square cut, as :func:`images.resize_center_crop`.

    Images sharing a size are resized in one call, so a folder of same-sized photos costs one
    interpolate per batch instead of one per image.
    """
    out = torch.empty((len(images), size, size, 3), dtype=torch.uint8, device=images[0].device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[1:]), []).append(i)
    for (height, width), members in groups.items():
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_w, new_h = int(size * width / height), size
        batch = torch.stack([images[i] for i in members]).float()
        if (new_h, new_w) != (height, width):
            batch = F.interpolate(batch, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        batch = batch[:, :, top : top + size, left : left + size]
        out[members] = batch.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def decode_batch(paths: Sequence[Path], size: int, device: torch.device, threads: int = 16) -> DeviceBatch:
    """Decode the plain JPEGs among ``paths`` on ``device``; everything else goes to ``fallback``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    paths = [Path(p) for p in paths]
    contents = read_files(paths, threads)
    chosen, fallback = [], []
    for path, data in zip(paths, contents):
        if data is not None and _is_plain_jpeg(path, data):
            chosen.append((path, data))
        else:
            fallback.append(path)
    if not chosen:
        return DeviceBatch([], torch.empty((0, size, size, 3), dtype=torch.uint8, device=device), fallback)
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, d in chosen]
    try:
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        decoded = [p for p, _ in chosen]
    except RuntimeError:
        # The batch decoder gives nothing back if one file is bad: retry one by one.
        images, decoded = [], []
        for (path, _), tensor in zip(chosen, tensors):
            try:
                images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                decoded.append(path)
            except RuntimeError:
                fallback.append(path)
    if not images:
        return DeviceBatch([], torch.empty((0, size, size, 3), dtype=torch.uint8, device=device), fallback)
    return DeviceBatch(decoded, resize_center_crop_batch(images, size), fallback)
