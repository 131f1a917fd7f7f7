"""Finding image files and decoding them safely: the one place in clipxfer that opens images.

Everything downstream sees either an RGB ``PIL.Image`` or a ``uint8`` array of shape
``(size, size, 3)`` that is already resized and centre-cropped for a model. Decoding problems
become :class:`~clipxfer.errors.ImageDecodeError` with a one-line reason, never a crash.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Images above this many pixels are refused instead of decoded (decompression bombs).
# 100 megapixels covers real camera photos (a 12 MP phone photo is 12e6).
MAX_PIXELS = 100_000_000

# A truncated file is a corrupt file: PIL must not silently fill the rest with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def is_image_path(path: Path) -> bool:
    """True when the file name has one of the image extensions, in any case."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(root: str | os.PathLike, on_error: Callable[[OSError], None] | None = None) -> Iterator[Path]:
    """Yield image files below ``root``, recursively, in a stable sorted order.

    Symbolic links to folders are followed once: a folder reached again through a link
    (a symlink loop) is skipped. A folder that cannot be listed (permission denied) is passed
    to ``on_error`` as the ``OSError`` (its ``filename`` is the folder) and skipped.
    """
    root = Path(root)
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_image_path(path) and path.is_file():
                yield path


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite a transparent image onto white: models never saw transparency, and black
    (what a plain convert gives) turns every logo into a dark blob."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit greyscale to 8-bit RGB by scaling the used range, instead of PIL's clipping."""
    values = np.asarray(img, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    grey = ((values - low) * scale).round().astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: CMYK, palette, transparency, 16-bit and float greyscale included."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img)
    if img.mode.startswith("I") or img.mode == "F":
        return _high_bit_depth_to_rgb(img)
    return img.convert("RGB")


def open_image(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Open ``path`` as an upright RGB image, or raise :class:`ImageDecodeError`.

    ``draft_size`` lets JPEGs decode at a reduced scale (DCT scaling) when the model only needs
    ``draft_size`` pixels on the short side: a 12-megapixel photo then decodes several times faster.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(path, "empty file (0 bytes)")
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"corrupt or truncated image ({exc})") from None
    return _open_rgb(path, path, draft_size)


def open_image_bytes(data: bytes, name: str, draft_size: int | None = None) -> Image.Image:
    """:func:`open_image` for an image held in memory (a tar member, a parquet cell); ``name``
    (e.g. ``shard/key``) names it in errors."""
    if not data:
        raise ImageDecodeError(name, "empty image (0 bytes)")
    return _open_rgb(io.BytesIO(data), name, draft_size)


def _open_rgb(source, name, draft_size: int | None) -> Image.Image:
    """Decode a path or binary stream to upright RGB; every failure is an ImageDecodeError."""
    path = name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ImageDecodeError(
                        path, f"{width}x{height} pixels is over the {MAX_PIXELS:,}-pixel limit (decompression bomb?)"
                    )
                if draft_size and img.format == "JPEG":
                    # Keep the short side at least twice the target so the final resize still antialiases.
                    img.draft("RGB", _draft_target(img.size, 2 * draft_size))
                img.load()
                upright = ImageOps.exif_transpose(img)
                return to_rgb(upright)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied (the file cannot be read)") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, f"refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(path, f"corrupt or truncated image ({exc})") from None


def _draft_target(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    width, height = size
    scale = short_side / min(width, height)
    return (max(1, int(width * scale)), max(1, int(height * scale)))


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic, antialiased) and centre-crop a square, as
    open_clip's preprocessing does; returns ``uint8`` ``(size, size, 3)``."""
    pixels = np.array(to_rgb(img), dtype=np.uint8)
    height, width = pixels.shape[:2]
    # Same arithmetic as torchvision's Resize(size): the long side is truncated, not rounded.
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        pixels = resize_bicubic(pixels, new_h, new_w)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


def resize_bicubic(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of a ``uint8 (h, w, 3)`` array to ``(height, width, 3)``.

    torch's uint8 kernel (a port of Pillow-SIMD's) gives PIL's pixels to one level (two for
    images a few pixels wide) in under a third of PIL's time: 0.7 ms instead of 2.6 ms for a
    500x375 photo on one core, see benchmarks/RESULTS.md. The HWC array is already torch's
    channels-last layout, so nothing is copied on the way in. Without torch (the deployment
    runtime, :mod:`clipxfer.runtime`) Pillow's bicubic resize gives the same pixels to that level.
    """
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BICUBIC), dtype=np.uint8)

    image = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        resized = F.interpolate(image, size=(height, width), mode="bicubic", antialias=True)
    return resized[0].permute(1, 2, 0).numpy()


def as_pil(item: ImageLike) -> Image.Image:
    """A path, PIL image, or ``uint8`` array (HxW or HxWxC) as an RGB PIL image."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ImageDecodeError("<array>", f"expected a uint8 array, got {item.dtype}")
        return to_rgb(Image.fromarray(item))
    return open_image(item)


def bytes_model_input(data: bytes, name: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An in-memory image as the ``uint8 (size, size, 3)`` model input, plus its upright
    ``(width, height)``; raises :class:`ImageDecodeError` naming ``name``."""
    img = open_image_bytes(data, name, draft_size=size)
    with Image.open(io.BytesIO(data)) as header:  # the full size, before the JPEG draft scaling
        width, height = header.size
        if header.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            width, height = height, width
    return resize_center_crop(img, size), (width, height)


def load_model_input(item: ImageLike, size: int) -> np.ndarray:
    """Decode anything image-like into the ``uint8 (size, size, 3)`` array a model consumes."""
    if isinstance(item, (str, os.PathLike)):
        img = open_image(item, draft_size=size)
    else:
        img = as_pil(item)
    return resize_center_crop(img, size)
