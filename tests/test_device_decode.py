"""The device (nvjpeg) decoding path, run on the CPU: same files, same vectors as the PIL path."""

from __future__ import annotations

import numpy as np
from PIL import Image

from clipxfer.encoders.gpu_decode import is_plain_jpeg
from clipxfer.encoders.pipeline import EncodedBatch, Failure, encode_files


def _photo(width, height, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def _collect(stream):
    vectors, failures = {}, []
    for item in stream:
        if isinstance(item, Failure):
            failures.append(item.path.name)
        else:
            assert isinstance(item, EncodedBatch)
            for info, row in zip(item.files, item.encoding.embeddings):
                vectors[info.path.name] = (row, info)
    return vectors, failures


def test_device_path_matches_pil_path(tmp_path, tiny):
    for i, (w, h) in enumerate([(500, 375), (500, 375), (375, 500), (640, 480), (120, 90)]):
        _photo(w, h, i).save(tmp_path / f"p{i}.jpg", quality=90)
    _photo(200, 150, 9).save(tmp_path / "png.png")  # not a JPEG: PIL fallback
    _photo(200, 150, 8).convert("CMYK").save(tmp_path / "cmyk.jpg")  # 4 components: PIL fallback
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    paths = sorted(tmp_path.iterdir())
    pil, pil_failed = _collect(encode_files(tiny, paths, batch_size=4, workers=0, device_decode=False))
    dev, dev_failed = _collect(encode_files(tiny, paths, batch_size=4, device_decode=True))
    assert pil_failed == dev_failed == ["broken.jpg"]
    assert set(pil) == set(dev) and len(dev) == 7
    for name, (row, info) in dev.items():
        assert float(row @ pil[name][0]) > 0.99, name
        assert (info.width, info.height, info.sha256) == (pil[name][1].width, pil[name][1].height, pil[name][1].sha256)


def test_plain_jpeg_header_check(tmp_path):
    _photo(64, 48, 0).save(tmp_path / "rgb.jpg")
    _photo(64, 48, 0).convert("L").save(tmp_path / "grey.jpg")
    _photo(64, 48, 0).convert("CMYK").save(tmp_path / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    _photo(64, 48, 0).save(tmp_path / "rotated.jpg", exif=exif)
    exif[0x0112] = 1
    _photo(64, 48, 0).save(tmp_path / "upright_exif.jpg", exif=exif)
    verdict = {p.stem: is_plain_jpeg(p.read_bytes()) for p in tmp_path.iterdir()}
    assert verdict == {"rgb": True, "grey": True, "cmyk": False, "rotated": False, "upright_exif": True}
    assert not is_plain_jpeg(b"\x89PNG\r\n\x1a\n")
