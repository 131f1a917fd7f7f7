"""Export and the torch-free runtime: folded heads equal the toolkit's heads, bundles equal
``predict`` / ``anomaly`` scoring on real files, the runtime imports and runs with torch blocked,
tampered bundles are refused, the hot folder survives kill -9, and the small server answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipxfer.encoders.base import ImageEncoding
from clipxfer.errors import ClipxferError

from .conftest import random_images, write_tinted_folder

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red", "green", "blue"]
#: What a line PC lacks: importing any of these in the runtime must fail the test.
BLOCKED = ("torch", "open_clip", "timm", "transformers", "faiss", "safetensors", "sklearn", "pandas", "scipy", "nncf",
           "click")  # fmt: skip


#: A script prefix that makes importing any of :data:`BLOCKED` fail.
BLOCKING = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def _encoding(rng, n=6, dim=8, feature_dim=12) -> ImageEncoding:
    embeddings = rng.normal(size=(n, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return ImageEncoding(embeddings, rng.normal(size=(n, feature_dim)).astype(np.float32))


def _heads(rng, classes=3, dim=8, feature_dim=12):
    """One head of every exportable method, with random arrays of the right shapes."""
    from clipxfer.heads.base import HEAD_TYPES
    from clipxfer.heads.metalearned import MetaFeaturesHead

    r = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    linear = {"embedding_weights": r(classes, dim), "feature_weights": r(classes, feature_dim), "bias": r(classes)}
    text = {"class_weights": r(classes, dim)}
    adapter = {"adapter.w1": r(5, feature_dim), "adapter.b1": r(5), "adapter.w2": r(feature_dim, 5)}
    heads = [HEAD_TYPES[m]("m", CLASSES, linear, {}) for m in ("probe", "mix", "lpp", "clap", "finetune")]
    heads += [HEAD_TYPES[m]("m", CLASSES, text, {"logit_scale": 50.0}) for m in ("zeroshot", "coop")]
    for space in ("features", "embeddings"):
        width = feature_dim if space == "features" else dim
        heads.append(HEAD_TYPES["tip"]("m", CLASSES, {**text, "keys": r(7, width), "values": np.eye(3, dtype=np.float32)[
            rng.integers(0, 3, 7)]}, {"logit_scale": 50.0, "key_space": space, "alpha": 1.7, "beta": 5.5}))
    heads.append(HEAD_TYPES["transductive"]("m", CLASSES, {**text, "prototypes": r(classes, feature_dim),
                                                          "centre": r(feature_dim)},
                                            {"logit_scale": 50.0, "prior_weight": 0.7, "zs_spread": 3.0, "kappa": 9.0}))
    heads.append(HEAD_TYPES["meta"]("m", CLASSES, {**adapter, "prototypes": r(classes, feature_dim)}, {"scale": 10.0}))
    heads.append(MetaFeaturesHead.wrap(adapter, heads[2], {}))
    return heads


def test_every_folded_head_gives_the_toolkits_logits():
    from clipxfer.export.fold import FOLDING, head_logits

    rng = np.random.default_rng(0)
    encoding = _encoding(rng)
    heads = _heads(rng)
    assert {head.method for head in heads} == set(FOLDING)
    for head in heads:
        folded = head_logits(head)(torch.from_numpy(encoding.embeddings), torch.from_numpy(encoding.features))
        np.testing.assert_allclose(folded.numpy(), head.logits(encoding), rtol=1e-4, atol=1e-4, err_msg=head.method)


def test_transclip_and_onnx_are_refused_in_one_line(tmp_path):
    from clipxfer.export import ExportSettings
    from clipxfer.export.fold import head_logits
    from clipxfer.heads.transclip import TransCLIPHead

    rng = np.random.default_rng(0)
    with pytest.raises(ClipxferError, match="TransCLIP classifies a batch jointly"):
        head_logits(TransCLIPHead.wrap(_heads(rng)[0]))
    with pytest.raises(ClipxferError, match="--format onnx is not supported"):
        ExportSettings(tmp_path / "x.safetensors", tmp_path / "b", format="onnx").check()


@pytest.fixture(scope="module")
def tinted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinted")
    return write_tinted_folder(root / "train", CLASSES, per_class=6), write_tinted_folder(
        root / "test", CLASSES, per_class=4, seed=50)


@pytest.fixture(scope="module")
def tip_bundle(tiny, tinted, tmp_path_factory):
    """A Tip-Adapter head (zero-shot weights + cache: the most folded parts) on tiny, with a
    calibration, and its fp32 bundle."""
    from clipxfer.calibrate.sets import calibrate_on
    from clipxfer.datasets.prompts import load_templates
    from clipxfer.export import ExportSettings, export_artifact
    from clipxfer.heads.base import FewShotData
    from clipxfer.heads.tip import TipAdapterHead
    from clipxfer.heads.zeroshot import fit_zeroshot
    from clipxfer.images import find_images

    train, _ = tinted
    paths = list(find_images(train))
    labels = np.array([CLASSES.index(p.parent.name) for p in paths])
    encoding = tiny.embed_images(paths)
    fit, val = np.arange(len(paths)) % 2 == 0, np.arange(len(paths)) % 2 == 1
    take = lambda rows: ImageEncoding(encoding.embeddings[rows], encoding.features[rows])  # noqa: E731
    zeroshot = fit_zeroshot(tiny, CLASSES, load_templates("simple"))
    data = FewShotData(tiny, CLASSES, take(fit), labels[fit], take(val), labels[val], zeroshot, 3, 0)
    head = TipAdapterHead.fit(data)
    head.config["calibration"] = calibrate_on(head, take(val), labels[val], "val").to_config()
    folder = tmp_path_factory.mktemp("tip")
    head_path = head.save(folder / "tip.safetensors")
    bundle = folder / "bundle"
    export_artifact(ExportSettings(head_path, bundle))
    return head_path, bundle


def test_bundle_agrees_with_predict_and_its_sets(tiny, tinted, tip_bundle):
    from clipxfer.fewshot.predict import predict, predict_sets
    from clipxfer.images import find_images
    from clipxfer.runtime import Bundle

    head_path, folder = tip_bundle
    _, test = tinted
    head, table, probs = predict(head_path, test, encoder=tiny)
    sets = predict_sets(head, probs, 0.1, head_path)
    bundle = Bundle.load(folder)
    answer = bundle.predict(list(find_images(test)))
    assert answer.labels == list(table.label)
    np.testing.assert_allclose(answer.probs, probs, atol=1e-4)
    assert answer.sets == sets.set_names(head.classnames)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["method"] == "tip" and manifest["encoder_id"] == head.model_id
    assert set(manifest["files"]) == {"model.xml", "model.bin", "classifier.json"}


def test_int8_calibrates_on_the_heads_training_images_when_they_are_at_hand(tip_bundle, tinted, tmp_path, capsys):
    """Without --calibration-images, int8 calibrates on the train and val rows of the manifest beside the
    head (never its test rows); with no manifest, on the sample photos with one warning naming the option."""
    import shutil

    from clipxfer.export import ExportSettings, export_artifact
    from clipxfer.images import find_images

    head_path, _ = tip_bundle
    train, test = tinted
    head = tmp_path / "tip.safetensors"
    shutil.copy(head_path, head)
    alone = export_artifact(ExportSettings(head, tmp_path / "photos", precision="int8"))
    assert alone["int8_calibration"]["source"].startswith("clipxfer sample photos")
    assert "give --calibration-images" in capsys.readouterr().err
    rows = [f"{p},{p.parent.name},{'train' if i % 2 else 'val'}" for i, p in enumerate(find_images(train))]
    rows += [f"{p},{p.parent.name},test" for p in find_images(test)] + ["gone.png,red,train"]
    (tmp_path / "tip.manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    manifest = export_artifact(ExportSettings(head, tmp_path / "data", precision="int8"))
    assert manifest["int8_calibration"] == {"source": "training and validation images", "manifest": "tip.manifest.csv",
                                            "images": len(list(find_images(train)))}  # fmt: skip
    assert "give --calibration-images" not in capsys.readouterr().err


def test_int8_keeps_the_layers_that_make_the_towers_outputs_float(tiny):
    from clipxfer.encoders.openvino_runtime import _convert
    from clipxfer.export.build import output_layers_in_float

    model = _convert(tiny)[0]
    names = output_layers_in_float(model)
    assert names and all(op.get_type_name() == "MatMul" for op in model.get_ordered_ops() if op.get_friendly_name() in names)


def test_runtime_runs_with_torch_unimportable(tip_bundle, tinted):
    _, folder = tip_bundle
    _, test = tinted
    image = next(test.rglob("*.png"))
    script = BLOCKING + f"""
