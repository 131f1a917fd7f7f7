"""Batched JPEG decoding and resizing on the model's device (nvjpeg on CUDA).

On a GPU, PIL decoding in worker processes caps indexing at about a thousand images a second
while the model runs tens of thousands. Here threads read and hash the files, JPEGs are decoded
in batches by ``torchvision.io.decode_jpeg`` on the device, resized with one antialiased bicubic
interpolate per group of equal sizes, and centre-cropped, so pixels never return to the CPU.

Only plain JPEGs take this path: a few-byte header walk (no PIL) rejects CMYK, EXIF-rotated and
non-JPEG files, and anything the batch decoder refuses, and the pipeline decodes those with
PIL as usual. This module accelerates; :mod:`clipxfer.images` stays the one decoder that must
handle every case. The same code runs on the CPU (``device='cpu'``), which is how tests check it.
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they still work, and
# TorchCodec is not needed for anything else here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)

SOI = b"\xff\xd8"
EXIF_ORIENTATION_TAG = 0x0112
# Start-of-frame markers (baseline, progressive, ...) whose segment holds the component count.
SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass
class RawFile:
    """A file read once: its bytes, stat and content hash (None where it could not be read)."""

    path: Path
    data: bytes | None
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""


def read_file(path: Path) -> RawFile:
    """Read, stat and hash one file; meant for a thread pool (both release the GIL)."""
    try:
        stat = path.stat()
        data = path.read_bytes()
    except OSError:
        return RawFile(path, None)
    return RawFile(path, data, stat.st_size, stat.st_mtime_ns, hashlib.sha256(data).hexdigest())


def _exif_orientation(segment: bytes) -> int:
    """EXIF orientation from an APP1 payload (``Exif\\0\\0`` + TIFF), 1 when absent or unreadable."""
    if not segment.startswith(b"Exif\x00\x00") or len(segment) < 14:
        return 1
    tiff = segment[6:]
    endian = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if endian is None:
        return 1
    try:
        (ifd_offset,) = struct.unpack(endian + "I", tiff[4:8])
        (count,) = struct.unpack(endian + "H", tiff[ifd_offset : ifd_offset + 2])
        for i in range(count):
            entry = tiff[ifd_offset + 2 + 12 * i : ifd_offset + 14 + 12 * i]
            tag, _, _, value = struct.unpack(endian + "HHIH", entry[:10])
            if tag == EXIF_ORIENTATION_TAG:
                return value
    except struct.error:
        return 1
    return 1


def is_plain_jpeg(data: bytes) -> bool:
    """True for a JPEG with 1 or 3 colour components and no EXIF rotation: the files the
    device decoder turns into exactly what PIL would show."""
    if not data.startswith(SOI):
        return False
    position, components, orientation = 2, 0, 1
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        payload = data[position + 4 : position + 2 + length]
        if marker == 0xE1:
            orientation = _exif_orientation(payload)
        elif marker in SOF_MARKERS and len(payload) >= 6:
            components = payload[5]
        elif marker == 0xDA:  # start of scan: the header is over
            break
        position += 2 + length
    return components in (1, 3) and orientation == 1


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


@dataclass
class DeviceBatch:
    """``pixels[i]`` (uint8 NHWC on the device) is ``decoded[i]``, whose original (height, width)
    is ``sizes[i]``; ``fallback`` files are left to the PIL path."""

    decoded: list[RawFile]
    sizes: list[tuple[int, int]]
    pixels: torch.Tensor
    fallback: list[RawFile]


def decode_on_device(files: Sequence[RawFile], size: int, device: torch.device) -> DeviceBatch:
    """Decode the plain JPEGs among ``files`` on ``device`` in one batch."""
    from torchvision.io import ImageReadMode, decode_jpeg

    chosen, fallback = [], []
    for raw in files:
        (chosen if raw.data is not None and is_plain_jpeg(raw.data) else fallback).append(raw)
    tensors = [torch.frombuffer(bytearray(f.data), dtype=torch.uint8) for f in chosen]
    images: list[torch.Tensor] = []
    decoded: list[RawFile] = []
    if tensors:
        try:
            images = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
            decoded = list(chosen)
        except RuntimeError:
            # The batch decoder returns nothing if one file is bad: retry one by one.
            for raw, tensor in zip(chosen, tensors):
                try:
                    images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                    decoded.append(raw)
                except RuntimeError:
                    fallback.append(raw)
    if not images:
        empty = torch.empty((0, size, size, 3), dtype=torch.uint8, device=device)
        return DeviceBatch([], [], empty, fallback)
    sizes = [(int(image.shape[1]), int(image.shape[2])) for image in images]
    return DeviceBatch(decoded, sizes, resize_center_crop_batch(images, size), fallback)


def default_reader_threads() -> int:
    """Threads that read and hash files for the device path."""
    return min(32, 2 * (os.cpu_count() or 1))
