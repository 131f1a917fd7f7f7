"""Multi-label: the seeded mosaic helper, the per-label sigmoid probe, thresholds, the metrics, the task."""

from __future__ import annotations

import numpy as np
import pytest

from clipxfer.datasets.labelled import LabelledImages
from clipxfer.datasets.mosaic import make_mosaics
from clipxfer.encoders.base import ImageEncoding
from clipxfer.heads import load_head
from clipxfer.heads.multilabel import MultiLabelProbeHead, best_thresholds
from clipxfer.metrics import multilabel_report
from clipxfer.vector_math import l2_normalize


def small_set(per_class=6, classes=3):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    sources = [np.full((4, 4), 40 * c + i, np.uint8) for i, c in enumerate(labels)]
    return LabelledImages("toy", [f"c{c}" for c in range(classes)], sources, labels,
                          [f"toy:{i}" for i in range(len(labels))]), rng


def test_mosaics_are_seeded_and_labelled_by_their_tiles():
    dataset, _ = small_set()
    first = make_mosaics(dataset, 20, seed=3)
    again = make_mosaics(dataset, 20, seed=3)
    other = make_mosaics(dataset, 20, seed=4)
    assert all((a == b).all() for a, b in zip(first.images, again.images))
    assert not all((a == b).all() for a, b in zip(first.images, other.images))
    assert first.images[0].shape == (8, 8, 3)
    for image, row, tiles in zip(first.images, first.targets, first.tiles):
        present = set(dataset.labels[tiles])
        assert present == set(np.flatnonzero(row)) and 1 <= len(present) <= 3
        assert (image[:4, :4, 0] == dataset.sources[tiles[0]]).all()  # tile 0 is top-left
    pool = np.flatnonzero(dataset.labels != 2)
    assert make_mosaics(dataset, 10, seed=1, pool=pool).targets[:, 2].sum() == 0


def test_multilabel_report_by_hand():
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.1, 0.2]])
    report = multilabel_report(targets, scores, ["a", "b"], predicted=scores >= 0.5)
    assert report["per_label_ap"]["a"] == pytest.approx(1.0)
    assert report["map"] == pytest.approx(np.mean(list(report["per_label_ap"].values())))
    # decisions: a right twice (tp 2), b: tp 1 (row 1), fn 1 (row 2) -> micro F1 = 2*3 / (2*3 + 1)
    assert report["micro_f1"] == pytest.approx(6 / 7)


def test_thresholds_maximise_f1_per_label():
    targets = np.array([[1], [1], [0], [0]])
    probs = np.array([[0.3], [0.25], [0.2], [0.1]])  # separable, but all below 0.5
    threshold = best_thresholds(targets, probs)[0]
    assert 0.2 < threshold <= 0.25


def test_multilabel_probe_learns_sets_and_saves(tmp_path):
    rng = np.random.default_rng(1)
    classes, dim = 4, 12
    centers = rng.normal(size=(classes, dim))
    targets = (rng.random((160, classes)) < 0.4).astype(np.uint8)
    targets[targets.sum(1) == 0, 0] = 1
    features = targets @ centers + 0.1 * rng.normal(size=(160, dim))
    enc = ImageEncoding(l2_normalize(rng.normal(size=(160, 8))).astype(np.float32), features.astype(np.float32))

    def part(rows):
        return ImageEncoding(enc.embeddings[rows], enc.features[rows])

    train, val, test = np.arange(80), np.arange(80, 110), np.arange(110, 160)
    head = MultiLabelProbeHead.fit_multilabel("synthetic", [f"c{c}" for c in range(classes)], part(train),
                                              targets[train], part(val), targets[val])
    report = multilabel_report(targets[test], head.predict_proba(part(test)), head.classnames,
                               head.predict(part(test)))
    assert report["map"] > 0.9 and report["macro_f1"] > 0.8  # sums of well-separated centres
    loaded = load_head(head.save(tmp_path / "ml"))
    np.testing.assert_array_equal(loaded.predict(part(test)), head.predict(part(test)))


def test_run_multilabel_mosaics_end_to_end(tiny, tmp_path):
    from clipxfer.fewshot.multilabel import run_multilabel_mosaics

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 30)
    sources = [(rng.random((16, 16, 3)) * 60 + 60 * np.eye(3)[c] * 3).astype(np.uint8) for c in labels]
    splits = np.where(np.arange(90) % 3 == 0, "test", "train")
    dataset = LabelledImages("tints", ["red", "green", "blue"], sources, labels, [f"t:{i}" for i in range(90)],
                             splits)
    result = run_multilabel_mosaics(dataset, shots=4, seed=1, encoder=tiny, test_count=30, out=tmp_path / "ml")
    assert result["num_train"] == 12 and result["num_test"] == 30
    for part in ("zeroshot", "probe"):
        assert 0 <= result[part]["map"] <= 1 and set(result[part]) >= {"micro_f1", "macro_f1", "per_label_ap"}
    assert load_head(result["head"]).method == "multilabel-probe"
