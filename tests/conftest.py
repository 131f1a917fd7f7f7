"""Shared fixtures: the tiny and lite encoders (loaded once per worker) and small real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Hermetic caches shared by all xdist workers of one run, kept between runs for speed.
os.environ.setdefault("CLIPXFER_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "clipxfer"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# 'auto' would pick OpenVINO int8 on most CPUs, converting and calibrating every model a test
# loads; the suite runs torch unless a test asks for a runtime (tests/test_openvino.py does).
os.environ.setdefault("CLIPXFER_RUNTIME", "torch")


@pytest.fixture(scope="session")
def tiny():
    """The tiny random-init open_clip model, fp32 on CPU so comparisons are exact."""
    from clipxfer.encoders import cached_encoder

    return cached_encoder("tiny", "cpu", "fp32")


@pytest.fixture(scope="session")
def lite():
    """The offline lite encoder with the machine's automatic precision."""
    from clipxfer.encoders import cached_encoder

    return cached_encoder("lite", "cpu", None)


@pytest.fixture(scope="session")
def fashion_test_1000():
    """The first 1,000 Fashion-MNIST test images (Debian's dataset-fashion-mnist)."""
    from clipxfer.data import fashion_mnist

    return fashion_mnist().split("test").subset(range(1000))


@pytest.fixture(scope="session")
def sample_photos_dir(tmp_path_factory):
    """scikit-image's sample photos exported as files."""
    from clipxfer.samples import export_sample_photos

    folder = tmp_path_factory.mktemp("photos")
    export_sample_photos(folder)
    return folder


def random_images(count: int, seed: int = 0, size=(40, 56)) -> list[np.ndarray]:
    """Deterministic noise images of varied content, as uint8 arrays."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for _ in range(count)]
