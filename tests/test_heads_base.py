"""The Head interface: save/load round trip, model checks, and damaged files."""

from __future__ import annotations

import numpy as np
import pytest

from clipxfer.encoders.base import ImageEncoding
from clipxfer.errors import ClipxferError
from clipxfer.heads import load_head, read_head_metadata
from clipxfer.heads.zeroshot import fit_zeroshot


def test_zeroshot_head_round_trips(tmp_path, tiny):
    head = fit_zeroshot(tiny, ["cat", "dog", "car"], ["a photo of a {}.", "a {}."])
    path = head.save(tmp_path / "zs")
    assert path.suffix == ".safetensors"
    loaded = load_head(path, model_id=tiny.id)
    assert loaded.classnames == ["cat", "dog", "car"] and loaded.method == "zeroshot"
    encoding = ImageEncoding(*(2 * [tiny.encode_texts(["a cat", "a red car"])]))
    np.testing.assert_array_equal(head.logits(encoding), loaded.logits(encoding))
    assert read_head_metadata(path)["config"]["templates"] == ["a photo of a {}.", "a {}."]


def test_head_refuses_another_model(tmp_path, tiny):
    path = fit_zeroshot(tiny, ["cat", "dog"], ["a {}."]).save(tmp_path / "zs.safetensors")
    with pytest.raises(ClipxferError, match="use --model tiny"):
        load_head(path, model_id="lite:something-else")


def test_damaged_and_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ClipxferError, match="not a clipxfer head"):
        load_head(bad)
    with pytest.raises(ClipxferError, match="not found"):
        load_head(tmp_path / "missing.safetensors")
