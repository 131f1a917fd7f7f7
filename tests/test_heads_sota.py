"""LP++, CLAP and TransCLIP: update rules on hand-worked cases, the heads, the adapt collapse guard,
the commands (lpp, clap, --transductive) and the +trans bench methods."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clipxfer.bench import BenchConfig, DatasetSpec, run_bench
from clipxfer.bench.run import plan_cells
from clipxfer.cli import main
from clipxfer.encoders.base import ImageEncoding
from clipxfer.errors import ClipxferError
from clipxfer.heads import load_head
from clipxfer.heads.base import FewShotData
from clipxfer.heads.clap import CLAPHead, clap_loss_and_gradient, class_penalties, fit_clap
from clipxfer.heads.lpp import LPPHead, fit_lpp, init_alpha, lr_alpha, lr_visual
from clipxfer.heads.transclip import (
    TransCLIPHead,
    gaussian_loglik,
    knn_affinity,
    transclip,
    update_mu,
    update_var,
    update_z,
)  # fmt: skip
from clipxfer.heads.transductive import agreement, fit_transductive
from clipxfer.heads.zeroshot import ZeroShotHead
from clipxfer.vector_math import l2_normalize

from .conftest import write_tinted_folder


def clusters(n_per_class=30, classes=3, dim=16, emb_dim=8, seed=0, spread=0.35, text_noise=1.0):
    """Well separated feature clusters; shared-space embeddings whose zero-shot scores are right on
    average but noisy (a weak, correct text prior)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    means = rng.normal(size=(classes, dim))
    features = means[labels] + spread * rng.normal(size=(len(labels), dim)) + 3.0  # all positive-ish, like lite
    emb = rng.normal(size=(len(labels), emb_dim))
    emb[np.arange(len(labels)), labels] += 1.0 / text_noise
    text = np.eye(classes, emb_dim, dtype=np.float32)
    zeroshot = ZeroShotHead("synthetic", [f"c{i}" for i in range(classes)], {"class_weights": text},
                            {"logit_scale": 10.0, "templates": ["{}"]})
    return ImageEncoding(l2_normalize(emb), features.astype(np.float32)), labels, zeroshot


