"""The CPU encode pipeline: preprocessing arithmetic and the background encode thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from clipxfer.encoders.pipeline import Failure, encode_decoded
from clipxfer.images import resize_center_crop


@pytest.mark.parametrize("size_wh", [(500, 375), (375, 500), (640, 480), (45, 70), (28, 28), (1000, 250), (224, 300)])
def test_resize_and_crop_equal_pil_and_torchvision(size_wh):
    """Our resize (torch's uint8 kernel) and crop give open_clip's preprocessing pixels (PIL's
    bicubic resize, then torchvision's centre crop), to rounding."""
    rng = np.random.default_rng(sum(size_wh))
    img = Image.fromarray(rng.integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8))
    width, height = img.size
    size = 224
    new_w, new_h = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    resized = img.resize((new_w, new_h), Image.Resampling.BICUBIC) if (new_w, new_h) != img.size else img
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    reference = np.asarray(resized.crop((left, top, left + size, top + size)))
    ours = resize_center_crop(img, size)
    assert ours.shape == (size, size, 3)
    assert np.abs(ours.astype(int) - reference).max() <= 1


class _RecordingEncoder:
    """Returns each batch's first pixel as its 'embedding' and records the calling thread."""

    def __init__(self, gate: threading.Event | None = None):
        self.threads: list[str] = []
        self.gate = gate

    def encode_pixels(self, pixels):
        self.threads.append(threading.current_thread().name)
        if self.gate is not None and len(self.threads) == 1:
            # The first batch finishes only once the next one is being gathered: sequential code
            # (gather, encode, gather) would wait here until the timeout.
            assert self.gate.wait(timeout=10), "the next batch was not gathered while the first was encoded"
        return pixels[:, 0, 0, 0].astype(np.float32)


def _decoded(values, failures=(), gate=None):
    for value in values:
        if value in failures:
            yield Failure(f"item-{value}", "broken")
            continue
        if gate is not None and value == 4:
            gate.set()
        yield np.full((2, 2, 3), value, np.uint8), f"item-{value}"


def test_encode_decoded_overlaps_gathering_with_encoding_and_keeps_order():
    gate = threading.Event()
    encoder = _RecordingEncoder(gate)
    out = list(encode_decoded(encoder, _decoded(range(10), gate=gate), batch_size=4))
    assert [infos for infos, _ in out] == [[f"item-{v}" for v in chunk] for chunk in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9])]
    assert [list(encoding) for _, encoding in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(name.startswith("clipxfer-encode") for name in encoder.threads)


def test_a_failure_comes_after_every_batch_started_before_it():
    encoder = _RecordingEncoder()
    out = list(encode_decoded(encoder, _decoded(range(7), failures={5}), batch_size=2))
    kinds = [item.path if isinstance(item, Failure) else item[0] for item in out]
    assert kinds == [["item-0", "item-1"], ["item-2", "item-3"], "item-5", ["item-4", "item-6"]]


def test_an_encoder_error_reaches_the_caller():
    class Broken:
        def encode_pixels(self, pixels):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        list(encode_decoded(Broken(), _decoded(range(3)), batch_size=2))


def test_the_first_batch_is_small_so_encoding_starts_early():
    from clipxfer.encoders.pipeline import FIRST_BATCH

    encoder = _RecordingEncoder()
    count = FIRST_BATCH + 40
    out = list(encode_decoded(encoder, _decoded(range(count)), batch_size=32))
    assert [len(infos) for infos, _ in out] == [FIRST_BATCH, 32, 8]
    assert [v for _, encoding in out for v in encoding] == list(range(count))
