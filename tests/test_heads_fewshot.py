"""Few-shot heads on synthetic features: probe, Tip-Adapter(-F), mixing; save/load and seeds."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from clipxfer.encoders.base import ImageEncoding
from clipxfer.errors import ClipxferError
from clipxfer.heads import HEAD_TYPES, load_head
from clipxfer.heads.base import FewShotData
from clipxfer.heads.zeroshot import ZeroShotHead
from clipxfer.vector_math import l2_normalize

NUM_CLASSES, DIM = 10, 32


def synthetic_task(shots=8, seed=0, noise=0.35, feature_dim=None):
    """Separable clusters around random unit means; a zero-shot head that knows nothing
    (random class weights), so any accuracy above chance comes from the shots."""
    rng = np.random.default_rng(seed)
    means = l2_normalize(rng.normal(size=(NUM_CLASSES, DIM)))
    lift = rng.normal(size=(DIM, feature_dim)) if feature_dim else None

    def draw(per_class):
        labels = np.repeat(np.arange(NUM_CLASSES), per_class)
        embeddings = l2_normalize(means[labels] + noise * rng.normal(size=(len(labels), DIM)) / np.sqrt(DIM) * 3)
        features = embeddings if lift is None else np.maximum(embeddings @ lift, 0).astype(np.float32)
        return ImageEncoding(embeddings, features), labels

    train, train_labels = draw(shots)
    val, val_labels = draw(4)
    test, test_labels = draw(50)
    classes = [f"class{i}" for i in range(NUM_CLASSES)]
    zs_weights = l2_normalize(rng.normal(size=(NUM_CLASSES, DIM)))
    zeroshot = ZeroShotHead("synthetic", classes, {"class_weights": zs_weights}, {"logit_scale": 100.0, "templates": ["{}"]})
    data = FewShotData(SimpleNamespace(id="synthetic"), classes, train, train_labels, val, val_labels, zeroshot,
                       shots, seed, "hash")
    return data, test, test_labels


def accuracy(head, encoding, labels):
    return float((head.predict(encoding) == labels).mean())


@pytest.mark.parametrize(
    "method,options",
    [("probe", {}), ("probe", {"prior": "none"}), ("probe", {"prior": "zeroshot"}), ("tip", {}),
     ("tip", {"finetune": True, "steps": 30}), ("mix", {})],
)
def test_methods_separate_synthetic_clusters(method, options):
    data, test, labels = synthetic_task()
    head = HEAD_TYPES[method].fit(data, **options)
    assert accuracy(data.zeroshot, test, labels) < 0.4
    assert accuracy(head, test, labels) >= 0.95
    assert head.config["shots"] == 8 and head.config["manifest_hash"] == "hash"
    assert 0.0 <= head.config["val_accuracy"] <= 1.0


def test_probe_on_separate_backbone_features():
    data, test, labels = synthetic_task(feature_dim=64)
    head = HEAD_TYPES["probe"].fit(data, prior="none")
    assert head.weights["feature_weights"].shape == (NUM_CLASSES, 64)
    assert accuracy(head, test, labels) >= 0.95


def test_probe_prior_keeps_a_good_zeroshot_head():
    """With a zero-shot head that is already right and one noisy shot, the prior stays near it."""
    data, test, labels = synthetic_task(shots=1, noise=1.2)
    means = np.stack([data.train.embeddings[data.train_labels == c].mean(0) for c in range(NUM_CLASSES)])
    good = ZeroShotHead("synthetic", data.classnames, {"class_weights": l2_normalize(means)}, {"logit_scale": 100.0})
    data.zeroshot = good
    head = HEAD_TYPES["probe"].fit(data, prior="zeroshot")
    assert accuracy(head, test, labels) >= accuracy(good, test, labels) - 0.05
    assert head.config["zeroshot_scale"] > 0


def test_same_seed_same_numbers():
    for method, options in [("probe", {}), ("tip", {"finetune": True, "steps": 20}), ("mix", {})]:
        a = HEAD_TYPES[method].fit(synthetic_task()[0], **options)
        b = HEAD_TYPES[method].fit(synthetic_task()[0], **options)
        assert a.weights.keys() == b.weights.keys()
        for name in a.weights:
            np.testing.assert_array_equal(a.weights[name], b.weights[name])
        assert a.config == b.config


def test_tip_variant_and_alpha_beta_from_validation():
    data, _, _ = synthetic_task()
    plain = HEAD_TYPES["tip"].fit(data)
    tuned = HEAD_TYPES["tip"].fit(data, finetune=True, steps=20)
    assert plain.config["variant"] == "tip" and tuned.config["variant"] == "tipf"
    assert plain.config["alpha"] > 0 and plain.config["beta"] > 0
    np.testing.assert_array_equal(plain.weights["values"].sum(axis=1), 1.0)


def test_mix_extremes_are_the_two_heads():
    data, test, labels = synthetic_task()
    zs_only = HEAD_TYPES["mix"].fit(data, mix=0.0)
    np.testing.assert_array_equal(zs_only.predict(test), data.zeroshot.predict(test))
    probe = HEAD_TYPES["probe"].fit(data, prior="none")
    adapted = HEAD_TYPES["mix"].fit(data, mix=1.0)
    np.testing.assert_allclose(adapted.logits(test), probe.logits(test), atol=1e-4)
    with pytest.raises(ClipxferError, match="between 0 and 1"):
        HEAD_TYPES["mix"].fit(data, mix=1.5)


@pytest.mark.parametrize("method,options", [("probe", {}), ("tip", {"finetune": True, "steps": 10}), ("mix", {})])
def test_heads_round_trip_and_refuse_other_models(tmp_path, method, options):
    data, test, _ = synthetic_task()
    head = HEAD_TYPES[method].fit(data, **options)
    path = head.save(tmp_path / method)
    loaded = load_head(path, model_id="synthetic")
    assert loaded.method == method and loaded.config == head.config
    np.testing.assert_array_equal(loaded.logits(test), head.logits(test))
    with pytest.raises(ClipxferError, match="was made with model 'synthetic'"):
        load_head(path, model_id="open_clip:other")


def test_bad_options_are_one_line_errors():
    data, _, _ = synthetic_task()
    with pytest.raises(ClipxferError, match="prior"):
        HEAD_TYPES["probe"].fit(data, prior="sometimes")
    with pytest.raises(ClipxferError, match="key_space"):
        HEAD_TYPES["tip"].fit(data, key_space="pixels")
    with pytest.raises(ClipxferError, match="--base"):
        HEAD_TYPES["mix"].fit(data, base="tip")
