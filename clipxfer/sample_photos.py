"""Real sample photos for demos and tests, exported from scikit-image (no binaries in the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ClipxferError

# scikit-image's bundled photos (permissive licences; see skimage.data); name -> loader name.
SAMPLE_PHOTOS = {
    "astronaut": "astronaut",
    "camera": "camera",
    "coffee": "coffee",
    "chelsea": "chelsea",
    "rocket": "rocket",
    "hubble_deep_field": "hubble_deep_field",
    "immunohistochemistry": "immunohistochemistry",
    "motorcycle": "stereo_motorcycle",
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "page": "page",
    "retina": "retina",
    "text": "text",
    "clock": "clock",
    "colorwheel": "colorwheel",
    "logo": "logo",
    "moon": "moon",
    "coins": "coins",
}


def sample_photo(name: str) -> np.ndarray:
    """One of scikit-image's sample photos as a uint8 array."""
    try:
        from skimage import data
    except ImportError:
        raise ClipxferError("sample photos come from scikit-image: pip install scikit-image") from None
    image = getattr(data, SAMPLE_PHOTOS[name])()
    if isinstance(image, tuple):  # stereo pairs: keep the left view
        image = image[0]
    return np.asarray(image, dtype=np.uint8)


def export_sample_photos(target: str | os.PathLike) -> list[Path]:
    """Write the sample photos into ``target`` (JPEG, PNG where they carry transparency);
    existing files are left as they are. Returns the written or existing paths."""
    from PIL import Image

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SAMPLE_PHOTOS:
        image = sample_photo(name)
        has_alpha = image.ndim == 3 and image.shape[2] == 4
        path = target / f"{name}.{'png' if has_alpha else 'jpg'}"
        if not path.exists():
            Image.fromarray(image).save(path, **({} if has_alpha else {"quality": 92}))
        paths.append(path)
    return paths
