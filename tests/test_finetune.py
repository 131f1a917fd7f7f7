"""Fine-tuning the encoder (clipxfer/finetune/): what moves, WiSE, LoRA merging, the adapter file
and its encoder id, --model BASE+ADAPTER everywhere, seeds, Ctrl-C, bad input, the bench method."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clipxfer.cli import main
from clipxfer.encoders import load_encoder
from clipxfer.encoders.adapter import apply_tensors, load_adapted, trainable_root
from clipxfer.encoders.ids import ENCODER_PREFIX, base_of
from clipxfer.errors import ClipxferError
from clipxfer.fewshot.task import prepare_task
from clipxfer.finetune.lora import _inject_lora, lora_factors, lora_targets
from clipxfer.finetune.model import working_copy
from clipxfer.finetune.run import run_finetune
from clipxfer.finetune.settings import FinetuneSettings
from clipxfer.finetune.train import finetune_encoder

from .conftest import random_images, write_tinted_folder

CLASSES = ["bird", "fish", "tree"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 10 images, tinted per class so even tiny can separate them."""
    root = tmp_path_factory.mktemp("labelled")
    return write_tinted_folder(root, CLASSES)


@pytest.fixture(scope="module")
def task(folder, tiny):
    from clipxfer.datasets.labelled import load_dataset

    dataset = load_dataset(folder)
    return dataset, prepare_task(tiny, dataset, 3, 1)


def _images(dataset, task):
    return [dataset.sources[i] for i in task.split.train], [dataset.sources[i] for i in task.split.val]


def _finetune(task_pair, **settings):
    dataset, prepared = task_pair
    settings.setdefault("epochs", 3)
    return finetune_encoder(prepared.data, *_images(dataset, prepared), FinetuneSettings(**settings))


def _tower(encoder):
    return {n: p.detach().clone() for n, p in trainable_root(encoder)[1].named_parameters()}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_partial_moves_only_the_last_block_and_the_text_side_never(task, tiny):
    result = _finetune(task, strategy="partial", blocks=1, wise=1.0, l2sp=0.0, lr=1e-2, keep="last")
    stored = {n[len(ENCODER_PREFIX) + len("model."):] for n in result.tensors if n.startswith(ENCODER_PREFIX)}
    assert stored and all(n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post", "visual.proj")) for n in stored)
    before, after = _tower(tiny), _tower(result.encoder)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and moved <= stored
    assert all(torch.equal(before[n], after[n]) for n in before if n not in stored)  # frozen: bit-identical
    assert not any(n.startswith(("transformer.", "token_embedding")) for n in stored)


def test_loss_falls_on_a_separable_task(task):
    result = _finetune(task, strategy="full", epochs=6, augment=False, label_smoothing=0.0, l2sp=0.0, lr=1e-3,
                       patience=99, wise=1.0)
    losses = [h["train_loss"] for h in result.history[1:]]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]


def test_lora_merged_equals_unmerged(tiny):
    work, attribute, root = working_copy(tiny)
    settings = FinetuneSettings(strategy="lora", blocks=2)
    targets = lora_targets(root, attribute, settings)
    attention = [t for t in targets if isinstance(root.get_submodule(t), torch.nn.MultiheadAttention)]
    assert len(attention) == 2 and not any(t.endswith("out_proj") for t in targets)
    layers = _inject_lora(root, targets, settings)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_(0, 0.2)  # B starts at zero: make the adapter do something
    pixels = np.stack([np.asarray(Image.fromarray(a).resize((32, 32))) for a in random_images(4, seed=5)])
    unmerged = work.encode_pixels(pixels).embeddings
    merged_encoder = copy.copy(tiny)
    merged_encoder.model = copy.deepcopy(tiny.model)
    apply_tensors(merged_encoder, lora_factors(layers, attribute))
    merged = merged_encoder.encode_pixels(pixels).embeddings
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    # Attention's packed query/key/value projection moved; its output projection stays (CLIP-LoRA's q, k, v).
    for name in attention:
        before, after = tiny.model.get_submodule(name), merged_encoder.model.get_submodule(name)
        assert not torch.equal(before.in_proj_weight, after.in_proj_weight)
        assert torch.equal(before.out_proj.weight, after.out_proj.weight)
    assert not np.allclose(merged, tiny.encode_pixels(pixels).embeddings, atol=1e-3)