def few_shot_data(encoding, labels, zeroshot, shots, val_shots=2):
    train, val, test = [], [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        train += list(members[:shots])
        val += list(members[shots:shots + val_shots])
        test += list(members[shots + val_shots:])

    def take(rows):
        return ImageEncoding(encoding.embeddings[rows], encoding.features[rows])

    data = FewShotData(None, zeroshot.classnames, take(train), labels[train], take(val), labels[val], zeroshot,
                       shots, 0, "")
    data.encoder = type("E", (), {"id": "synthetic"})()
    return data, take(test), labels[test]


# --------------------------------------------------------------------------- LP++


def test_lpp_step_sizes_and_alpha_init_by_hand():
    # F^T F = diag(2, 1): lambda_max 2, N = 3 -> 4 * 3 / 2
    assert lr_visual(np.array([[1.0, 0], [0, 1], [1, 0]])) == pytest.approx(6.0)
    # column sums of squares of the text logits: 5 and 1 -> N / (4 * 5)
    assert lr_alpha(np.array([[1.0, 0], [2, 1]])) == pytest.approx(0.1)
    # reference rule: 250 x mean of the class-mean text logits (0.2 + 0.4 + 0.6 + 0) / 4
    assert init_alpha(np.array([[0.2, 0.4], [0.6, 0.0]]), np.array([0, 1]), 2, "reference") == pytest.approx(75.0)
    # fitted rule: CE(a) = [2 log(1 + e^-a) + log(1 + e^a)] / 3 is least where sigmoid(a) = 2/3, a = ln 2
    fitted = init_alpha(np.array([[1.0, 0], [0, 1], [1, 0]]), np.array([0, 1, 1]), 2, "fit")
    assert fitted == pytest.approx(math.log(2), abs=1e-4)


def test_lpp_first_step_by_hand():
    # X = I, labels (0, 1), no text: W0 = class sums = I; p = softmax(1, 0) = (e, 1) / (e + 1);
    # grad W = (P - Y)^T X / 2 = +-0.1345; lr_w = 4 * 2 / 1 = 8, so W1 = I -+ 8 * 0.1345.
    step = 8 * (1 / (math.e + 1)) / 2
    fitted = fit_lpp(np.eye(2), np.zeros((2, 2)), np.array([0, 1]), 2, epochs=1)
    np.testing.assert_allclose(fitted["W"], [[1 + step, -step], [-step, 1 + step]], atol=1e-12)
    np.testing.assert_allclose(fitted["b"], [0, 0], atol=1e-12)
    assert fitted["lr_w"] == pytest.approx(8.0)


def test_lpp_alpha_steps_use_the_summed_gradient_like_the_reference():
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.random((12, 5))).astype(np.float64)
    t = rng.random((12, 3))
    y = np.repeat(np.arange(3), 4)
    fitted = fit_lpp(x, t, y, 3, epochs=20, alpha_every=10)
    # The same schedule with torch autograd: W, b by torch's SGD(momentum 0.9); alpha.grad never zeroed.
    xt, tt, yt = torch.tensor(x), torch.tensor(t), torch.tensor(y)
    w = torch.tensor(np.stack([x[y == c].sum(0) for c in range(3)]), requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    a = torch.full((3,), init_alpha(t, y, 3), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr_visual(x), momentum=0.9)
    for epoch in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(xt @ w.T + b + a * tt, yt).backward()
        opt.step()
        if (epoch + 1) % 10 == 0:
            with torch.no_grad():
                a -= lr_alpha(t) * a.grad
    np.testing.assert_allclose(fitted["W"], w.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fitted["alpha"], a.detach().numpy(), rtol=1e-9)


def test_lpp_head_fits_round_trips_and_beats_zero_shot(tmp_path):
    encoding, labels, zeroshot = clusters(seed=1)
    data, test, test_labels = few_shot_data(encoding, labels, zeroshot, shots=4)
    head = LPPHead.fit(data)
    assert (head.predict(test) == test_labels).mean() > max(0.8, (zeroshot.predict(test) == test_labels).mean() + 0.1)
    assert "val_accuracy" in head.config and head.config["alpha_init"] == "fit"
    loaded = load_head(head.save(tmp_path / "lpp"), model_id="synthetic")
    np.testing.assert_allclose(loaded.logits(test), head.logits(test), rtol=1e-6)


# --------------------------------------------------------------------------- CLAP


def test_clap_penalties_by_hand():
    # true-class zero-shot probabilities: 0.5, 0.75 (class 0), 0.5 (class 1); class 2 has no shots
    logits = np.array([[0.0, 0, -50], [math.log(3), 0, -50], [0, 0, -50]])
    np.testing.assert_allclose(class_penalties(logits, np.array([0, 0, 1]), 3), [0.625, 0.5, 1.0], atol=1e-9)


def test_clap_gradient_matches_autograd():
    rng = np.random.default_rng(2)
    x, w, anchor = l2_normalize(rng.normal(size=(6, 4))), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    y, lam = np.array([0, 1, 2, 0, 1, 2]), np.array([0.3, 0.7, 1.1])
    loss, grad = clap_loss_and_gradient(w, x.astype(np.float64), y, anchor, 7.0, lam)
    wt = torch.tensor(w, requires_grad=True)
    logits = 7.0 * torch.tensor(x, dtype=torch.float64) @ torch.nn.functional.normalize(wt, dim=1).T
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor(y)) + (
        torch.tensor(lam) * (wt - torch.tensor(anchor)).pow(2).sum(1)).mean()
    ref.backward()
    assert loss == pytest.approx(float(ref), rel=1e-10)
    np.testing.assert_allclose(grad, wt.grad.numpy(), rtol=1e-8, atol=1e-12)