from clipxfer.runtime import Bundle
from clipxfer.runtime.cli import main
answer = Bundle.load({str(folder)!r}).predict([{str(image)!r}])
print(answer.labels[0], sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}))
main([{str(folder)!r}, {str(image)!r}, '--json'])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.splitlines()[:2]
    assert first.endswith("[]") and first.split()[0] in CLASSES
    assert json.loads(second)["predictions"][0]["decision"] == first.split()[0]


def test_a_tampered_bundle_is_refused_in_one_line(tip_bundle, tmp_path):
    import shutil

    from clipxfer.runtime import Bundle

    _, folder = tip_bundle
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    info = json.loads((copy / "classifier.json").read_text())
    info["classes"] = ["ok", "ok", "ok"]
    (copy / "classifier.json").write_text(json.dumps(info))
    with pytest.raises(ClipxferError, match="classifier.json: SHA-256 does not match the manifest"):
        Bundle.load(copy)
    shutil.copy(folder / "classifier.json", copy / "classifier.json")
    (copy / "model.bin").unlink()
    done = subprocess.run([sys.executable, "-m", "clipxfer.runtime.cli", str(copy), str(copy)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "missing from the bundle" in done.stderr


def _detector_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """24 good parts and 4 test parts (two new good ones, two flawed) as files."""
    good, test = [], []
    for i, image in enumerate(random_images(26, seed=3, size=(64, 64))):
        (good if i < 24 else test).append(folder / f"good{i}.png")
        Image.fromarray(image // 2 + 60).save((good if i < 24 else test)[-1])
    test.append(folder / "t0.png")
    Image.fromarray(random_images(1, seed=9, size=(64, 64))[0]).save(test[-1])
    test.append(folder / "t1.png")
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(test[-1])
    return good, test


@pytest.mark.parametrize("method, members, scale", [
    ("combined", None, 1),
    ("gaussian", None, 1),
    ("fused", ["patchcore", "gaussian", "zeroshot"], 1),
    ("auto", None, 2),  # the default: fused, here at twice the input, in 2 x 2 overlapping tiles
])  # fmt: skip
def test_detector_bundle_agrees_with_anomaly_scoring(tiny, tmp_path, method, members, scale):
    """Every detector ``anomaly fit`` makes, at its working resolution, scores in the bundle as
    :meth:`AnomalyDetector.score` does: scores within 1e-4 relative, the same decisions, the maps."""
    from clipxfer.anomaly import fit_detector
    from clipxfer.anomaly.patches import encode_dense
    from clipxfer.export import ExportSettings, export_artifact
    from clipxfer.runtime import Bundle

    good, test = _detector_images(tmp_path)
    detector = fit_detector(tiny, good, shots=4, false_alarm_rate=0.3, method=method, members=members,
                            resolution=scale * tiny.input_size)  # fmt: skip
    assert detector.map_size == scale * tiny.input_size and detector.method == ("fused" if method == "auto" else method)
    path = detector.save(tmp_path / "det.safetensors")
    if method == "combined":
        with pytest.raises(ClipxferError, match="detectors export in fp32 only"):
            export_artifact(ExportSettings(path, tmp_path / "b8", precision="int8"))
    manifest = export_artifact(ExportSettings(path, tmp_path / "bundle"))
    assert manifest["input_size"] == detector.map_size
    expected = detector.score(encode_dense(tiny, test, resolution=detector.map_size))
    answer = Bundle.load(tmp_path / "bundle").predict(test)
    np.testing.assert_allclose(answer.scores, expected.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(answer.maps, expected.maps, rtol=1e-3, atol=1e-4)
    assert list(answer.defect) == list(detector.decide(expected.scores))
    assert answer.defect[-2:].any()  # the flawed parts: a test whose decisions could differ
    if method == "auto":  # the default detector, tiled, in a process that cannot import torch
        script = BLOCKING + f"""
import json
from clipxfer.runtime import Bundle
answer = Bundle.load({str(tmp_path / "bundle")!r}).predict({[str(p) for p in test]!r})
print(json.dumps([answer.scores.tolist(), answer.labels]))
"""
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        scores, labels = json.loads(done.stdout)
        np.testing.assert_allclose(scores, expected.scores, rtol=1e-4, atol=1e-5)
        assert labels == detector.decision_names(expected.scores)


def test_a_detector_without_a_threshold_decides_unknown_as_the_toolkit_does(tiny, tmp_path):
    from clipxfer.anomaly import fit_detector
    from clipxfer.anomaly.patches import encode_dense
    from clipxfer.export import ExportSettings, export_artifact
    from clipxfer.runtime import Bundle

    good, test = _detector_images(tmp_path)
    detector = fit_detector(tiny, good[:8], shots=4, false_alarm_rate=0.05, method="patchcore")
    assert not detector.calibrated
    export_artifact(ExportSettings(detector.save(tmp_path / "det.safetensors"), tmp_path / "bundle"))
    answer = Bundle.load(tmp_path / "bundle").predict(test)
    assert answer.labels == detector.decision_names(detector.score(encode_dense(tiny, test)).scores) == ["unknown"] * 4


def test_fused_member_affine_and_gaussian_factor_follow_the_toolkit():
    """The fused score's per-member (threshold, scale), for each calibration case, and the Cholesky
    form of the Mahalanobis distance give :func:`fuse` and :func:`gaussian_scores`."""
    from clipxfer.anomaly.fusion import fuse
    from clipxfer.anomaly.gaussian import gaussian_scores, pooled_statistics
    from clipxfer.export.fold import fusion_affine, gaussian_factor

    rng = np.random.default_rng(1)
    scores = rng.normal(3.0, 1.0, 5)
    for entry in ({"threshold": 4.0, "median": 3.0, "spread": 0.5}, {"threshold": None, "median": 3.0, "spread": 0.5},
                  {"threshold": None, "median": None, "spread": None}):  # fmt: skip
        threshold, scale = fusion_affine(entry)
        np.testing.assert_allclose((scores - threshold) / scale, fuse({"m": (scores, None)}, {"m": entry}, 4)[0])
    local = rng.normal(size=(3, 4, 4, 5)).astype(np.float32)
    pooled = pooled_statistics(local).astype(np.float64)
    a = rng.normal(size=(10, 10))
    precision, mean = a @ a.T + np.eye(10), pooled.mean(axis=0)
    centred = pooled - mean
    np.testing.assert_allclose(np.linalg.norm(centred @ gaussian_factor(precision), axis=1),
                               gaussian_scores(local, mean, precision), rtol=1e-10)  # fmt: skip


# --------------------------------------------------------------------------- the hot folder


def _write_parts(folder: Path, start: int, count: int) -> list[str]:
    names = []
    for i, image in enumerate(random_images(count, seed=start, size=(32, 32)), start):
        tmp = folder / f".part{i:03d}.png.tmp"
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, folder / f"part{i:03d}.png")
        names.append(f"part{i:03d}.png")
    return names


def _ledger(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_watch_survives_kill_9_without_repeating_or_losing_a_part(tip_bundle, tmp_path):
    _, bundle = tip_bundle
    hot, out = tmp_path / "hot", tmp_path / "results.jsonl"
    hot.mkdir()
    command = [sys.executable, "-m", "clipxfer.runtime.cli", "watch", str(hot), "--bundle", str(bundle), "--out",
               str(out), "--settle", "0.2", "--interval", "0.1"]  # fmt: skip
    names = _write_parts(hot, 0, 6)
    watcher = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while len(_ledger(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_ledger(out)) >= 2, "the watcher answered nothing"
        watcher.send_signal(signal.SIGKILL)  # mid-run: some parts answered, others not
        watcher.wait(10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    names += _write_parts(hot, 6, 3)  # parts landing while it was down
    (hot / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with open(out, "ab") as handle:  # a line torn by the kill: that part must be answered again
        handle.write(b'{"time": "x", "file": "part0')
    done = subprocess.run([*command, "--once"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _ledger(out)
    answered = [row["file"] for row in rows if row["decision"] != "unreadable"]
    assert sorted(answered) == sorted(names)  # each part exactly once
    broken = [row for row in rows if row["file"] == "broken.png"]
    assert len(broken) == 1 and broken[0]["decision"] == "unreadable" and broken[0]["reason"]
    assert "refused" in done.stderr and all({"time", "score", "set", "latency_ms"} <= set(r) for r in rows
                                            if r["decision"] != "unreadable")  # fmt: skip


def test_watch_waits_for_a_file_still_being_written_and_moves_parts(tip_bundle, tmp_path):
    from clipxfer.runtime import Bundle
    from clipxfer.runtime.watch import Watcher, WatchSettings

    _, folder = tip_bundle
    bundle = Bundle.load(folder)
    hot = tmp_path / "hot"
    hot.mkdir()
    _write_parts(hot, 0, 1)
    settings = WatchSettings(hot, folder, move_to=(tmp_path / "ok", tmp_path / "ng"), ok_classes=("red",), settle=3600)
    watcher = Watcher(settings, bundle)
    assert watcher.run_once() == [] and watcher.run_once() == []  # not yet still for an hour
    watcher.settings.settle = 0.0
    rows = watcher.run_once()
    assert len(rows) == 1 and not (hot / "part000.png").exists()
    moved_to = tmp_path / ("ok" if rows[0]["decision"] == "red" else "ng") / "part000.png"
    assert moved_to.is_file()
    with pytest.raises(ClipxferError, match="--ok-class"):
        Watcher(WatchSettings(hot, folder, move_to=(tmp_path / "ok", tmp_path / "ng")), bundle)


# --------------------------------------------------------------------------- the server


def _request(url, data=None, headers=None):
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_server_predicts_and_refuses_in_one_line(tip_bundle, tinted):
    from clipxfer.runtime import Bundle
    from clipxfer.runtime.server import check_host, make_server

    _, folder = tip_bundle
    _, test = tinted
    image = next(test.rglob("*.png"))
    bundle = Bundle.load(folder)
    with pytest.raises(ClipxferError, match="--token"):
        check_host("0.0.0.0", None)
    server = make_server(bundle, "127.0.0.1", 0, token="secret-token", max_upload_mb=0.01)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    auth = {"Authorization": "Bearer secret-token"}
    try:
        assert _request(f"{url}/predict", image.read_bytes())[0] == 401
        status, body = _request(f"{url}/predict", image.read_bytes(), auth)
        assert status == 200 and body["decision"] == bundle.predict([image]).labels[0] and "set" in body
        status, body = _request(f"{url}/predict", b"not an image", auth)
        assert status == 400 and "\n" not in body["error"]
        status, body = _request(f"{url}/predict", b"x" * 20000, auth)
        assert status == 413 and "cap" in body["error"]
        assert _request(f"{url}/health", headers=auth)[1]["method"] == "tip"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- real data, lite


@pytest.mark.slow
def test_lite_bundles_agree_with_predict_on_fashion_mnist(tmp_path):
    """A probe on 40 Fashion-MNIST images, exported fp32 and int8, against ``predict`` on 200 others:
    fp32 top-1 agreement 100% and probabilities within 1e-4; int8 at least 99% agreement."""
    from clipxfer.calibrate.sets import calibrate_on
    from clipxfer.datasets.prompts import load_templates
    from clipxfer.encoders import cached_encoder
    from clipxfer.export import ExportSettings, export_artifact
    from clipxfer.fewshot.predict import predict
    from clipxfer.heads.base import FewShotData
    from clipxfer.heads.probe import ProbeHead
    from clipxfer.heads.zeroshot import fit_zeroshot
    from clipxfer.runtime import Bundle

    from .conftest import fashion_mnist_or_skip

    images = fashion_mnist_or_skip().split("test")
    lite = cached_encoder("lite", "cpu", "fp32")
    train, val, test = images.subset(range(40)), images.subset(range(40, 80)), images.subset(range(80, 280))
    folder = tmp_path / "test"
    folder.mkdir()
    for i, pixels in enumerate(test.sources):
        Image.fromarray(np.asarray(pixels)).save(folder / f"{i:03d}.png")
    train_enc, val_enc = lite.embed_images(list(train.sources)), lite.embed_images(list(val.sources))
    zeroshot = fit_zeroshot(lite, images.classnames, load_templates("simple"))
    head = ProbeHead.fit(FewShotData(lite, images.classnames, train_enc, train.labels, val_enc, val.labels, zeroshot, 4, 0))
    head.config["calibration"] = calibrate_on(head, val_enc, val.labels, "val").to_config()
    head_path = head.save(tmp_path / "probe.safetensors")
    _, table, probs = predict(head_path, folder, encoder=lite)
    paths = sorted(folder.glob("*.png"))
    calibration = tmp_path / "calibration"  # int8 calibrates on the training and validation images, never test
    calibration.mkdir()
    for i, pixels in enumerate([*train.sources, *val.sources]):
        Image.fromarray(np.asarray(pixels)).save(calibration / f"{i:03d}.png")
    for precision in ("fp32", "int8"):
        export_artifact(ExportSettings(head_path, tmp_path / precision, precision=precision,
                                       calibration_images=calibration))
        answer = Bundle.load(tmp_path / precision).predict(paths)
        agreement = float(np.mean(np.array(answer.labels) == table.label.values))
        if precision == "fp32":
            assert agreement == 1.0
            np.testing.assert_allclose(answer.probs, probs, atol=1e-4)
        else:
            assert agreement >= 0.99, agreement


def test_the_clipxfer_commands_export_and_watch(tip_bundle, tmp_path):
    from click.testing import CliRunner

    from clipxfer.cli import main

    head_path, bundle = tip_bundle
    runner = CliRunner()
    refused = runner.invoke(main, ["export", str(head_path), "--out", str(tmp_path / "b"), "--format", "onnx"])
    assert refused.exit_code == 2 and "--format onnx is not supported" in refused.output
    hot = tmp_path / "hot"
    hot.mkdir()
    _write_parts(hot, 0, 2)
    done = runner.invoke(main, ["watch", str(hot), "--bundle", str(bundle), "--settle", "0", "--once"])
    assert done.exit_code == 0, done.output
    assert sorted(row["file"] for row in _ledger(hot / "results.jsonl")) == ["part000.png", "part001.png"]
