"""Fine-tuning an encoder that runs in OpenVINO: the adapted encoder must run the adapted weights,
and the adapter must name (and load on) the float base whatever runtime trained it."""

from __future__ import annotations

import numpy as np
import pytest

from clipxfer.encoders.adapter import read_adapter
from clipxfer.encoders.registry import load_encoder
from clipxfer.finetune.run import run_finetune

from .conftest import write_tinted_folder

pytest.importorskip("openvino")
pytest.importorskip("nncf")


def test_an_openvino_base_is_fine_tuned_in_torch_and_the_adapter_loads_on_any_runtime(tmp_path):
    folder = write_tinted_folder(tmp_path / "labelled", ["red", "green", "blue"])
    base = load_encoder("tiny", "cpu", "openvino:int8")
    assert base.id.endswith("@int8")
    result = run_finetune(folder, shots=3, seed=1, encoder=base, out=tmp_path / "adapted.safetensors",
                          strategy="full", epochs=2, lr=1e-2, wise=1.0, keep="last")
    head = read_adapter(result["adapter"])
    float_id = load_encoder("tiny", "cpu", "torch:fp32").id
    assert head.config["base_model_id"] == float_id and head.model_id.startswith(float_id + "+ft-")

    pixels = np.random.default_rng(0).integers(0, 256, (4, base.input_size, base.input_size, 3), np.uint8)
    torch_adapted = load_encoder(f"tiny+{result['adapter']}", "cpu", "torch:fp32")
    assert torch_adapted.id == head.model_id
    # The adapted weights moved, and every runtime of the adapted encoder runs them.
    assert not np.allclose(torch_adapted.encode_pixels(pixels).embeddings,
                           load_encoder("tiny", "cpu", "torch:fp32").encode_pixels(pixels).embeddings, atol=1e-3)
    for precision, suffix in (("openvino:fp32", ""), ("openvino:int8", "@int8")):
        adapted = load_encoder(f"tiny+{result['adapter']}", "cpu", precision)
        assert adapted.id == head.model_id + suffix
        cosine = (adapted.encode_pixels(pixels).embeddings * torch_adapted.encode_pixels(pixels).embeddings).sum(1)
        assert cosine.min() >= 0.99


def test_the_adapted_copy_of_an_openvino_encoder_runs_its_new_weights(tmp_path):
    from clipxfer.datasets.labelled import load_dataset
    from clipxfer.fewshot.task import prepare_task
    from clipxfer.finetune.settings import FinetuneSettings
    from clipxfer.finetune.train import finetune_encoder

    dataset = load_dataset(write_tinted_folder(tmp_path / "labelled", ["red", "green", "blue"]))
    base = load_encoder("tiny", "cpu", "openvino:fp32")
    task = prepare_task(base, dataset, 3, 1)
    images = [dataset.sources[i] for i in task.split.train], [dataset.sources[i] for i in task.split.val]
    result = finetune_encoder(task.data, *images, FinetuneSettings(strategy="full", epochs=2, lr=1e-2, wise=1.0, keep="last"))
    assert base.image_runtime is not None, "the base encoder keeps its runtime"
    assert result.encoder.image_runtime is None and result.encoder.runtime == "torch"
    reference = load_encoder("tiny", "cpu", "torch:fp32")
    from clipxfer.encoders.adapter import apply_tensors

    apply_tensors(reference, result.tensors)
    pixels = np.random.default_rng(1).integers(0, 256, (4, base.input_size, base.input_size, 3), np.uint8)
    np.testing.assert_allclose(result.encoder.encode_pixels(pixels).embeddings,
                               reference.encode_pixels(pixels).embeddings, atol=1e-5)
