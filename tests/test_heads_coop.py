"""CoOp prompt tuning through the tiny open_clip text tower (and the lite tower, slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipxfer.encoders.base import ImageEncoding
from clipxfer.heads import HEAD_TYPES, load_head
from clipxfer.heads.base import FewShotData
from clipxfer.heads.coop import PromptLearner, text_tower
from clipxfer.heads.zeroshot import fit_zeroshot
from clipxfer.vector_math import l2_normalize

CLASSES = ["cat", "dog", "car", "tree", "boat"]


def tiny_task(tiny, shots=8, seed=0):
    """Image embeddings near each class's text embedding under a template the zero-shot head
    does not use, so prompt tuning has something to find."""
    rng = np.random.default_rng(seed)
    centres = tiny.encode_texts([f"an image showing the {name}, close up" for name in CLASSES])

    def draw(per_class):
        labels = np.repeat(np.arange(len(CLASSES)), per_class)
        emb = l2_normalize(centres[labels] + 0.02 * rng.normal(size=(len(labels), tiny.dim)))
        return ImageEncoding(emb, emb), labels

    train, train_labels = draw(shots)
    val, val_labels = draw(4)
    test, test_labels = draw(40)
    zeroshot = fit_zeroshot(tiny, CLASSES, ["{}"])
    data = FewShotData(tiny, CLASSES, train, train_labels, val, val_labels, zeroshot, shots, seed, "h")
    return data, test, test_labels


def test_prompt_with_init_reproduces_encode_texts(tiny):
    tower = text_tower(tiny)
    learner = PromptLearner(tower, CLASSES, 16, "a photo of a", "end", False, torch.Generator().manual_seed(0))
    assert learner.n_ctx == 4
    with torch.no_grad():
        ours = tower.encode(learner(), learner.ids, learner.mask).numpy()
    np.testing.assert_allclose(ours, tiny.encode_texts([f"a photo of a {c}." for c in CLASSES]), atol=1e-5)


def test_coop_lowers_its_loss_and_beats_chance(tiny):
    data, test, labels = tiny_task(tiny)
    # keep="last": the head is the trained context whether or not validation happened to improve.
    head = HEAD_TYPES["coop"].fit(data, max_steps=80, lr=5e-3, eval_every=5, keep="last")
    assert head.config["best_step"] == head.config["steps_run"] == 80
    assert head.config["train_loss_final"] < head.config["train_loss_initial"]
    assert float((head.predict(test) == labels).mean()) > 1.0 / len(CLASSES) + 0.2
    assert head.weights["class_weights"].shape == (len(CLASSES), tiny.dim)
    assert head.weights["ctx"].shape == (16, tiny.model.token_embedding.weight.shape[1])


@pytest.mark.parametrize("position,specific", [("middle", False), ("front", True)])
def test_coop_positions_and_class_specific_context(tiny, position, specific):
    data, _, _ = tiny_task(tiny, shots=2)
    head = HEAD_TYPES["coop"].fit(data, n_ctx=4, class_token_position=position, class_specific_context=specific,
                                  max_steps=5, eval_every=1)
    assert head.config["class_token_position"] == position
    assert head.weights["ctx"].shape[0] == (len(CLASSES) if specific else 4)


def test_coop_same_seed_same_numbers_and_round_trip(tmp_path, tiny):
    data, test, _ = tiny_task(tiny)
    a = HEAD_TYPES["coop"].fit(data, max_steps=10, eval_every=2)
    b = HEAD_TYPES["coop"].fit(data, max_steps=10, eval_every=2)
    np.testing.assert_array_equal(a.weights["ctx"], b.weights["ctx"])
    np.testing.assert_array_equal(a.weights["class_weights"], b.weights["class_weights"])
    loaded = load_head(a.save(tmp_path / "coop"), model_id=tiny.id)
    np.testing.assert_array_equal(loaded.logits(test), a.logits(test))


@pytest.mark.slow
def test_lite_tower_with_init_reproduces_encode_texts(lite):
    tower = text_tower(lite)
    learner = PromptLearner(tower, ["T-shirt/top", "Ankle boot"], 16, "a photo of a", "middle", False,
                            torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tower.encode(learner(), learner.ids, learner.mask).numpy()
    # middle with the init phrase: "a photo" + name + "of a" (CoOp's split of the context)
    expected = lite.encode_texts(["a photo t-shirt/top of a.", "a photo ankle boot of a."])
    np.testing.assert_allclose(ours, expected, atol=1e-4)