def test_wise_alpha_0_is_the_pretrained_encoder_and_alpha_interpolates(task, tiny):
    pixels = np.stack([np.asarray(Image.fromarray(a).resize((32, 32))) for a in random_images(4, seed=9)])
    zero = _finetune(task, wise=0.0, lr=1e-2, keep="last")
    np.testing.assert_array_equal(zero.encoder.encode_pixels(pixels).embeddings, tiny.encode_pixels(pixels).embeddings)
    one, half = _finetune(task, wise=1.0, lr=1e-2, keep="last"), _finetune(task, wise=0.5, lr=1e-2, keep="last")
    assert one.best_epoch > 0, "training must have moved the weights for this test to mean anything"
    for name, value in zero.tensors.items():
        if name.startswith(ENCODER_PREFIX):
            np.testing.assert_allclose(half.tensors[name], 0.5 * (value + one.tensors[name]), atol=1e-6)
    fine = _tower(one.encoder)
    work, _, _ = working_copy(tiny)
    apply_tensors(work, one.tensors)
    assert all(torch.equal(fine[n], p) for n, p in work.model.named_parameters())


def test_same_seed_same_adapter_other_seed_differs(task, folder, tiny):
    a, b = _finetune(task, wise=1.0, keep="last"), _finetune(task, wise=1.0, keep="last")
    assert a.encoder.id == b.encoder.id
    assert all(np.array_equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    from clipxfer.datasets.labelled import load_dataset

    dataset = load_dataset(folder)
    other = prepare_task(tiny, dataset, 3, 2)
    c = _finetune((dataset, other), wise=1.0, keep="last")
    assert c.encoder.id != a.encoder.id


def test_adapter_defines_an_encoder_used_everywhere(tmp_path, folder, tiny):
    adapter = tmp_path / "adapted.safetensors"
    report = json.loads(invoke("finetune", folder, "--shots", 3, "--seed", 1, "--model", "tiny", "--device", "cpu",
                               "--precision", "fp32", "--epochs", 2, "--wise", "1", "--lr", "1e-2",
                               "--out", adapter, "--json").output)
    assert report["adapter"] == str(adapter) and (tmp_path / "adapted.manifest.csv").is_file()
    assert report["model"] != tiny.id and base_of(report["model"]) == tiny.id
    spec = f"tiny+{adapter}"
    adapted = load_encoder(spec, "cpu", "fp32")
    assert adapted.id == report["model"]
    # the adapted encoder gives the same accuracy through the registry as in the run
    from clipxfer.fewshot.run import run_transfer

    probe = run_transfer("probe", folder, 3, 1, model=spec, device="cpu", precision="fp32", out=tmp_path / "p.safetensors")
    assert probe["model"] == adapted.id
    # an index made with it records its id and refuses the plain encoder
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(random_images(4, seed=3)):
        Image.fromarray(image).save(photos / f"{i}.png")
    result = invoke("index", photos, "--index", tmp_path / "idx", "--model", spec, "--device", "cpu", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    from clipxfer.index import Index

    with Index.open(tmp_path / "idx") as index:
        assert index.model_id == adapted.id
    result = CliRunner().invoke(main, ["index", str(photos), "--index", str(tmp_path / "idx"), "--model", "tiny"])
    assert result.exit_code == 2 and "error:" in result.output
    # the adapter is its own head: predict finds the model from it
    result = invoke("predict", adapter, photos, "--device", "cpu", "--precision", "fp32", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["predictions"]) == 4


def test_ctrl_c_keeps_the_best_epoch_so_far(tmp_path, folder, tiny, monkeypatch):
    import clipxfer.finetune.train as train

    calls = {"n": 0}
    real = train.augment_batch

    def interrupt_in_epoch_3(*args):
        calls["n"] += 1  # 9 training images, batch 32: one call per epoch
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "augment_batch", interrupt_in_epoch_3)
    out = tmp_path / "a.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run_finetune(folder, 3, 1, encoder=tiny, out=out, epochs=10, lr=1e-2, wise=1.0)
    from clipxfer.heads import load_head

    head = load_head(out)
    assert head.config["interrupted"] and head.config["epochs_run"] == 2
    assert len(head.config["history"]) == 3 and head.config["best_epoch"] <= 2


def test_bad_input_is_one_clear_line(tmp_path, folder, tiny):
    out = tmp_path / "a.safetensors"
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    for i, image in enumerate(random_images(3)):
        Image.fromarray(image).save(one / "only" / f"{i}.png")
    for args, message in [
        ([folder, "--shots", 0], "at least 1"),
        ([one, "--shots", 1], "at least two"),
        ([folder, "--shots", 2, "--epochs", -1], "--epochs -1"),
    ]:
        result = CliRunner().invoke(main, ["finetune", *map(str, args), "--model", "tiny", "--out", str(out)])
        assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output
        assert not out.exists()
    with pytest.raises(ClipxferError, match="unknown option.*nonsense"):
        run_finetune(folder, 2, 1, encoder=tiny, out=out, nonsense=1)
    assert not out.exists()
    run_finetune(folder, 2, 1, encoder=tiny, out=out, epochs=1)
    other = copy.copy(tiny)
    other.id = "open_clip:another-model"
    with pytest.raises(ClipxferError, match="made for model 'open_clip:clipxfer-tiny"):
        load_adapted(other, out)
    result = CliRunner().invoke(main, ["probe", str(folder), "--shots", "1", "--model", f"tiny+{tmp_path}/missing.safetensors"])
    assert result.exit_code == 2 and "not found" in result.output and result.output.count("\n") == 1


def test_bench_runs_finetune_cells_on_the_adapted_encoder(tmp_path, folder, tiny):
    from clipxfer.bench import BenchConfig, DatasetSpec, run_bench

    config = BenchConfig(
        datasets=(DatasetSpec(source=str(folder), max_test=9),), methods=("zeroshot", "probe", "finetune"),
        shots=(2,), seeds=(1,), model="tiny", method_options={"finetune": {"strategy": "partial", "epochs": 2, "lr": 1e-2}},
    )
    table = run_bench(config, tmp_path / "bench", encoder=tiny)
    row = table[table["method"] == "finetune"].iloc[0]
    assert 0.0 <= row["accuracy"] <= 1.0 and row["n_test"] == 9 and row["model_id"] == tiny.id


@pytest.mark.slow
def test_lite_partial_finetune_and_adapter_round_trip(tmp_path, lite):
    from clipxfer.datasets.labelled import fashion_mnist

    dataset = fashion_mnist().split("train").subset(range(300))
    out = tmp_path / "lite.safetensors"
    # keep="last": the adapter holds the trained epoch whether or not validation happened to improve.
    result = run_finetune(dataset, 2, 1, encoder=lite, out=out, max_test=20, strategy="partial", blocks=1, epochs=1,
                          wise=1.0, lr=1e-3, keep="last")
    from clipxfer.heads import load_head

    stored = [n for n in load_head(out).weights if n.startswith(ENCODER_PREFIX)]
    assert stored and all(n.startswith(("encoder/image_model.blocks.6.", "encoder/image_model.conv_head",
                                         "encoder/image_model.bn2")) for n in stored)
    adapted = load_encoder(f"lite+{out}", "cpu", None)
    assert adapted.id == result["model"] != lite.id
    pixels = np.stack([np.asarray(Image.fromarray(a).resize((224, 224))) for a in random_images(2, seed=4)])
    assert not np.allclose(adapted.encode_pixels(pixels).features, lite.encode_pixels(pixels).features)


# --------------------------------------------------------------------------- the top recipe (default)


def test_settings_fill_each_methods_recipe():
    from clipxfer.finetune.settings import GENERIC, RECIPES

    top = FinetuneSettings().check()
    assert top.strategy == "top" and all(getattr(top, k) == v for k, v in RECIPES["top"].items())
    lpft = FinetuneSettings(strategy="lp-ft").check()
    assert all(getattr(lpft, k) == v for k, v in GENERIC.items())
    assert FinetuneSettings(strategy="top", lr=5e-4, epochs=3).check().lr == 5e-4  # given values win
    with pytest.raises(ClipxferError, match="--wise auto"):
        FinetuneSettings(strategy="top", wise="auto").check()  # nothing is held out to choose by
    with pytest.raises(ClipxferError, match="fit_on"):
        FinetuneSettings(fit_on="test").check()


def test_top_trains_on_all_labelled_images_and_refits_the_head(task, tiny):
    from clipxfer.heads.linear import probe_inputs
    from clipxfer.heads.probe import fit_logistic

    dataset, prepared = task
    result = _finetune(task, lr=1e-2)
    assert result.settings.fit_on == "all" and result.alpha == 1.0 and result.best_epoch == result.epochs_run == 3
    stored = {n[len(ENCODER_PREFIX) + len("model."):] for n in result.tensors if n.startswith(ENCODER_PREFIX)}
    assert stored and all(n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post", "visual.proj")) for n in stored)
    before, after = _tower(tiny), _tower(result.encoder)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in stored)
    # the head is the L-BFGS probe on the adapted features of the training AND validation images
    assert {n for n in result.tensors if not n.startswith(ENCODER_PREFIX)} == {"feature_weights", "bias"}
    train, val = _images(dataset, prepared)
    from clipxfer.finetune.pixels import decode_pixels

    pixels = decode_pixels(train + val, tiny.input_size)
    features = probe_inputs(result.encoder.encode_pixels(pixels)).astype(np.float64)
    labels = np.concatenate([prepared.data.train_labels, prepared.data.val_labels])
    expected = fit_logistic(features, labels, len(CLASSES), result.settings.refit_l2)
    np.testing.assert_allclose(result.tensors["feature_weights"], expected["W"].numpy(), atol=1e-4)
    np.testing.assert_allclose(result.tensors["bias"], expected["b"].numpy(), atol=1e-4)
    assert (features @ expected["W"].numpy().T + expected["b"].numpy()).argmax(1).tolist() == labels.tolist()


def test_top_adapter_reproduces_the_adapted_encoder_through_the_registry(tmp_path, folder, tiny):
    out = tmp_path / "top.safetensors"
    result = run_finetune(folder, 3, 1, encoder=tiny, out=out, epochs=2, lr=1e-2)
    assert result["variant"] == "finetune-top" and result["wise_alpha"] == 1.0 and result["num_val"] > 0
    from clipxfer.heads import load_head

    head = load_head(out)
    assert head.config["fit_on"] == "all" and head.config["head"] == "refit" and head.config["blocks"] == 1
    adapted = load_encoder(f"tiny+{out}", "cpu", "fp32")
    assert adapted.id == result["model"] != tiny.id
    pixels = np.stack([np.asarray(Image.fromarray(a).resize((32, 32))) for a in random_images(4, seed=11)])
    again = finetune_encoder(*_top_inputs(folder, tiny), FinetuneSettings(epochs=2, lr=1e-2))
    assert again.encoder.id == adapted.id  # same draw, same seed: the same adapter
    np.testing.assert_array_equal(adapted.encode_pixels(pixels).features, again.encoder.encode_pixels(pixels).features)
    np.testing.assert_array_equal(head.logits(adapted.encode_pixels(pixels)),
                                  head.logits(again.encoder.encode_pixels(pixels)))


def _top_inputs(folder, tiny):
    from clipxfer.datasets.labelled import load_dataset

    dataset = load_dataset(folder)
    prepared = prepare_task(tiny, dataset, 3, 1)
    return (prepared.data, *_images(dataset, prepared))


def test_the_adapted_copy_never_runs_the_bases_compiled_runtime(task, tiny):
    """A compiled runtime (OpenVINO) attached to the base holds the base's weights: the adapted
    encoder must encode with its own tower."""
    dataset, prepared = task
    base = copy.copy(tiny)

    def stale_runtime(batch):
        raise AssertionError("the adapted encoder ran the base encoder's compiled runtime")

    base.image_runtime = stale_runtime
    data = dataclasses.replace(prepared.data, encoder=base)
    result = finetune_encoder(data, *_images(dataset, prepared), FinetuneSettings(epochs=1, lr=1e-2))
    assert result.encoder.image_runtime is None and result.encoder.runtime == "torch"
    pixels = np.stack([np.asarray(Image.fromarray(a).resize((32, 32))) for a in random_images(2, seed=12)])
    result.encoder.encode_pixels(pixels)
    assert base.image_runtime is stale_runtime  # the base is untouched


@pytest.mark.slow
def test_lite_top_finetune_adapter_reproduces_the_adapted_encoder(tmp_path, lite):
    from clipxfer.datasets.labelled import fashion_mnist
    from clipxfer.encoders import cached_encoder
    from clipxfer.heads import load_head

    dataset = fashion_mnist().split("train").subset(range(300))
    out = tmp_path / "lite-top.safetensors"
    lite32 = cached_encoder("lite", "cpu", "fp32")  # fp32 throughout, so "exactly" means bit-identical
    result = run_finetune(dataset, 2, 1, encoder=lite32, out=out, max_test=20, epochs=1)
    head = load_head(out)
    assert head.config["variant"] == "finetune-top" and head.config["fit_on"] == "all"
    stored = [n for n in head.weights if n.startswith(ENCODER_PREFIX)]
    assert stored and all(n.startswith(("encoder/image_model.blocks.6.", "encoder/image_model.conv_head",
                                         "encoder/image_model.bn2")) for n in stored)
    assert set(head.weights) - set(stored) == {"feature_weights", "bias"}
    adapted = load_encoder(f"lite+{out}", "cpu", "fp32")
    assert adapted.id == result["model"] != lite32.id
    pixels = np.stack([np.asarray(Image.fromarray(a).resize((224, 224))) for a in random_images(2, seed=4)])
    # the adapter file gives exactly the tower the fine-tune left (in torch fp32, as it was trained)
    work, _, _ = working_copy(lite32)
    apply_tensors(work, head.weights)
    np.testing.assert_array_equal(adapted.encode_pixels(pixels).features, work.encode_pixels(pixels).features)
    assert not np.allclose(adapted.encode_pixels(pixels).features, lite32.encode_pixels(pixels).features)