def test_clap_penalty_holds_weights_at_the_prompts():
    encoding, labels, zeroshot = clusters(seed=3)
    text = zeroshot.weights["class_weights"].astype(np.float64)
    held = fit_clap(encoding.embeddings, labels, text, 10.0, np.full(3, 1e4), epochs=50, lr=1e-5)
    free = fit_clap(encoding.embeddings, labels, text, 10.0, np.zeros(3), epochs=50)
    assert np.abs(held - text).max() < 1e-3 < np.abs(free - text).max()
    # Separable embeddings but prompts that lean toward the next class: the shots should correct them.
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 40)
    emb = l2_normalize(2.0 * np.eye(3, 8)[labels] + 0.6 * rng.normal(size=(120, 8)))
    text = l2_normalize(np.eye(3, 8) + 0.9 * np.roll(np.eye(3, 8), 1, axis=0))
    leaning = ZeroShotHead("synthetic", ["a", "b", "c"], {"class_weights": text}, {"logit_scale": 10.0, "templates": ["{}"]})
    data, test, test_labels = few_shot_data(ImageEncoding(emb, emb), labels, leaning, shots=8)
    head = CLAPHead.fit(data)
    zs = (leaning.predict(test) == test_labels).mean()
    assert zs < 0.9 and (head.predict(test) == test_labels).mean() > zs + 0.05
    assert len(head.config["penalties"]) == 3


# --------------------------------------------------------------------------- TransCLIP


def test_knn_affinity_drops_self_and_keeps_nearest():
    x = l2_normalize(np.array([[1.0, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]]))
    affinity = knn_affinity(x, k=1).toarray()
    assert (np.diag(affinity) == 0).all()
    assert list(affinity.argmax(axis=1)) == [1, 0, 3, 2]
    assert affinity[0, 1] == pytest.approx(float(x[0] @ x[1]), rel=1e-6)


def test_gaussian_and_closed_form_updates_match_the_naive_sums():
    rng = np.random.default_rng(4)
    x, mu, var = rng.normal(size=(7, 5)), rng.normal(size=(3, 5)), rng.random(5) + 0.1
    naive = -0.5 * (((x[:, None, :] - mu[None]) ** 2) / var).sum(-1)
    np.testing.assert_allclose(gaussian_loglik(x, mu, var), naive, rtol=1e-10)
    z = rng.dirichlet(np.ones(3), size=7)
    sx, sy = rng.normal(size=(4, 5)), np.array([0, 1, 2, 1])
    onehot, gamma = np.eye(3)[sy], 0.01
    raw_mu = z.T @ x / 7 + 50 * gamma / 4 * onehot.T @ sx
    np.testing.assert_allclose(update_mu(x, z, sx, onehot, gamma), raw_mu / np.linalg.norm(raw_mu, axis=1)[:, None])
    spread = np.einsum("ik,ikd->d", z, (x[:, None, :] - mu[None]) ** 2) / 7
    spread += 50 * gamma / 4 * ((sx - mu[sy]) ** 2).sum(0)
    np.testing.assert_allclose(update_var(x, z, mu, sx, onehot, gamma), spread / (z.sum() / 7 + 50 * gamma), rtol=1e-10)


def test_z_update_by_hand():
    # no graph, flat likelihood: z = prior^lam renormalised; lam = 0.5 on (0.64, 0.36) -> (0.8, 0.6)/1.4
    prior = np.array([[0.64, 0.36]])
    empty = knn_affinity(np.ones((1, 2)) / np.sqrt(2))
    z = update_z(np.zeros((1, 2)), np.log(prior), empty, prior.copy(), lam=0.5, k=1)
    np.testing.assert_allclose(z, [[0.8 / 1.4, 0.6 / 1.4]])
    # a neighbour's one-hot label adds w / (2k) to the log-score of its class
    z_all = np.array([[0.5, 0.5], [1.0, 0.0]])
    graph = knn_affinity(l2_normalize(np.array([[1.0, 0.0], [1.0, 0.0]])), k=1)
    z = update_z(np.zeros((1, 2)), np.log([[0.5, 0.5]]), graph + graph.T, z_all, lam=1.0, k=1, steps=1)
    np.testing.assert_allclose(z[0], np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum())


