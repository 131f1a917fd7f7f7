"""Transductive adaptation: EM on synthetic clusters with a text prior, the head, adapt, bench cells."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from clipxfer.encoders.base import ImageEncoding
from clipxfer.errors import ClipxferError
from clipxfer.heads import load_head
from clipxfer.heads.base import FewShotData
from clipxfer.heads.transductive import TransductiveHead, em_prototypes, fit_transductive
from clipxfer.heads.zeroshot import ZeroShotHead
from clipxfer.vector_math import l2_normalize


def two_clusters(n=400, dim=32, seed=0, prior_noise=1.2):
    """Two Gaussian clusters in feature space and shared-space embeddings whose zero-shot scores
    point the right way on average but are noisy (a correct, weak text prior)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    means = rng.normal(size=(2, dim)) * 1.5
    features = means[labels] + rng.normal(size=(n, dim))
    text = np.eye(2, 8, dtype=np.float32)
    signal = np.where(labels[:, None] == np.arange(2), 0.5, -0.5)
    emb = np.zeros((n, 8), np.float32)
    emb[:, :2] = signal + rng.normal(scale=prior_noise, size=(n, 2))
    emb[:, 2:] = rng.normal(size=(n, 6))
    encoding = ImageEncoding(l2_normalize(emb), features.astype(np.float32))
    zeroshot = ZeroShotHead("synthetic", ["a", "b"], {"class_weights": text}, {"logit_scale": 10.0})
    return encoding, labels, zeroshot


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_em_never_lowers_accuracy_and_converges(seed):
    encoding, labels, zeroshot = two_clusters(seed=seed)
    zs_accuracy = (zeroshot.predict(encoding) == labels).mean()
    assert 0.55 < zs_accuracy < 0.9  # a correct but weak prior
    head = fit_transductive(zeroshot, encoding)
    accuracy = (head.predict(encoding) == labels).mean()
    assert accuracy >= zs_accuracy
    assert accuracy > 0.9
    assert head.config["converged"] and head.config["iterations"] < 100


def test_em_fixed_point_and_labelled_shots_do_not_hurt():
    encoding, labels, zeroshot = two_clusters(seed=5)
    x = l2_normalize(encoding.features - encoding.features.mean(0)).astype(np.float64)
    prior = zeroshot.logits(encoding).astype(np.float64) / 5
    protos, resp, iterations, converged = em_prototypes(x, prior, 10.0, tol=1e-8, max_iter=500)
    assert converged
    again, _, _, _ = em_prototypes(x, prior, 10.0, tol=1e-8, max_iter=500)
    np.testing.assert_array_equal(protos, again)  # deterministic
    shots = np.concatenate([np.flatnonzero(labels == 0)[:2], np.flatnonzero(labels == 1)[:2]])
    labelled = ImageEncoding(encoding.embeddings[shots], encoding.features[shots])
    head = fit_transductive(zeroshot, encoding, labelled, labels[shots])
    assert (head.predict(encoding) == labels).mean() >= (zeroshot.predict(encoding) == labels).mean()


def test_head_classifies_new_images_and_round_trips(tmp_path):
    everything, labels, zeroshot = two_clusters(seed=3, n=800)
    seen = ImageEncoding(everything.embeddings[:400], everything.features[:400])
    head = fit_transductive(zeroshot, seen)
    new = ImageEncoding(everything.embeddings[400:], everything.features[400:])  # same clusters, unseen rows
    assert (head.predict(new) == labels[400:]).mean() > 0.9
    loaded = load_head(head.save(tmp_path / "t.safetensors"), model_id="synthetic")
    assert isinstance(loaded, TransductiveHead)
    np.testing.assert_allclose(loaded.logits(new), head.logits(new), rtol=1e-5, atol=1e-5)


def test_no_unlabelled_images_is_one_clear_error():
    encoding, _, zeroshot = two_clusters()
    with pytest.raises(ClipxferError, match="no unlabelled images"):
        fit_transductive(zeroshot, None)
    with pytest.raises(ClipxferError, match="no unlabelled images"):
        fit_transductive(zeroshot, ImageEncoding(encoding.embeddings[:0], encoding.features[:0]))


def test_fit_selects_on_validation_with_shots():
    encoding, labels, zeroshot = two_clusters(seed=4)
    pick = lambda rows: ImageEncoding(encoding.embeddings[rows], encoding.features[rows])  # noqa: E731
    train = np.concatenate([np.flatnonzero(labels == c)[:1] for c in (0, 1)])
    val = np.concatenate([np.flatnonzero(labels == c)[1:3] for c in (0, 1)])
    data = FewShotData(None, ["a", "b"], pick(train), labels[train], pick(val), labels[val], zeroshot, 1, 7)
    head = TransductiveHead.fit(data, unlabelled=encoding)
    assert head.config["selected_on"] == "validation" and head.config["shots"] == 1 and head.config["seed"] == 7
    assert (head.predict(encoding) == labels).mean() > 0.9


def _colour_dataset(tmp_path):
    from tests.test_bench import write_colour_folder

    return write_colour_folder(tmp_path / "colours", per_class=8)


def test_adapt_end_to_end_tiny_and_bad_folder(tmp_path, tiny):
    from clipxfer.cli import main
    from clipxfer.fewshot.unlabelled import run_adapt

    data = _colour_dataset(tmp_path)
    result = run_adapt(str(data), unlabelled=str(data), shots=0, encoder=tiny, out=tmp_path / "h.safetensors")
    assert result["num_unlabelled"] == 24 and result["num_train"] == 0
    assert 0 <= result["accuracy"] <= 1 and result["converged"] in (True, False)
    assert load_head(result["head"], model_id=tiny.id).method == "transductive"
    one_shot = run_adapt(str(data), unlabelled=str(data), shots=1, seed=3, encoder=tiny, save=False)
    assert one_shot["num_train"] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    outcome = CliRunner().invoke(main, ["adapt", str(data), "--unlabelled", str(empty), "--model", "tiny"])
    assert outcome.exit_code == 2 and "no images found" in outcome.output
    assert len(outcome.output.strip().splitlines()) == 1


def test_bench_runs_transductive_at_zero_one_two_shots(tmp_path, tiny):
    from clipxfer.bench import BenchConfig, DatasetSpec, run_bench

    data = _colour_dataset(tmp_path)
    config = BenchConfig(datasets=(DatasetSpec(source=str(data), max_test=9),), methods=("zeroshot", "transductive"),
                         shots=(1, 2), seeds=(1,), model="tiny")  # fmt: skip
    table = run_bench(config, tmp_path / "out", encoder=tiny)
    cells = set(zip(table["method"], table["shots"].astype(int)))
    assert cells == {("zeroshot", 0), ("transductive", 0), ("transductive", 1), ("transductive", 2)}
    assert "| transductive |" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.slow
def test_lite_fashion_mnist_no_labels_beats_issue_prototype(lite, fashion_test_1000):
    from clipxfer.datasets.features import encode_dataset
    from clipxfer.datasets.prompts import load_templates
    from clipxfer.heads.zeroshot import fit_zeroshot

    encoding = encode_dataset(lite, fashion_test_1000)
    zeroshot = fit_zeroshot(lite, fashion_test_1000.classnames, load_templates("simple"))
    head = fit_transductive(zeroshot, encoding)
    accuracy = (head.predict(encoding) == fashion_test_1000.labels).mean()
    assert accuracy >= 0.412 > (zeroshot.predict(encoding) == fashion_test_1000.labels).mean()
