"""Active-learning picks, the label store and the labelling head, without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipxfer.errors import ClipxferError
from clipxfer.serve.active import diverse_top, propose, uncertainty
from clipxfer.serve.labels import LabelStore, cross_validate, fit_labelled_head


def test_uncertainty_orders_rows_by_doubt():
    probs = np.array([[0.98, 0.01, 0.01], [0.5, 0.45, 0.05], [0.34, 0.33, 0.33]])
    for strategy in ("margin", "entropy", "least-confident"):
        scores = uncertainty(probs, strategy)
        assert scores[0] < scores[1] and scores[0] < scores[2]
        assert ((scores >= 0) & (scores <= 1 + 1e-9)).all()
    assert uncertainty(probs, "margin")[1] == pytest.approx(0.95)
    with pytest.raises(ClipxferError, match="unknown strategy"):
        uncertainty(probs, "vibes")


def test_diversity_term_avoids_near_copies():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 16))
    # Ten near-copies of one vector with the highest scores, then two distinct vectors.
    vectors = np.concatenate([base[0] + 0.01 * rng.normal(size=(10, 16)), base[1:]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = np.concatenate([np.full(10, 0.9) + 0.001 * np.arange(10), [0.8, 0.8]])
    plain = diverse_top(scores, vectors, 3, diversity=0.0)
    assert set(plain) <= set(range(10))  # pure uncertainty: three copies
    diverse = diverse_top(scores, vectors, 3, diversity=0.5)
    assert {10, 11} <= set(diverse.tolist()) and len(set(diverse.tolist())) == 3


def test_propose_skips_labelled_rows():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.55, 0.45], [0.6, 0.4]])
    vectors = np.eye(4, dtype=np.float32)
    picked, unsure = propose(probs, vectors, 2, exclude=np.array([True, False, False, False]))
    assert picked.tolist() == [2, 3] and unsure[0] >= unsure[1]
    assert len(propose(probs, vectors, 10)[0]) == 4


def test_label_store_is_atomic_and_undoable(tmp_path):
    path = tmp_path / "labels.json"
    store = LabelStore(path)
    store.set_classes(["cat", " dog ", ""])
    assert store.classes == ["cat", "dog"]
    store.set_label(1, "/a/1.jpg", "cat")
    store.set_label(2, "/a/<b>,2.jpg", "dog")
    store.set_label(1, "/a/1.jpg", "dog")
    with pytest.raises(ClipxferError, match="unknown class"):
        store.set_label(3, "/a/3.jpg", "bird")
    store.close()  # one process writes a label file at a time
    reopened = LabelStore(path)
    assert reopened.labels == {1: ("/a/1.jpg", "dog"), 2: ("/a/<b>,2.jpg", "dog")}
    assert reopened.undo() == 1 and reopened.labels[1][1] == "cat"
    assert LabelStore(path).labels[1][1] == "cat"
    assert reopened.undo() == 2 and 2 not in reopened.labels
    assert reopened.undo() == 1 and reopened.undo() == "classes" and reopened.classes == []
    assert reopened.undo() is None
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    reopened.set_classes(["cat", "dog"])
    reopened.set_label(2, "/a/<b>,2.jpg", "dog")
    assert reopened.manifest_csv() == 'path,label\n"/a/<b>,2.jpg",dog\n'  # CSV-quoted
    with pytest.raises(ClipxferError, match="still have labels"):
        reopened.set_classes(["cat"])
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ClipxferError, match="not a clipxfer label file"):
        LabelStore(path)


def test_labelled_head_and_cross_validation(tiny):
    from clipxfer.encoders.base import ImageEncoding

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(2, tiny.dim))
    labels = np.array([0] * 6 + [1] * 6)
    x = centres[labels] + 0.3 * rng.normal(size=(12, tiny.dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    encoding = ImageEncoding(x, x)
    for method in ("probe", "tip"):
        head = fit_labelled_head(method, tiny, ["a", "b"], encoding, labels)
        assert (head.predict(encoding) == labels).mean() == 1.0
        result = cross_validate(method, tiny, ["a", "b"], encoding, labels)
        assert result["folds"] == 5 and np.array(result["confusion"]).sum() == 12
        assert result["accuracy"] > 0.8
    too_few = cross_validate("probe", tiny, ["a", "b"], encoding, np.array([0] * 11 + [1]))
    assert too_few["accuracy"] is None
    with pytest.raises(ClipxferError, match="at least one labelled"):
        fit_labelled_head("probe", tiny, ["a", "b"], encoding, np.zeros(12, np.int64))


@pytest.mark.slow
def test_suggest_command(sample_photo_index, tmp_path, lite):
    from click.testing import CliRunner

    from clipxfer.cli import main
    from clipxfer.heads.zeroshot import fit_zeroshot

    head = fit_zeroshot(lite, ["cat", "coffee", "rocket"], ["a photo of a {}."]).save(tmp_path / "zs.safetensors")
    runner = CliRunner()
    result = runner.invoke(main, ["suggest", "--index", str(sample_photo_index), "--head", str(head), "-n", "5", "--json"])
    assert result.exit_code == 0, result.output
    picks = json.loads(result.output)
    assert [p["rank"] for p in picks] == [1, 2, 3, 4, 5] and len({p["id"] for p in picks}) == 5
    assert all(p["label"] in ("cat", "coffee", "rocket") for p in picks)
    manifest = tmp_path / "done.csv"
    manifest.write_text("path,label\n" + "".join(f"{p['path']},cat\n" for p in picks[:2]))
    again = json.loads(runner.invoke(main, ["suggest", "--index", str(sample_photo_index), "--head", str(head),
                                            "-n", "5", "--json", "--exclude", str(manifest)]).output)
    assert not {p["id"] for p in picks[:2]} & {p["id"] for p in again}
    text = runner.invoke(main, ["suggest", "--index", str(sample_photo_index), "--head", str(head), "-n", "2"])
    assert text.exit_code == 0 and len(text.output.strip().splitlines()) == 2
    bad = runner.invoke(main, ["suggest", "--index", str(tmp_path / "none"), "--head", str(head)])
    assert bad.exit_code == 2 and "no index" in bad.output
