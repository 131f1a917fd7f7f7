"""Meta-learning (Reptile / FOMAML adapter and CoOp context), its use as an initialisation, and
the episodes benchmark, on the tiny model and small synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from clipxfer.datasets.labelled import LabelledImages
from clipxfer.errors import ClipxferError
from clipxfer.heads import load_head
from clipxfer.heads.metalearned import MetaFeaturesHead, MetaHead, fit_with_init
from clipxfer.metalearn.episodes import check_episode_pool, sample_episode
from clipxfer.metalearn.train import meta_train

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (200, 40, 210)]
NAMES = ["red", "green", "blue", "yellow", "purple"]


def colour_images(per_class=12, seed=0, split="train") -> LabelledImages:
    rng = np.random.default_rng(seed)
    sources, labels = [], []
    for label, colour in enumerate(COLOURS):
        for _ in range(per_class):
            noise = rng.integers(-50, 50, size=(32, 32, 3))
            sources.append(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))
            labels.append(label)
    keys = [f"colours{seed}:{split}:{i}" for i in range(len(labels))]
    return LabelledImages(f"colours{seed}", NAMES, sources, np.array(labels), keys, np.array([split] * len(labels)))


SMALL = dict(ways=3, shots=1, queries=3, episodes=12, inner_steps=2, ctx_episodes=2, max_per_class=12)


def test_episodes_are_seeded_and_check_their_pool():
    labels = np.repeat(np.arange(4), 6)
    first = sample_episode(labels, np.arange(4), 3, 2, 3, np.random.default_rng(1))
    second = sample_episode(labels, np.arange(4), 3, 2, 3, np.random.default_rng(1))
    np.testing.assert_array_equal(first.support, second.support)
    np.testing.assert_array_equal(first.query, second.query)
    assert len(set(first.support) | set(first.query)) == 15
    assert (labels[first.support] == first.classes[first.support_labels]).all()
    with pytest.raises(ClipxferError, match="2 classes but --ways 3"):
        check_episode_pool(np.repeat([0, 1], 9), 3, 1, 3, "meta-train")


@pytest.mark.parametrize("algo", ["reptile", "fomaml"])
def test_meta_train_tiny_runs_round_trips_and_reproduces(tmp_path, tiny, algo):
    data = colour_images()
    head, summary = meta_train(data, encoder=tiny, classes="red,green,blue,yellow", algo=algo, seed=3,
                               out=tmp_path / "m.safetensors", **SMALL)  # fmt: skip
    assert summary["base_classes"] == ["red", "green", "blue", "yellow"] and summary["context"]
    loaded = load_head(summary["head"], model_id=tiny.id)
    assert isinstance(loaded, MetaHead) and loaded.config["algo"] == algo
    from clipxfer.datasets.features import encode_dataset

    encoding = encode_dataset(tiny, data)
    np.testing.assert_allclose(loaded.logits(encoding), head.logits(encoding), rtol=1e-6)
    again, _ = meta_train(data, encoder=tiny, classes="red,green,blue,yellow", algo=algo, seed=3, **SMALL)
    for name in head.weights:
        np.testing.assert_array_equal(head.weights[name], again.weights[name])


def test_too_few_base_classes_is_one_clear_line(tmp_path, tiny, monkeypatch):
    from clipxfer.cli import main

    monkeypatch.setattr("clipxfer.datasets.labelled.BUILTIN_DATASETS", {"colours": colour_images})
    outcome = CliRunner().invoke(main, ["meta-train", "colours", "--model", "tiny", "--classes", "red,green",
                                        "--ways", "3", "--out", str(tmp_path / "m.safetensors")])  # fmt: skip
    assert outcome.exit_code == 2
    assert outcome.output.strip() == "error: meta-train: 2 base classes but --ways 3: give at least 3 classes or lower --ways"
    assert not (tmp_path / "m.safetensors").exists()


def test_meta_head_initialises_probe_and_coop(tmp_path, tiny):
    from clipxfer.fewshot.task import prepare_task
    from clipxfer.heads.fitting import fit_head

    meta, _ = meta_train(colour_images(), encoder=tiny, classes="red,green,blue", seed=1, **SMALL)
    novel = colour_images(per_class=10, seed=5)
    task = prepare_task(tiny, novel, 2, 0)
    probe = fit_head("probe", task.data, init=meta)
    assert isinstance(probe, MetaFeaturesHead) and probe.config["inner_method"] == "probe"
    loaded = load_head(probe.save(tmp_path / "p.safetensors"), model_id=tiny.id)
    np.testing.assert_allclose(loaded.logits(task.test), probe.logits(task.test), rtol=1e-5, atol=1e-6)
    coop = fit_head("coop", task.data, init=meta, max_steps=3, eval_every=1)
    assert coop.config["n_ctx"] == meta.weights["ctx"].shape[0] and coop.config["ctx_init"] == "meta"
    load_head(coop.save(tmp_path / "c.safetensors"), model_id=tiny.id)
    with pytest.raises(ClipxferError, match="not a meta-trained one"):
        fit_with_init("probe", task.data, tmp_path / "c.safetensors")


def test_episodes_benchmark_tiny(tmp_path, tiny):
    from clipxfer.bench.episodes import run_episodes

    data = colour_images(per_class=10, seed=2, split="test")
    meta, _ = meta_train(colour_images(), encoder=tiny, classes="red,green,blue", seed=1, **SMALL)
    path = meta.save(tmp_path / "m.safetensors")
    summary, per_episode = run_episodes(data, "yellow,purple,red", encoder=tiny, meta=path, ways=3, shots=(1, 2),
                                        queries=3, episodes=20, out=tmp_path / "ep")  # fmt: skip
    assert set(summary["method"]) == {"zeroshot", "prototypes", "meta", "transductive"}
    assert (summary["episodes"] == 20).all() and summary["ci95"].ge(0).all()
    assert summary["accuracy"].between(0, 1).all()
    assert len(per_episode) == 4 * 2 * 20
    assert "| prototypes | 3 | 1 | 20 |" in (tmp_path / "ep" / "episodes.md").read_text()
    again, _ = run_episodes(data, "yellow,purple,red", encoder=tiny, meta=path, ways=3, shots=(1, 2), queries=3,
                            episodes=20)  # fmt: skip
    np.testing.assert_array_equal(summary["accuracy"].to_numpy(), again["accuracy"].to_numpy())


def test_episodes_without_a_model_use_the_meta_heads_encoder_and_precision(tmp_path, tiny, monkeypatch):
    """``bench-episodes --meta M`` loads the model M was made with, in the precision its id names."""
    import clipxfer.bench.episodes as episodes

    meta, _ = meta_train(colour_images(), encoder=tiny, classes="red,green,blue", seed=1, **SMALL)
    path = meta.save(tmp_path / "m.safetensors")
    asked = []

    def load_encoder(spec, device=None, precision=None):
        asked.append((spec, device, precision))
        return tiny

    monkeypatch.setattr("clipxfer.encoders.load_encoder", load_encoder)
    data = colour_images(per_class=10, seed=2, split="test")
    episodes.run_episodes(data, "yellow,purple,red", meta=path, ways=3, shots=(1,), queries=3, episodes=2,
                          device="cpu", precision="torch:auto")  # fmt: skip
    assert asked == [("tiny", "cpu", "torch:float")]
