"""The encoder contract, for the tiny open_clip model and the offline lite encoder."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipxfer.encoders import load_encoder
from clipxfer.encoders.openclip import MissingWeightsError
from clipxfer.errors import ClipxferError

from .conftest import random_images


@pytest.mark.parametrize("name", ["tiny", "lite"])
def test_contract_shapes_dtype_and_norm(name, request):
    encoder = request.getfixturevalue(name)
    images = encoder.encode_images(random_images(3))
    texts = encoder.encode_texts(["a cat", "a dog", "a photo of a cracked weld"])
    assert isinstance(encoder.id, str) and encoder.id
    for rows in (images, texts):
        assert rows.dtype == np.float32
        assert rows.shape == (3, encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    full = encoder.embed_images(random_images(2))
    assert full.features.shape == (2, encoder.feature_dim)


def test_ids_are_stable_and_distinct(tiny, lite):
    assert tiny.id == "open_clip:clipxfer-tiny:random-seed0"
    assert tiny.id == load_encoder("tiny", "cpu", "fp32").id
    assert lite.id.startswith("lite:") and lite.id != tiny.id
    assert lite.dim == 384 and lite.feature_dim == 1280


def test_tiny_is_deterministic_across_loads(tiny):
    again = load_encoder("tiny", "cpu", "fp32")
    np.testing.assert_array_equal(tiny.encode_texts(["a cat"]), again.encode_texts(["a cat"]))


@pytest.mark.parametrize("name", ["tiny", "lite"])
def test_batch_of_one_equals_batch_of_32(name):
    encoder = load_encoder(name, "cpu", "fp32")
    images = random_images(32, seed=1)
    batched = encoder.encode_images(images, batch_size=32)
    single = np.concatenate([encoder.encode_images([image], batch_size=1) for image in images])
    np.testing.assert_allclose(batched, single, atol=1e-4)
    texts = [f"a photo of thing {i}" for i in range(32)]
    np.testing.assert_allclose(
        encoder.encode_texts(texts, batch_size=32),
        np.concatenate([encoder.encode_texts([t], batch_size=1) for t in texts]),
        atol=1e-4,
    )


def test_tiny_matches_open_clip_own_preprocess_and_forward(tiny):
    """Our uint8 pipeline (resize, crop, normalise on the compute side) equals open_clip's."""
    model, _, preprocess = open_clip.create_model_and_transforms("clipxfer-tiny")
    model.load_state_dict(tiny.model.state_dict())
    images = [Image.fromarray(a) for a in random_images(4, seed=2, size=(45, 70))]
    with torch.no_grad():
        reference = model.encode_image(torch.stack([preprocess(img) for img in images]), normalize=True).numpy()
    # Our resize (torch's uint8 kernel) rounds a pixel at most one level apart from PIL's
    # (tests/test_pipeline.py): up to 8e-5 in a unit embedding of these noise images.
    np.testing.assert_allclose(tiny.encode_images(images), reference, atol=1.5e-4)


@pytest.mark.parametrize("spec", ["tiny", "ViT-B-32:random"])
def test_bf16_embeddings_keep_cosine_to_fp32(spec):
    images = random_images(8, seed=3, size=(240, 320))
    fp32 = load_encoder(spec, "cpu", "fp32")
    bf16 = load_encoder(spec, "cpu", "bf16")
    assert bf16.dtype == torch.bfloat16
    cosine = (fp32.encode_images(images) * bf16.encode_images(images)).sum(axis=1)
    assert cosine.min() >= 0.99
    text_cosine = (fp32.encode_texts(["a red car"]) * bf16.encode_texts(["a red car"])).sum()
    assert text_cosine >= 0.99


def test_lite_bf16_keeps_cosine_to_fp32(fashion_test_1000, lite):
    images = fashion_test_1000.sources[:64]
    fp32 = load_encoder("lite", "cpu", "fp32").encode_images(images)
    bf16 = load_encoder("lite", "cpu", "bf16").encode_images(images)
    assert (fp32 * bf16).sum(axis=1).mean() >= 0.99


def test_local_checkpoint_file(tmp_path, tiny):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), checkpoint)
    loaded = load_encoder(f"clipxfer-tiny:{checkpoint}", "cpu", "fp32")
    assert loaded.id.startswith("open_clip:clipxfer-tiny:file-")
    np.testing.assert_allclose(loaded.encode_texts(["a cat"]), tiny.encode_texts(["a cat"]), atol=1e-6)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no-such-model", "unknown model 'no-such-model'"),
        ("ViT-B-32:no-such-tag", "unknown pretrained tag 'no-such-tag'"),
    ],
)
def test_unknown_names_give_clear_errors(spec, fragment):
    with pytest.raises(ClipxferError, match=fragment):
        load_encoder(spec)


def test_missing_weights_give_one_paragraph_offline(monkeypatch):
    from clipxfer.encoders import openclip

    monkeypatch.setattr(openclip, "hub_reachable", lambda: False)
    with pytest.raises(MissingWeightsError) as info:
        load_encoder("ViT-B-32:laion2b_s34b_b79k")
    message = str(info.value)
    assert "ViT-B-32:laion2b_s34b_b79k" in message and "--model lite" in message and "\n" not in message


def test_default_falls_back_to_lite_with_one_warning(monkeypatch, capsys):
    from clipxfer.encoders import openclip

    monkeypatch.setattr(openclip, "hub_reachable", lambda: False)
    encoder = load_encoder(None, "cpu")
    assert encoder.id.startswith("lite:")
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning:")


def test_precision_choice(monkeypatch):
    from clipxfer import device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert device.choose_precision(cpu) == torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert device.choose_precision(cpu) == torch.float32
    assert device.choose_precision(cpu, "bf16") == torch.bfloat16
    with pytest.raises(ClipxferError, match="unknown precision 'fp8'"):
        device.choose_precision(cpu, "fp8")


@pytest.mark.slow
def test_lite_zero_shot_fashion_mnist(lite, fashion_test_1000):
    """Reproduces the prototype: 'a photo of a {c}.' on 1,000 test images, about 0.30 (chance 0.10)."""
    images = lite.encode_images(fashion_test_1000.sources)
    texts = lite.encode_texts([f"a photo of a {c}." for c in fashion_test_1000.classnames])
    accuracy = float(((images @ texts.T).argmax(axis=1) == fashion_test_1000.labels).mean())
    assert accuracy >= 0.28


@pytest.mark.slow
def test_lite_text_search_over_sample_photos(lite, sample_photos_dir):
    paths = sorted(sample_photos_dir.iterdir())
    images = lite.encode_images(paths)
    for query, expected in [("a cat", "chelsea"), ("a cup of coffee", "coffee"), ("a rocket launch", "rocket")]:
        best = paths[int((images @ lite.encode_texts([query])[0]).argmax())]
        assert best.stem == expected, query


@pytest.mark.parametrize("spec", ["tiny", "ViT-B-32:random"])
def test_text_encoding_equals_open_clip_encode_text(spec):
    """Trimming the padding after the longest prompt (and sorting by length) changes nothing."""
    encoder = load_encoder(spec, "cpu", "fp32")
    texts = ["a", "a photo of a cat.", "a bad photo of the big red car parked on a rainy street at night.", "dog"]
    with torch.no_grad():
        reference = encoder.model.encode_text(encoder.tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(encoder.encode_texts(texts, batch_size=3), reference, atol=2e-5)
