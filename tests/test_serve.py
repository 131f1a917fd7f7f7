"""The HTTP API of ``clipxfer serve`` through FastAPI's test client: every endpoint and error status."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from clipxfer.errors import ClipxferError  # noqa: E402
from clipxfer.serve import ServeConfig, check_host, create_app, is_loopback  # noqa: E402

pytestmark = pytest.mark.slow  # the lite model over the sample photos
#: Without a token the server answers only requests addressed to this machine (TestClient's default is "testserver").
LOCAL = "http://127.0.0.1"


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def wait_fitted(client, timeout=60.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = client.get("/api/labels").json()
        if not state["fitting"]:
            return state
        time.sleep(0.2)
    raise AssertionError("the labelling head did not finish fitting")


@pytest.fixture(scope="module")
def labelled_head(sample_photo_index, lite, tmp_path_factory):
    """A probe head (cat / other) fitted on four sample photos, saved."""
    from clipxfer.index import Index
    from clipxfer.serve.labels import fit_labelled_head

    with Index.open(sample_photo_index) as idx:
        ids, paths, encoding = idx.load_items()
    names = [p.stem for p in paths]
    chosen = {"chelsea": 0, "coffee": 1, "rocket": 1, "astronaut": 1}
    rows = [names.index(n) for n in chosen]
    from clipxfer.datasets.features import take

    head = fit_labelled_head("probe", lite, ["cat", "other"], take(encoding, np.array(rows)), np.array(list(chosen.values())))
    return head.save(tmp_path_factory.mktemp("heads") / "catdog.safetensors")


@pytest.fixture()
def client(sample_photo_index, labelled_head, tmp_path):
    config = ServeConfig(index=sample_photo_index, heads=[labelled_head], labels=tmp_path / "labels.json",
                         max_upload_bytes=200_000, refit_every=2)
    with TestClient(create_app(config), base_url=LOCAL) as test_client:
        yield test_client


def ids_by_name(client) -> dict[str, int]:
    return {hit["name"].split(".")[0]: hit["id"] for hit in client.get("/api/search", params={"q": "a", "k": 100}).json()}


def test_text_search_matches_cli_json(client, sample_photo_index):
    from clipxfer.index import Index

    hits = client.get("/api/search", params={"q": "a cat", "k": 5}).json()
    assert hits[0]["name"] == "chelsea.jpg"
    with Index.open(sample_photo_index) as idx:
        expected = [h.to_dict() for h in idx.search_text("a cat", 5)]
    assert [{k: h[k] for k in ("rank", "score", "path")} for h in hits] == expected
    assert client.get("/api/search", params={"q": "a cat", "k": 5, "min_score": 0.5}).json()[0]["name"] == "chelsea.jpg"


def test_search_errors(client):
    assert client.get("/api/search").status_code == 422  # no query
    response = client.get("/api/search", params={"q": "x", "k": 0})
    assert response.status_code == 400 and "k must be" in response.json()["detail"]


def test_image_search_finds_the_same_photo(client, sample_photos_dir):
    data = (sample_photos_dir / "coffee.jpg").read_bytes()
    hits = client.post("/api/search/image", files={"file": ("coffee.jpg", data, "image/jpeg")}, params={"k": 3}).json()
    assert hits[0]["name"] == "coffee.jpg" and hits[0]["score"] > 0.99


def test_bad_uploads_get_4xx_with_a_reason(client):
    not_image = client.post("/api/search/image", files={"file": ("x.jpg", b"this is not an image", "image/jpeg")})
    assert not_image.status_code == 400 and "not an image file" in not_image.json()["detail"]
    truncated = jpeg_bytes(np.zeros((64, 64, 3), np.uint8))[:200]
    response = client.post("/api/search/image", files={"file": ("t.jpg", truncated, "image/jpeg")})
    assert response.status_code == 400 and "upload" in response.json()["detail"]
    assert "/tmp" not in response.json()["detail"]  # the temporary file is never named
    empty = client.post("/api/search/image", files={"file": ("e.jpg", b"", "image/jpeg")})
    assert empty.status_code == 400
    # A decompression bomb: a tiny PNG claiming 20000 x 20000 pixels.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    bomb = client.post("/api/search/image", files={"file": ("bomb.png", buffer.getvalue(), "image/png")})
    assert bomb.status_code == 400 and "limit" in bomb.json()["detail"]
    assert client.post("/api/search/image").status_code == 422  # no file


def test_oversized_upload_is_refused(client):
    big = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    data = jpeg_bytes(big) + b"\0" * 300_000
    response = client.post("/api/search/image", files={"file": ("big.jpg", data, "image/jpeg")})
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_similar_and_items(client):
    ids = ids_by_name(client)
    hits = client.get(f"/api/similar/{ids['chelsea']}", params={"k": 4}).json()
    assert len(hits) == 4 and all(h["id"] != ids["chelsea"] for h in hits)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert client.get(f"/api/items/{ids['coffee']}").json()["name"] == "coffee.jpg"
    assert client.get("/api/similar/999999").status_code == 404
    assert client.get("/api/items/999999").status_code == 404


def test_images_are_served_by_id_only(client):
    ids = ids_by_name(client)
    thumb = client.get(f"/api/thumb/{ids['chelsea']}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    large = client.get(f"/api/image/{ids['chelsea']}")
    assert large.status_code == 200 and Image.open(io.BytesIO(large.content)).size == (451, 300)
    # Paths, traversal and non-integers never reach the file system.
    for bad in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "1;rm", "-1", "999999"):
        for route in ("/api/thumb/", "/api/image/"):
            response = client.get(route + bad)
            assert response.status_code in (404, 422), (route, bad, response.status_code)
            assert b"root:" not in response.content
    assert client.get("/static/../labels.py").status_code == 404
    assert client.get("/static/..%2F..%2Fapp.py").status_code == 404


def test_thumbnails_are_cached_next_to_the_index(client, sample_photo_index):
    ids = ids_by_name(client)
    client.get(f"/api/thumb/{ids['rocket']}")
    [cached] = (sample_photo_index / "thumbnails").glob(f"{ids['rocket']}-*.jpg")  # <id>-<path/size/mtime key>
    stamp = cached.stat().st_mtime_ns
    client.get(f"/api/thumb/{ids['rocket']}")
    assert cached.stat().st_mtime_ns == stamp  # made once


def test_classify_upload_with_a_loaded_head(client, sample_photos_dir):
    data = (sample_photos_dir / "chelsea.jpg").read_bytes()
    result = client.post("/api/classify", files={"file": ("chelsea.jpg", data, "image/jpeg")}, params={"k": 2}).json()
    assert result["head"] == "catdog" and result["classes"] == ["cat", "other"]
    prediction = result["predictions"][0]
    assert prediction["label"] == "cat" and prediction["path"] == "chelsea.jpg"
    assert [t["label"] for t in prediction["top_k"]][0] == "cat"
    assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-5
    unknown = client.post("/api/classify", files={"file": ("c.jpg", data, "image/jpeg")}, params={"head": "nope"})
    assert unknown.status_code == 404
    listed = client.get("/api/heads").json()
    assert listed[0]["name"] == "catdog" and listed[0]["multi_label"] is False


def test_anomaly_without_a_detector_is_a_clear_409(client, sample_photos_dir):
    data = (sample_photos_dir / "chelsea.jpg").read_bytes()
    response = client.post("/api/anomaly", files={"file": ("c.jpg", data, "image/jpeg")})
    assert response.status_code == 409 and "no detector loaded" in response.json()["detail"]


def test_info_health_metrics_openapi_page(client):
    info = client.get("/api/info").json()
    assert info["count"] == 19 and info["model_spec"] == "lite"
    assert client.get("/api/health").json()["count"] == 19
    client.get("/api/search", params={"q": "a cat"})
    metrics = client.get("/metrics").text
    assert 'clipxfer_requests_total{method="GET",route="/api/search",status="200"}' in metrics
    assert "clipxfer_request_seconds_bucket" in metrics
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/search/image", "/api/similar/{item_id}", "/api/classify", "/api/anomaly"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200


def test_labelling_loop_end_to_end(client, tmp_path):
    ids = ids_by_name(client)
    assert client.put("/api/labels/classes", json={"classes": ["cat", "other"]}).status_code == 200
    assert client.put(f"/api/labels/{ids['chelsea']}", json={"label": "dog"}).status_code == 400  # unknown class
    assert client.put("/api/labels/999999", json={"label": "cat"}).status_code == 404
    assert client.put("/api/labels/classes", json={"classes": ["a", "a"]}).status_code == 400
    suggested = client.get("/api/labels/suggest", params={"n": 5}).json()
    assert len(suggested) == 5 and len({s["id"] for s in suggested}) == 5
    for name, label in [("chelsea", "cat"), ("astronaut", "cat"), ("coffee", "other"), ("rocket", "other"),
                        ("camera", "other"), ("motorcycle", "cat")]:
        assert client.put(f"/api/labels/{ids[name]}", json={"label": label}).status_code == 200
    state = wait_fitted(client)
    assert state["counts"] == {"cat": 3, "other": 3} and state["has_head"]
    evaluation = state["evaluation"]
    assert evaluation["accuracy"] is not None and evaluation["folds"] == 3
    assert np.array(evaluation["confusion"]).sum() == 6
    # Suggestions never repeat labelled images.
    labelled = {ids[n] for n in ("chelsea", "astronaut", "coffee", "rocket", "camera", "motorcycle")}
    assert not labelled & {s["id"] for s in client.get("/api/labels/suggest", params={"n": 13}).json()}
    # Undo the last label, and a class with labels cannot be dropped.
    undone = client.post("/api/labels/undo").json()
    assert undone["undone"] == ids["motorcycle"] and str(ids["motorcycle"]) not in undone["labels"]
    assert client.put("/api/labels/classes", json={"classes": ["cat"]}).status_code == 400
    assert client.put("/api/labels/method", json={"method": "tip"}).json()["method"] == "tip"
    assert client.put("/api/labels/method", json={"method": "svm"}).status_code == 400
    assert wait_fitted(client)["evaluation"]["method"] == "tip"
    # Exports: a manifest clipxfer reads, and a head predict loads.
    manifest = tmp_path / "labels.csv"
    manifest.write_text(client.get("/api/labels/manifest.csv").text)
    from clipxfer.datasets.labelled import load_dataset
    from clipxfer.heads import load_head

    data = load_dataset(str(manifest))
    assert sorted(data.classnames) == ["cat", "other"] and len(data) == 5
    head_file = tmp_path / "head.safetensors"
    head_file.write_bytes(client.get("/api/labels/head.safetensors").content)
    assert load_head(head_file).method == "tip"
    assert client.get("/api/labels/suggest", params={"n": 0}).status_code == 400
    assert client.get("/api/labels/suggest", params={"strategy": "bogus"}).status_code == 400


def test_head_export_before_any_fit_is_a_400(client):
    assert client.get("/api/labels/head.safetensors").status_code == 400


def test_token_is_required_when_set(sample_photo_index, tmp_path):
    config = ServeConfig(index=sample_photo_index, token="s3cret-token", labels=tmp_path / "l.json")
    with TestClient(create_app(config)) as client:
        assert client.get("/api/search", params={"q": "a cat"}).status_code == 401
        assert client.get("/api/thumb/1").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/api/health").status_code == 200
        ok = client.get("/api/search", params={"q": "a cat"}, headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        page = client.get("/", params={"token": "s3cret-token"})  # sets the cookie the page then uses
        assert page.status_code == 200
        assert client.get("/api/search", params={"q": "a cat"}).status_code == 200


def test_host_checks():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(ClipxferError, match="--token"):
        check_host("0.0.0.0", None)
    check_host("0.0.0.0", "long-enough-token")
    check_host("127.0.0.1", None)


def test_missing_index_and_bad_head_are_clear_errors(tmp_path, sample_photo_index):
    with pytest.raises(ClipxferError, match="no index"):
        create_app(ServeConfig(index=tmp_path / "none"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    with pytest.raises(ClipxferError, match="not a clipxfer head"):
        create_app(ServeConfig(index=sample_photo_index, heads=[bad], labels=tmp_path / "l.json"))
    # Without clipxfer.anomaly, or with a missing file: one clear line, not a traceback.
    with pytest.raises(ClipxferError, match="anomaly detection|detector file not found"):
        create_app(ServeConfig(index=sample_photo_index, detector=tmp_path / "none.safetensors", labels=tmp_path / "l.json"))


def test_vanished_file_is_a_404_not_a_500(tmp_path, sample_photos_dir, lite):
    import shutil

    from clipxfer.index import Index

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(sample_photos_dir / name, photos / name)
    Index.update(photos, lite, path=tmp_path / "index", workers=0)
    (photos / "coffee.jpg").write_bytes(b"damaged since indexing")
    with TestClient(create_app(ServeConfig(index=tmp_path / "index")), base_url=LOCAL) as client:
        ids = ids_by_name(client)
        for route in ("/api/thumb/", "/api/image/"):
            response = client.get(f"{route}{ids['coffee']}")
            assert response.status_code == 404 and "can no longer be read" in response.json()["detail"]
        assert client.get(f"/api/thumb/{ids['chelsea']}").status_code == 200


def test_calibrated_head_gives_a_prediction_set(sample_photo_index, labelled_head, sample_photos_dir, tmp_path):
    """Runs where clipxfer.calibrate has classifier calibration (main's conformal sets)."""
    sets = pytest.importorskip("clipxfer.calibrate.sets")
    from clipxfer.calibrate import ClassifierCalibration
    from clipxfer.heads import load_head

    head = load_head(labelled_head)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1], size=40)
    head.config["calibration"] = ClassifierCalibration.from_probs(probs, probs.argmax(axis=1), "test").to_config()
    path = head.save(tmp_path / "calibrated.safetensors")
    assert sets.head_calibration(load_head(path), "x") is not None
    config = ServeConfig(index=sample_photo_index, heads=[path], labels=tmp_path / "l.json")
    with TestClient(create_app(config), base_url=LOCAL) as client:
        data = (sample_photos_dir / "chelsea.jpg").read_bytes()
        result = client.post("/api/classify", files={"file": ("c.jpg", data, "image/jpeg")},
                             params={"alpha": 0.2}).json()
    prediction = result["predictions"][0]
    assert prediction["label"] in prediction["set"]  # the key of predict --conformal --json
    assert result["conformal"]["alpha"] == 0.2


def test_anomaly_score_with_a_loaded_detector(sample_photo_index, sample_photos_dir, lite, tmp_path):
    """Runs where clipxfer.anomaly exists (the anomaly helper's subpackage)."""
    anomaly = pytest.importorskip("clipxfer.anomaly")
    good = sorted(str(p) for p in sample_photos_dir.glob("*.jpg"))[:12]
    detector = anomaly.fit_detector(lite, good, shots=4, false_alarm_rate=0.2).save(tmp_path / "det.safetensors")
    config = ServeConfig(index=sample_photo_index, detector=detector, labels=tmp_path / "l.json")
    with TestClient(create_app(config), base_url=LOCAL) as client:
        data = (sample_photos_dir / "brick.jpg").read_bytes()
        result = client.post("/api/anomaly", files={"file": ("brick.jpg", data, "image/jpeg")}).json()
        assert result["path"] == "brick.jpg" and result["decision"] in ("ok", "defect")
        assert np.isfinite(result["score"])
        bad = client.post("/api/anomaly", files={"file": ("x.jpg", b"junk", "image/jpeg")})
        assert bad.status_code == 400 and "not an image" in bad.json()["detail"]