def test_transclip_improves_a_weak_prior_zero_and_few_shot():
    # TransCLIP's temperature (50) presumes CLIP-sized features: 256-d here, as lite's 1280 / CLIP's 512
    encoding, labels, zeroshot = clusters(n_per_class=60, seed=5, text_noise=1.5, dim=256, spread=1.0)
    prior = zeroshot.predict_proba(encoding)
    x = l2_normalize(encoding.features)
    weak = (prior.argmax(1) == labels).mean()
    assert 0.45 < weak < 0.9
    assert (transclip(x, prior).argmax(1) == labels).mean() > weak + 0.1
    shots = np.concatenate([np.flatnonzero(labels == c)[:1] for c in range(3)])
    z = transclip(x, prior, x[shots], labels[shots], gamma=0.02)
    assert (z.argmax(1) == labels).mean() > 0.9
    np.testing.assert_allclose(z.sum(1), 1.0)


def test_transclip_head_wraps_any_head_and_round_trips(tmp_path):
    encoding, labels, zeroshot = clusters(n_per_class=60, seed=6, text_noise=1.5, dim=256, spread=1.0)
    data, test, test_labels = few_shot_data(encoding, labels, zeroshot, shots=2)
    base = LPPHead.fit(data)
    head = TransCLIPHead.wrap(base, data)
    assert head.config["variant"] == "lpp+trans" and "shot_features" in head.weights
    assert (head.predict(test) == test_labels).mean() >= (base.predict(test) == test_labels).mean()
    loaded = load_head(head.save(tmp_path / "t"), model_id="synthetic")
    assert isinstance(loaded, TransCLIPHead) and loaded.base.method == "lpp"
    np.testing.assert_allclose(loaded.predict_proba(test), head.predict_proba(test), rtol=1e-5, atol=1e-6)
    zero = TransCLIPHead.fit(data, base="zeroshot")
    assert zero.base.method == "zeroshot"


# --------------------------------------------------------------------------- adapt's collapse guard


