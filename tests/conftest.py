"""Shared fixtures: the tiny and lite encoders (loaded once per worker) and small real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Hermetic caches shared by all xdist workers of one run, kept between runs for speed.
os.environ.setdefault("CLIPXFER_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "clipxfer"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest -n N runs N workers: give each an equal share of the cores, since oversubscribed OpenMP threads
# (torch, faiss) spin against each other and made fits 19x slower on a loaded 2-core machine. Set before
# torch is imported, and inherited by the subprocesses tests start.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
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
    """The offline lite encoder in fp32: 'auto' would run bf16 on CPUs with AMX or AVX512-BF16 and fp32
    elsewhere, so accuracy thresholds measured on one CPU could fail on another."""
    from clipxfer.encoders import cached_encoder

    return cached_encoder("lite", "cpu", "fp32")


FASHION_MNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist"


def fashion_mnist_or_skip():
    """Fashion-MNIST (Debian's dataset-fashion-mnist), or skip the test with the install command as
    the reason when its files are truly absent. CI sets CLIPXFER_REQUIRE_DATASETS=1 so a missing
    dataset fails there instead of silently skipping."""
    from clipxfer.datasets.labelled import FASHION_MNIST_DIR, fashion_mnist

    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file() and not os.environ.get(
        "CLIPXFER_REQUIRE_DATASETS"
    ):
        pytest.skip(f"Fashion-MNIST is not installed: {FASHION_MNIST_INSTALL}")
    return fashion_mnist()


@pytest.fixture(scope="session")
def fashion_test_1000():
    """The first 1,000 Fashion-MNIST test images (Debian's dataset-fashion-mnist)."""
    return fashion_mnist_or_skip().split("test").subset(range(1000))


@pytest.fixture(scope="session")
def sample_photos_dir(tmp_path_factory):
    """scikit-image's sample photos exported as files."""
    from clipxfer.sample_photos import export_sample_photos

    folder = tmp_path_factory.mktemp("photos")
    export_sample_photos(folder)
    return folder


def random_images(count: int, seed: int = 0, size=(40, 56)) -> list[np.ndarray]:
    """Deterministic noise images of varied content, as uint8 arrays."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="session")
def sample_photo_index(tmp_path_factory, sample_photos_dir, lite):
    """An index of the sample photos made with lite (read-only for tests: copy it to change it)."""
    from clipxfer.index import Index

    path = tmp_path_factory.mktemp("sample-index") / "index"
    Index.update(sample_photos_dir, lite, path=path, workers=0)
    return path


def write_tinted_folder(root: Path, classes: list[str], per_class: int = 10, seed: int = 0) -> Path:
    """An ImageFolder of noise images, each class tinted in its own channel so even tiny separates them."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(random_images(per_class, seed=seed + c)):
            tinted = image // 4
            tinted[..., c] = 255
            Image.fromarray(tinted).save(root / name / f"{i}.png")
    return root
