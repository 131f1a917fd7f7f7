"""The zero-shot head: equal to open_clip's own builder, descriptions, the text-weight cache."""

from __future__ import annotations

import numpy as np
import pytest

from clipxfer.datasets.prompts import load_templates
from clipxfer.encoders.base import ImageEncoding
from clipxfer.heads import load_head
from clipxfer.heads.base import FewShotData
from clipxfer.heads.zeroshot import ZeroShotHead, class_text_weights, fit_zeroshot
from clipxfer.vector_math import l2_normalize

CLASSES = ["cat", "dog", "car", "tree", "boat"]


def test_head_equals_open_clip_builder(tiny):
    import open_clip

    templates = load_templates("openai_imagenet")[:12]
    theirs = open_clip.build_zero_shot_classifier(tiny.model, tiny.tokenizer, CLASSES, templates, num_classes_per_batch=2)
    ours = class_text_weights(tiny, CLASSES, templates, use_cache=False)
    np.testing.assert_allclose(ours, theirs.T.numpy(), atol=2e-6)
    head = fit_zeroshot(tiny, CLASSES, templates, use_cache=False)
    images = ImageEncoding(*(2 * [tiny.encode_texts(["a cat on a mat", "a red car"])]))
    np.testing.assert_allclose(head.logits(images), tiny.logit_scale * images.embeddings @ theirs.numpy(), atol=1e-4)


def test_descriptions_are_averaged_with_templates(tiny):
    templates = ["a photo of a {}.", "a {}."]
    descriptions = {"cat": ["a small pet with whiskers", "a {} asleep on a sofa"]}
    weights = class_text_weights(tiny, ["cat", "dog"], templates, descriptions, use_cache=False)
    cat_prompts = ["a photo of a cat.", "a cat.", "a small pet with whiskers", "a cat asleep on a sofa"]
    expected_cat = l2_normalize(tiny.encode_texts(cat_prompts).mean(axis=0, keepdims=True))[0]
    expected_dog = l2_normalize(tiny.encode_texts(["a photo of a dog.", "a dog."]).mean(axis=0, keepdims=True))[0]
    np.testing.assert_allclose(weights, np.stack([expected_cat, expected_dog]), atol=2e-6)
    plain = class_text_weights(tiny, ["cat", "dog"], templates, use_cache=False)
    assert not np.allclose(weights[0], plain[0]) and np.allclose(weights[1], plain[1], atol=1e-6)


def test_underscores_in_folder_names_become_spaces(tiny):
    weights = class_text_weights(tiny, ["ankle_boot", "cat"], ["a photo of a {}."], use_cache=False)
    np.testing.assert_allclose(weights[0], tiny.encode_texts(["a photo of a ankle boot."])[0], atol=2e-6)


def test_cache_hit_skips_the_text_encoder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPXFER_CACHE", str(tmp_path))
    calls = []
    original = tiny.encode_texts
    monkeypatch.setattr(tiny, "encode_texts", lambda texts, *a, **k: calls.append(len(texts)) or original(texts, *a, **k))
    templates = load_templates("openai_imagenet")[:5]
    first = fit_zeroshot(tiny, CLASSES, templates)
    assert calls == [len(CLASSES) * 5]
    second = fit_zeroshot(tiny, CLASSES, templates)
    assert len(calls) == 1, "the second build encoded texts again"
    np.testing.assert_array_equal(first.class_weights, second.class_weights)
    assert list((tmp_path / "text_weights").glob("*.safetensors"))
    # Another template list, class order, or descriptions is another entry.
    fit_zeroshot(tiny, CLASSES[::-1], templates)
    fit_zeroshot(tiny, CLASSES, templates, {"cat": ["a pet"]})
    assert len(calls) == 3
    # A damaged entry is recomputed, not trusted.
    for entry in (tmp_path / "text_weights").glob("*.safetensors"):
        entry.write_bytes(b"garbage")
    again = fit_zeroshot(tiny, CLASSES, templates)
    assert len(calls) == 4
    np.testing.assert_allclose(again.class_weights, first.class_weights, atol=1e-7)


def test_descriptions_are_saved_and_format_kept(tiny, tmp_path):
    head = fit_zeroshot(tiny, ["cat", "dog"], ["a {}."], {"dog": ["a loyal pet"]}, use_cache=False)
    loaded = load_head(head.save(tmp_path / "zs"), model_id=tiny.id)
    assert loaded.config["descriptions"] == {"dog": ["a loyal pet"]}
    assert loaded.config["templates"] == ["a {}."] and loaded.config["logit_scale"] == pytest.approx(tiny.logit_scale)
    np.testing.assert_array_equal(loaded.class_weights, head.class_weights)


def _fewshot_data(encoder, zeroshot):
    empty = ImageEncoding(np.zeros((0, encoder.dim), np.float32), np.zeros((0, encoder.dim), np.float32))
    labels = np.zeros(0, np.int64)
    return FewShotData(encoder, ["cat", "dog"], empty, labels, empty, labels, zeroshot, shots=1, seed=0)


def test_fit_follows_the_head_contract(tiny):
    prior = fit_zeroshot(tiny, ["cat", "dog"], ["a photo of a {}."], use_cache=False)
    data = _fewshot_data(tiny, prior)
    assert ZeroShotHead.fit(data) is prior
    rebuilt = ZeroShotHead.fit(data, templates="openai_imagenet")
    assert isinstance(rebuilt, ZeroShotHead) and len(rebuilt.config["templates"]) == 80
    np.testing.assert_allclose(
        rebuilt.class_weights, class_text_weights(tiny, ["cat", "dog"], load_templates("openai_imagenet")), atol=1e-7
    )
    with pytest.raises(TypeError, match="unknown option"):
        ZeroShotHead.fit(data, epochs=3)


@pytest.mark.slow
def test_lite_fashion_mnist_simple_accuracy(lite, fashion_test_1000):
    from clipxfer.datasets.features import encode_dataset
    from clipxfer.metrics import accuracy

    encoding = encode_dataset(lite, fashion_test_1000)
    head = fit_zeroshot(lite, fashion_test_1000.classnames, load_templates("simple"))
    acc = accuracy(fashion_test_1000.labels, head.predict(encoding))
    assert acc >= 0.28, acc