def nuisance_set(n=600, seed=0):
    """Three classes whose features are dominated by three strong 'lighting' clusters unrelated to
    the class, with a weak class signal: EM's clusters follow the lighting, not the classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    lighting = rng.integers(0, 3, size=n)
    features = 6.0 * np.eye(3, 12)[lighting] + 0.3 * np.eye(3, 12, k=3)[labels] + rng.normal(scale=0.5, size=(n, 12))
    emb = rng.normal(size=(n, 8))
    emb[np.arange(n), labels] += 1.0
    zeroshot = ZeroShotHead("synthetic", ["a", "b", "c"], {"class_weights": np.eye(3, 8, dtype=np.float32)},
                            {"logit_scale": 10.0, "templates": ["{}"]})
    return ImageEncoding(l2_normalize(emb), features.astype(np.float32)), labels, zeroshot


@pytest.mark.parametrize("seed", [0, 1])
def test_adapt_guard_keeps_em_from_collapsing(seed):
    encoding, labels, zeroshot = nuisance_set(seed=seed)
    zs = (zeroshot.predict(encoding) == labels).mean()
    plain = fit_transductive(zeroshot, encoding, guard=False)
    assert (plain.predict(encoding) == labels).mean() < zs - 0.1  # the set does make plain EM collapse
    guarded = fit_transductive(zeroshot, encoding)
    assert (guarded.predict(encoding) == labels).mean() >= zs - 0.02
    assert guarded.config["guard"]["fell_back"] and guarded.config["guard"]["agreement"] < 0.2


def test_adapt_guard_leaves_healthy_em_alone():
    encoding, labels, zeroshot = clusters(n_per_class=100, seed=7, text_noise=1.5)
    head = fit_transductive(zeroshot, encoding)
    assert not head.config["guard"]["fell_back"] and head.config["guard"]["agreement"] >= 0.2
    assert (head.predict(encoding) == labels).mean() > 0.9


def test_agreement_is_cohens_kappa():
    assert agreement(np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1]), 2) == pytest.approx(1.0)
    # observed 0.5, expected 0.5 -> 0
    assert agreement(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), 2) == pytest.approx(0.0)


# --------------------------------------------------------------------------- commands and bench

CLASSES = ["bird", "fish", "tree"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    return write_tinted_folder(root, CLASSES)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command,extra", [("lpp", []), ("clap", ["--epochs", "50"]), ("probe", ["--transductive"]),
                                           ("lpp", ["--transductive"])])
def test_commands_end_to_end_with_tiny(tmp_path, folder, command, extra):
    out = tmp_path / "head.safetensors"
    result = invoke(command, folder, "--shots", 3, "--model", "tiny", "--device", "cpu", "--out", out, "--json", *extra)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["method"] == command and 0 <= report["accuracy"] <= 1 and report["num_test"] == 9
    head = load_head(out)
    assert head.method == ("transclip" if extra == ["--transductive"] else command)
    predicted = invoke("predict", out, folder / "fish", "--json", "--device", "cpu", "--transductive")
    assert predicted.exit_code == 0, predicted.output
    assert len(json.loads(predicted.output)["predictions"]) == 10


def test_classify_transductive(folder):
    plain = json.loads(invoke("classify", folder, "--model", "tiny", "--device", "cpu", "--json").stdout)
    trans = json.loads(invoke("classify", folder, "--model", "tiny", "--device", "cpu", "--json",
                              "--transductive").stdout)
    assert trans["n"] == plain["n"] == 30 and 0 <= trans["accuracy"] <= 1


def test_lpp_and_clap_with_lite(tmp_path, folder):
    for command in ("lpp", "clap"):
        result = invoke(command, folder, "--shots", 3, "--model", "lite", "--no-save", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["accuracy"] > 0.5  # tinted classes are easy for lite


def test_bench_trans_methods(tmp_path, folder, tiny):
    from clipxfer.bench.config import METHODS
    from clipxfer.heads import HEAD_TYPES

    for name, (head_method, options) in METHODS.items():  # every +trans base is a fittable head
        if name == "finetune+trans":  # TransCLIP on the fine-tuned features (clipxfer.autofit.combine)
            assert head_method == "finetune" and options == {"then": "trans"}
        elif name.endswith("+trans"):
            assert head_method == "transclip" and (options["base"] == "zeroshot" or options["base"] in HEAD_TYPES)
    assert METHODS["tipf+trans"][1] == {"base": "tip", "finetune": True}
    config = BenchConfig(datasets=(DatasetSpec(source=str(folder), max_test=12),),
                         methods=("zeroshot+trans", "lpp", "lpp+trans", "clap"), shots=(2,), seeds=(1,), model="tiny")
    cells = plan_cells(config)
    assert [(c[1], c[2]) for c in cells] == [("zeroshot+trans", 0), ("zeroshot+trans", 2), ("lpp", 2),
                                             ("lpp+trans", 2), ("clap", 2)]
    table = run_bench(config, tmp_path / "out", encoder=tiny)
    assert len(table) == 5 and table["accuracy"].between(0, 1).all()


def test_clap_penalties_at_the_fitted_temperature():
    # A prior that knows nothing (every image scored the same): at the model's scale 100 the one
    # class it always picks got lambda 1; at the fitted temperature every class gets 1/C.
    cosines = np.tile([0.6, 0.5, 0.4], (6, 1))
    labels = np.array([0, 0, 1, 1, 2, 2])
    from clipxfer.heads.clap import fit_penalties

    model, _ = fit_penalties(cosines, labels, 3, 100.0, "model")
    fitted, scale = fit_penalties(cosines, labels, 3, 100.0, "fit")
    assert model[0] == pytest.approx(1.0, abs=1e-3) and model[2] < 1e-3
    assert scale == pytest.approx(0.0, abs=1e-3)
    np.testing.assert_allclose(fitted, 1 / 3, atol=1e-3)


def test_clap_moves_into_the_probe_features():
    # lite-shaped data: the classes separate in the probe features, the shared space holds a weak
    # prior. CLAP must run in the joint space (a feature part in the head) and use it.
    encoding, labels, zeroshot = clusters(seed=4, text_noise=4.0)
    data, test, test_labels = few_shot_data(encoding, labels, zeroshot, shots=8)
    joint = CLAPHead.fit(data)
    shared = CLAPHead.fit(data, space="shared")
    assert joint.config["space"] == "joint" and "feature_weights" in joint.weights
    assert shared.config["space"] == "shared" and "feature_weights" not in shared.weights
    # Deterministic (full batch, float64): 0.77 against 0.32 here; the shared space alone stays near zero-shot.
    assert (joint.predict(test) == test_labels).mean() > (shared.predict(test) == test_labels).mean() + 0.2
    # CLIP-shaped data (features are the embeddings): the reference's shared space.
    same = ImageEncoding(encoding.embeddings, encoding.embeddings)
    data, _, _ = few_shot_data(same, labels, zeroshot, shots=8)
    assert CLAPHead.fit(data, epochs=5).config["space"] == "shared"


# --------------------------------------------------------------------------- choices by validation loss


def noisy_draw():
    """Overlapping clusters (spread 1.5): validation accuracy and loss disagree about the settings."""
    encoding, labels, zeroshot = clusters(seed=3, n_per_class=30, spread=1.5)
    return few_shot_data(encoding, labels, zeroshot, shots=8, val_shots=4)


def test_probe_chooses_l2_by_validation_loss():
    from clipxfer.heads.probe import L2_GRID, ProbeHead

    data, _, _ = noisy_draw()
    by_loss = ProbeHead.fit(data, prior="none")
    by_accuracy = ProbeHead.fit(data, prior="none", select="accuracy")
    assert by_loss.config["select"] == "loss" and by_accuracy.config["select"] == "accuracy"
    # The loss rule ends at or below every grid point's validation loss (the refinement only improves it).
    grid_losses = [ProbeHead.fit(data, prior="none", l2=value).config["val_loss"] for value in L2_GRID]
    assert by_loss.config["val_loss"] <= min(grid_losses) + 1e-6
    assert by_loss.config["val_loss"] <= by_accuracy.config["val_loss"] + 1e-9
    assert by_accuracy.config["val_accuracy"] >= by_loss.config["val_accuracy"]
    with pytest.raises(ClipxferError, match="select"):
        ProbeHead.fit(data, select="vibes")


def test_clap_joint_space_chooses_feature_weight_by_validation_loss():
    from clipxfer.heads.clap import FEATURE_WEIGHT, FEATURE_WEIGHTS, CLAPHead

    data, test, _ = noisy_draw()
    chosen = CLAPHead.fit(data, epochs=60)
    assert chosen.config["space"] == "joint" and chosen.config["feature_weight_chosen_on"] == "validation loss"
    fixed = {w: CLAPHead.fit(data, epochs=60, feature_weight=w) for w in FEATURE_WEIGHTS}
    best = min(FEATURE_WEIGHTS, key=lambda w: fixed[w].config["val_loss"])
    assert chosen.config["feature_weight"] == best
    np.testing.assert_allclose(chosen.logits(test), fixed[best].logits(test), atol=1e-6)
    # Without validation images nothing is chosen: the default weight.
    from dataclasses import replace

    bare = replace(data, val=take_rows(data.val, []), val_labels=data.val_labels[:0])
    assert CLAPHead.fit(bare, epochs=60).config["feature_weight"] == FEATURE_WEIGHT


def take_rows(encoding, rows):
    rows = np.asarray(rows, dtype=np.int64)
    return ImageEncoding(encoding.embeddings[rows], encoding.features[rows])
