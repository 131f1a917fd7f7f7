"""The OpenVINO runtime: agreement with torch, the on-disk model cache, auto choice, ids."""

from __future__ import annotations

import numpy as np
import pytest

from clipxfer.device import Compute, auto_cpu_compute, choose_compute, join_compute, split_compute
from clipxfer.errors import ClipxferError

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from clipxfer.encoders import openvino_runtime  # noqa: E402
from clipxfer.encoders.ids import spec_for_id
from clipxfer.encoders.registry import load_encoder, precision_for_id

THIS_MACHINE_LIKE = frozenset({"avx512f", "avx512_bf16", "avx512_vnni"})


def _pixels(encoder, count=12):
    """Real photos (scikit-image's samples) at the encoder's input size."""
    from clipxfer.images import load_model_input
    from clipxfer.sample_photos import SAMPLE_PHOTOS, sample_photo

    return np.stack([load_model_input(sample_photo(name), encoder.input_size) for name in list(SAMPLE_PHOTOS)[:count]])


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).mean())


@pytest.fixture(scope="module")
def tiny_torch():
    return load_encoder("tiny", "cpu", "torch:fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_openvino_matches_torch_on_tiny(tiny_torch, precision):
    encoder = load_encoder("tiny", "cpu", f"openvino:{precision}")
    assert (encoder.runtime, encoder.precision) == ("openvino", precision)
    pixels = _pixels(encoder)
    ours = encoder.encode_pixels(pixels).embeddings
    reference = tiny_torch.encode_pixels(pixels).embeddings
    assert ours.shape == reference.shape and ours.dtype == np.float32
    assert _min_cosine(ours, reference) >= 0.99
    # A batch that does not divide across the infer requests keeps its row order.
    odd = encoder.encode_pixels(pixels[:5]).embeddings
    np.testing.assert_allclose(odd, ours[:5], atol=1e-4)


def test_concurrent_callers_get_their_own_results():
    """The server encodes uploads from a thread pool: concurrent calls must not mix their batches."""
    from concurrent.futures import ThreadPoolExecutor

    encoder = load_encoder("tiny", "cpu", "openvino:fp32")
    pixels = _pixels(encoder)
    singles = [pixels[i : i + 1] for i in range(len(pixels))]
    expected = [encoder.encode_pixels(one).embeddings for one in singles]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            got = list(pool.map(lambda one: encoder.encode_pixels(one).embeddings, singles))
            for mine, reference in zip(got, expected):
                np.testing.assert_allclose(mine, reference, atol=1e-5)


@pytest.mark.slow
def test_openvino_matches_torch_on_lite(fashion_test_1000):
    from clipxfer.device import cpu_flags
    from clipxfer.images import load_model_input

    reference = load_encoder("lite", "cpu", "torch:fp32")
    # lite passed the int8 gate, so auto picks what the CPU's flags say, int8 included.
    auto = load_encoder("lite", "cpu", "openvino:auto")
    assert auto.runtime == "openvino" and auto.precision == auto_cpu_compute(cpu_flags(), True).precision
    garments = np.stack([load_model_input(item, 224) for item in fashion_test_1000.sources[:200]])
    expected = reference.encode_pixels(garments)
    for precision in ("fp32", "int8"):
        encoder = load_encoder("lite", "cpu", f"openvino:{precision}")
        ours = encoder.encode_pixels(garments)
        assert ours.features.shape == (len(garments), 1280)
        if precision == "fp32":
            assert encoder.id == reference.id
            assert _min_cosine(ours.embeddings, expected.embeddings) >= 0.999
        else:  # the gate of benchmarks/int8_quality.py: cosine >= 0.99 on average over real images
            assert encoder.id == reference.id + "@int8"
            assert _mean_cosine(ours.embeddings, expected.embeddings) >= 0.99
            assert _mean_cosine(ours.features, expected.features) >= 0.99


def test_cache_reused_and_damaged_cache_rebuilt(tmp_path, monkeypatch, tiny_torch, capsys):
    monkeypatch.setenv("CLIPXFER_CACHE", str(tmp_path))
    pixels = _pixels(tiny_torch, 4)
    first = load_encoder("tiny", "cpu", "openvino:fp32")
    expected = first.encode_pixels(pixels).embeddings
    folder = first.image_runtime.cache_folder
    assert (folder / "model.xml").is_file() and (folder / "meta.json").is_file()
    assert "building the OpenVINO" in capsys.readouterr().err

    conversions = []
    real_convert = openvino_runtime._convert
    monkeypatch.setattr(openvino_runtime, "_convert", lambda *args: conversions.append(1) or real_convert(*args))
    second = load_encoder("tiny", "cpu", "openvino:bf16")  # the float precisions share the fp32 graph
    second.encode_pixels(pixels)
    third = load_encoder("tiny", "cpu", "openvino:fp32")
    np.testing.assert_allclose(third.encode_pixels(pixels).embeddings, expected, atol=1e-5)
    assert conversions == []

    weights = folder / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # silent corruption inside the weights
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    rebuilt = load_encoder("tiny", "cpu", "openvino:fp32")
    np.testing.assert_allclose(rebuilt.encode_pixels(pixels).embeddings, expected, atol=1e-5)
    assert conversions == [1]
    assert "stale or damaged" in capsys.readouterr().err

    (folder / "model.xml").write_text("<not a model")
    assert load_encoder("tiny", "cpu", "openvino:fp32").encode_pixels(pixels).embeddings.shape == expected.shape
    assert conversions == [1, 1]


def test_ids_differ_between_fp32_and_int8_and_index_refuses_the_other(tmp_path, sample_photos_dir):
    from clipxfer.index import Index

    fp32 = load_encoder("tiny", "cpu", "openvino:fp32")
    int8 = load_encoder("tiny", "cpu", "int8")
    torch_fp32 = load_encoder("tiny", "cpu", "torch:fp32")
    assert int8.id != fp32.id and fp32.id == torch_fp32.id  # float runtimes agree to cosine 0.9999
    assert int8.id.endswith("@int8") and spec_for_id(int8.id) == "tiny"
    assert precision_for_id(int8.id) == "int8" and precision_for_id(fp32.id) == "float"
    assert precision_for_id(int8.id, "fp32") == "fp32"

    report = Index.update(sample_photos_dir, model=int8, path=tmp_path / "index", workers=0)
    assert report.added == len(list(sample_photos_dir.iterdir()))
    with pytest.raises(ClipxferError, match="model"):
        Index.update(sample_photos_dir, model=torch_fp32, path=tmp_path / "index", workers=0)
    # Reopened without a precision, the index loads the int8 encoder it was built with.
    index = Index.open(tmp_path / "index")
    assert index.encoder(device="cpu").id == int8.id


def test_int8_calibrates_on_the_folder_being_indexed(tmp_path, monkeypatch, sample_photos_dir):
    from clipxfer.index import Index

    monkeypatch.setenv("CLIPXFER_CACHE", str(tmp_path / "cache"))
    encoder = load_encoder("tiny", "cpu", "openvino:int8")
    Index.update(sample_photos_dir, model=encoder, path=tmp_path / "index", workers=0)
    calibration = encoder.image_runtime.metadata["calibration"]
    assert calibration["source"] == "folder" and calibration["images"] == len(list(sample_photos_dir.iterdir()))
    assert encoder.image_runtime.metadata["nncf"]["model_type"] == "TRANSFORMER"

    unhinted = load_encoder("tiny", "cpu", "openvino:int8")  # same cache entry: not rebuilt
    unhinted.encode_pixels(_pixels(unhinted, 2))
    assert unhinted.image_runtime.metadata["calibration"]["source"] == "folder"


def test_shipped_calibration_set_without_enough_user_images():
    images, record = openvino_runtime.calibration_set([], 64)
    assert record["source"].startswith("clipxfer sample photos") and len(images) == record["images"] >= 64
    assert all(image.shape == (64, 64, 3) and image.dtype == np.uint8 for image in images)


@pytest.mark.parametrize(
    "flags",
    [frozenset(), frozenset({"avx2"}), frozenset({"avx512f", "avx512_vnni"}), frozenset({"avx2", "avx_vnni"})],
)
@pytest.mark.parametrize("have_openvino", [True, False])
def test_auto_never_picks_bf16_without_native_bf16(flags, have_openvino):
    for allow_int8 in (True, False):
        assert auto_cpu_compute(flags, have_openvino, allow_int8).precision != "bf16"


@pytest.mark.parametrize("bf16_native", [True, False])
def test_int8_runs_its_float_layers_in_bf16_only_where_bf16_is_native(bf16_native):
    assert openvino_runtime.inference_precision("int8", bf16_native) == ("bf16" if bf16_native else "f32")
    assert openvino_runtime.inference_precision("fp32", bf16_native) == "f32"
    assert openvino_runtime.inference_precision("bf16", bf16_native) == "bf16"


def test_auto_rules():
    assert auto_cpu_compute(THIS_MACHINE_LIKE, True) == Compute("openvino", "int8")
    assert auto_cpu_compute(frozenset({"avx512f", "avx512_vnni"}), True) == Compute("openvino", "int8")
    assert auto_cpu_compute(frozenset({"amx_tile", "amx_int8", "amx_bf16"}), True) == Compute("openvino", "int8")
    assert auto_cpu_compute(frozenset({"avx2"}), True) == Compute("openvino", "fp32")  # no int8 dot products
    assert auto_cpu_compute(THIS_MACHINE_LIKE, True, allow_int8=False).precision != "int8"
    assert auto_cpu_compute(THIS_MACHINE_LIKE, False) == Compute("torch", "bf16")
    assert auto_cpu_compute(frozenset({"avx512_vnni"}), False) == Compute("torch", "fp32")


def test_compute_requests(monkeypatch):
    import torch

    cpu = torch.device("cpu")
    assert split_compute(None) == ("auto", "auto") and split_compute("openvino:int8") == ("openvino", "int8")
    assert join_compute("auto", "fp32") == "fp32" and join_compute("torch", "auto") == "torch:auto"
    assert choose_compute(cpu, "torch:fp32") == Compute("torch", "fp32")
    assert choose_compute(cpu, "fp32") == Compute("torch", "fp32")  # an explicit float precision stays torch
    assert choose_compute(cpu, "int8") == Compute("openvino", "int8")
    monkeypatch.setenv("CLIPXFER_RUNTIME", "torch")
    assert choose_compute(cpu, "auto").runtime == "torch"
    for bad in ("torch:int8", "tensorrt:fp32", "int4"):
        with pytest.raises(ClipxferError):
            choose_compute(cpu, bad)


def test_cli_rejects_int8_in_torch(tmp_path):
    from click.testing import CliRunner

    from clipxfer.cli import main

    result = CliRunner().invoke(
        main, ["index", str(tmp_path), "--index", str(tmp_path / "i"), "--model", "tiny", "--runtime", "torch",
               "--precision", "int8"]
    )
    assert result.exit_code == 2 and "int8 runs in OpenVINO only" in result.output


def test_bench_takes_runtime_and_precision(tmp_path):
    from click.testing import CliRunner

    from clipxfer.cli import main

    result = CliRunner().invoke(
        main, ["bench", "--data", "digits", "--model", "tiny", "--runtime", "torch", "--precision", "int8",
               "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "int8 runs in OpenVINO only" in result.output


@pytest.mark.parametrize("spec", ["tiny", pytest.param("lite", marks=pytest.mark.slow)])
def test_patch_features_run_in_openvino_fp32_and_match_torch(spec, tmp_path, monkeypatch):
    """Anomaly detection's dense features: the float graph whatever the tower's precision."""
    monkeypatch.setenv("CLIPXFER_CACHE", str(tmp_path))
    reference = load_encoder(spec, "cpu", "torch:fp32")
    encoder = load_encoder(spec, "cpu", "openvino:int8")
    pixels = _pixels(encoder, 4)
    ours, expected = encoder.encode_patches(pixels), reference.encode_patches(pixels)
    encoder.encode_pixels(pixels)  # builds the int8 tower: a separate cached model
    runtime = encoder.patch_runtime
    assert runtime.precision == "fp32" and runtime.metadata["graph"] == "patches"
    assert runtime.cache_folder != encoder.image_runtime.cache_folder
    assert len(ours.maps) == len(expected.maps) and (ours.joint is None) == (expected.joint is None)
    for mine, theirs in zip(ours.maps, expected.maps):
        np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())
    if expected.joint is not None:
        np.testing.assert_allclose(ours.joint, expected.joint, atol=1e-3)


def _unwritable_folder(tmp_path):
    """A cache folder no file can be created in: read-only by its mode, or (root ignores modes) /proc's."""
    from pathlib import Path

    folder = tmp_path / "read-only-cache"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return folder
    (folder / "probe").unlink()
    return Path("/proc/self/fdinfo")


def test_a_read_only_cache_builds_in_a_temporary_folder_with_one_warning(tmp_path, monkeypatch, sample_photos_dir):
    from click.testing import CliRunner

    from clipxfer.cli import main

    cache = _unwritable_folder(tmp_path)
    monkeypatch.setenv("CLIPXFER_CACHE", str(cache))
    result = CliRunner().invoke(main, ["index", str(sample_photos_dir), "--index", str(tmp_path / "idx"),
                                       "--model", "tiny", "--device", "cpu", "--runtime", "openvino",
                                       "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "cannot write the OpenVINO model cache" in warnings[0], result.stderr
    assert not (cache / "openvino").exists()


def test_an_adapted_encoder_runs_its_own_weights_in_openvino_and_a_tampered_adapter_is_refused(tmp_path, monkeypatch,
                                                                                                  tiny_torch):
    from clipxfer.encoders.artifacts import read_artifact_metadata
    from clipxfer.finetune.run import run_finetune

    from .conftest import write_tinted_folder
    from .test_finetune_hardening import tampered_copy

    monkeypatch.setenv("CLIPXFER_CACHE", str(tmp_path / "cache"))
    adapter = tmp_path / "adapted.safetensors"
    run_finetune(write_tinted_folder(tmp_path / "data", ["a", "b"], per_class=4), 2, 1, encoder=tiny_torch, out=adapter,
                 epochs=1, lr=1e-2)
    adapted_id = read_artifact_metadata(adapter, "adapter")["model_id"]
    pixels = _pixels(tiny_torch, 4)
    in_torch = load_encoder(f"tiny+{adapter}", "cpu", "torch:fp32")
    in_openvino = load_encoder(f"tiny+{adapter}", "cpu", "openvino:fp32")
    assert in_openvino.runtime == "openvino" and in_openvino.id == adapted_id
    got = in_openvino.encode_pixels(pixels).embeddings
    assert _min_cosine(got, in_torch.encode_pixels(pixels).embeddings) > 0.999
    assert _min_cosine(got, tiny_torch.encode_pixels(pixels).embeddings) < 0.999  # the adapter's graph, not the base's
    meta = in_openvino.image_runtime.metadata
    assert meta["encoder_id"] == adapted_id  # cached under the id, whose hash is checked against the tensors
    bad = tampered_copy(adapter, tmp_path / "tampered.safetensors")
    with pytest.raises(ClipxferError, match="do not match its model id"):
        load_encoder(f"tiny+{bad}", "cpu", "openvino:fp32")
