"""``clipxfer serve`` hardening, round 2 (issue 28): the upload cap on chunked bodies, Host and Origin
checks, body types, the token's characters, the port, head names, route labels in /metrics, the
classify API's terms, and file names that are not UTF-8."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
from click.testing import CliRunner  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from clipxfer.cli import main  # noqa: E402
from clipxfer.errors import ClipxferError  # noqa: E402
from clipxfer.serve import ServeConfig, check_host, create_app, serve  # noqa: E402

pytestmark = pytest.mark.slow  # the lite model over the sample photos

LOCAL = "http://127.0.0.1:8000"
CAP = 200_000


@pytest.fixture(scope="module")
def catdog_head(sample_photo_index, lite, tmp_path_factory):
    """A probe head (cat / other) fitted on four sample photos, saved as catdog.safetensors."""
    from clipxfer.datasets.features import take
    from clipxfer.index import Index
    from clipxfer.serve.labels import fit_labelled_head

    with Index.open(sample_photo_index) as idx:
        _, paths, encoding = idx.load_items()
    names = [p.stem for p in paths]
    chosen = {"chelsea": 0, "coffee": 1, "rocket": 1, "astronaut": 1}
    rows = np.array([names.index(n) for n in chosen])
    head = fit_labelled_head("probe", lite, ["cat", "other"], take(encoding, rows), np.array(list(chosen.values())))
    return head.save(tmp_path_factory.mktemp("heads") / "catdog.safetensors")


@pytest.fixture()
def app(sample_photo_index, catdog_head, tmp_path):
    return create_app(ServeConfig(index=sample_photo_index, heads=[catdog_head], labels=tmp_path / "labels.json",
                                  max_upload_bytes=CAP, allowed_hosts=["photos.example.org"]))


@pytest.fixture()
def client(app):
    with TestClient(app, base_url=LOCAL) as test_client:
        yield test_client


def item_ids(client) -> dict[str, int]:
    return {hit["name"]: hit["id"] for hit in client.get("/api/search", params={"q": "a", "k": 100}).json()}


# -- 1. the upload cap holds for a body without Content-Length ---------------------------------

def send_chunked(app, method: str, path: str, content_type: bytes, chunks: list[bytes]) -> tuple[int, int]:
    """Send ``chunks`` to ``app`` as a server streams a chunked body (no Content-Length), one ASGI
    message per chunk: ``(status, bytes the app pulled)``."""
    pulled, status = [0], []
    queue = list(chunks)

    async def receive():
        if not queue:
            return {"type": "http.disconnect"}
        body = queue.pop(0)
        pulled[0] += len(body)
        return {"type": "http.request", "body": body, "more_body": bool(queue)}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", content_type),
                    (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {},
    }
    asyncio.run(app(scope, receive, send))
    return status[0], pulled[0]


def test_chunked_upload_stops_at_the_cap(app):
    chunk = b"\0" * 65536
    head = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    chunks = [head] + [chunk] * 160 + [b"\r\n--XyZ--\r\n"]  # 10 MB against a 200 kB cap
    total = sum(map(len, chunks))
    status, pulled = send_chunked(app, "POST", "/api/search/image", b"multipart/form-data; boundary=XyZ", chunks)
    assert status == 413
    assert pulled < CAP + 64 * 1024 + 2 * len(chunk) < total  # stopped at the cap, not spooled whole
    # A JSON route is capped the same way.
    status, pulled = send_chunked(app, "PUT", "/api/labels/classes", b"application/json", [b'{"classes": ["'] + [chunk] * 160)
    assert status == 413 and pulled < total


# -- 2. Host and Origin checks, body types ------------------------------------------------------

def test_cross_site_simple_post_cannot_change_labels(client):
    ids = item_ids(client)
    assert client.put("/api/labels/classes", json={"classes": ["cat", "other"]}).status_code == 200
    assert client.put(f"/api/labels/{ids['chelsea.jpg']}", json={"label": "cat"}).status_code == 200
    evil = {"Origin": "http://evil.example"}
    # The form an attacker's page auto-submits: no CORS preflight for this content type.
    attack = client.post("/api/labels/undo", data={"x": "1"}, headers=evil)
    assert attack.status_code == 403 and "evil.example" in attack.json()["detail"]
    for origin in ("null", "http://127.0.0.1:9999", "http://127.0.0.1.evil.example:8000"):
        assert client.post("/api/labels/undo", headers={"Origin": origin}).status_code == 403, origin
    put = client.put(f"/api/labels/{ids['chelsea.jpg']}", content=b'{"label": null}',
                     headers={**evil, "Content-Type": "text/plain"})
    assert put.status_code == 403
    assert client.get("/api/labels").json()["labels"] == {str(ids["chelsea.jpg"]): "cat"}  # nothing changed
    # The page itself (same origin) and clients that send no Origin still work.
    same = client.put(f"/api/labels/{ids['coffee.jpg']}", json={"label": "other"}, headers={"Origin": LOCAL})
    assert same.status_code == 200
    assert client.post("/api/labels/undo", headers={"Origin": LOCAL}).json()["undone"] == ids["coffee.jpg"]
    proxy = client.post("/api/labels/undo", headers={"Origin": "https://photos.example.org"})  # --allow-host
    assert proxy.status_code == 200 and proxy.json()["undone"] == ids["chelsea.jpg"]


def test_json_routes_take_only_json(client):
    form = client.post("/api/labels/undo", data={"x": "1"})
    assert form.status_code == 415 and "application/json" in form.json()["detail"]
    text = client.put("/api/labels/classes", content=b'{"classes": ["a", "b"]}', headers={"Content-Type": "text/plain"})
    assert text.status_code == 415
    assert client.get("/api/labels").json()["classes"] == []
    assert client.put("/api/labels/classes", json={"classes": ["a", "b"]}).status_code == 200
    not_multipart = client.post("/api/search/image", content=b"\xff\xd8", headers={"Content-Type": "image/jpeg"})
    assert not_multipart.status_code == 415 and "multipart/form-data" in not_multipart.json()["detail"]


def test_upload_paths_are_the_routes_that_take_files(app):
    from fastapi import params
    from fastapi.routing import APIRoute

    from clipxfer.serve.security import UPLOAD_PATHS

    takes_files = {route.path for route in app.routes if isinstance(route, APIRoute)
                   and any(isinstance(p.field_info, params.File) for p in route.dependant.body_params)}
    assert takes_files == UPLOAD_PATHS


def test_foreign_host_is_refused_without_a_token(app):
    """DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and reads the API."""
    for base in ("http://evil.example", "http://evil.example:8000", "http://127.0.0.1.nip.io:8000"):
        with TestClient(app, base_url=base) as client:
            response = client.get("/api/search", params={"q": "a cat"})
            assert response.status_code == 400 and "--allow-host" in response.json()["detail"], base
            assert client.post("/api/labels/undo").status_code == 400
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "http://127.0.0.2",
                 "http://photos.example.org"):
        with TestClient(app, base_url=base) as client:
            assert client.get("/api/search", params={"q": "a cat"}).status_code == 200, base


def test_with_a_token_any_host_name_works_but_origins_are_checked(sample_photo_index, tmp_path):
    """Serving on 0.0.0.0 with a token: the page is opened by the machine's LAN name or address."""
    token = "s3cret-token"
    config = ServeConfig(index=sample_photo_index, token=token, labels=tmp_path / "l.json")
    with TestClient(create_app(config), base_url="http://192.168.1.5:8000") as client:
        auth = {"Authorization": f"Bearer {token}"}
        assert client.get("/api/search", params={"q": "a cat"}, headers=auth).status_code == 200
        page = {**auth, "Origin": "http://192.168.1.5:8000"}
        assert client.put("/api/labels/classes", json={"classes": ["a", "b"]}, headers=page).status_code == 200
        evil = {**auth, "Origin": "http://evil.example"}
        assert client.put("/api/labels/classes", json={"classes": ["c", "d"]}, headers=evil).status_code == 403


# -- 3. the token's characters ------------------------------------------------------------------

def test_non_ascii_token_is_refused_at_start(sample_photo_index, tmp_path):
    for token in ("sécret-tökén", "two words here"):
        with pytest.raises(ClipxferError, match="printable ASCII"):
            check_host("0.0.0.0", token)
        with pytest.raises(ClipxferError, match="printable ASCII"):
            create_app(ServeConfig(index=sample_photo_index, token=token, labels=tmp_path / "l.json"))
    result = CliRunner().invoke(main, ["serve", "--index", str(sample_photo_index), "--token", "sécret-tökén"])
    assert result.exit_code == 2 and "printable ASCII" in result.output and "Traceback" not in result.output
    # Punctuation survives the header, the page's cookie and the URL.
    token = "p@ss;w0rd,\"quoted\"+/="
    config = ServeConfig(index=sample_photo_index, token=token, labels=tmp_path / "l.json")
    with TestClient(create_app(config), base_url=LOCAL) as client:
        assert client.get("/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert client.get("/", params={"token": token}).status_code == 200
        assert client.get("/api/info").status_code == 200  # with the cookie the page got


# -- 4. the port --------------------------------------------------------------------------------

def test_port_out_of_range_is_one_line(sample_photo_index, tmp_path):
    for port in ("99999", "-1", "0"):
        result = CliRunner().invoke(main, ["serve", "--index", str(sample_photo_index), "--port", port])
        assert result.exit_code == 2 and "65535" in result.output, (port, result.output)
        assert "Traceback" not in result.output
    with pytest.raises(ClipxferError, match="--port 99999"):
        serve(ServeConfig(index=sample_photo_index, labels=tmp_path / "l.json"), port=99999)


# -- 5 and 7. /api/classify: head by file name, API terms, one name for the prediction set -------

def test_head_is_found_by_file_name(client, sample_photos_dir):
    data = (sample_photos_dir / "chelsea.jpg").read_bytes()
    for name in ("catdog", "catdog.safetensors"):
        response = client.post("/api/classify", files={"file": ("c.jpg", data, "image/jpeg")}, params={"head": name})
        assert response.status_code == 200 and response.json()["head"] == "catdog", name
    missing = client.post("/api/classify", files={"file": ("c.jpg", data, "image/jpeg")},
                          params={"head": "nope.safetensors"})
    assert missing.status_code == 404 and "catdog" in missing.json()["detail"]


def test_classify_errors_name_api_parameters(client, sample_photos_dir):
    data = (sample_photos_dir / "chelsea.jpg").read_bytes()
    for alpha in ("2", "0", "nan"):
        response = client.post("/api/classify", files={"file": ("c.jpg", data, "image/jpeg")}, params={"alpha": alpha})
        detail = response.json()["detail"]
        assert response.status_code == 400 and "alpha" in detail and "--conformal" not in detail, detail


def test_prediction_set_has_the_cli_name(sample_photo_index, catdog_head, sample_photos_dir, tmp_path):
    from clipxfer.calibrate import ClassifierCalibration
    from clipxfer.heads import load_head

    head = load_head(catdog_head)
    probs = np.random.default_rng(0).dirichlet([1, 1], size=40)
    head.config["calibration"] = ClassifierCalibration.from_probs(probs, probs.argmax(axis=1), "test").to_config()
    path = head.save(tmp_path / "calibrated.safetensors")
    config = ServeConfig(index=sample_photo_index, heads=[path], labels=tmp_path / "l.json")
    with TestClient(create_app(config), base_url=LOCAL) as client:
        data = (sample_photos_dir / "chelsea.jpg").read_bytes()
        result = client.post("/api/classify", files={"file": ("c.jpg", data, "image/jpeg")}).json()
        bad = client.post("/api/classify", files={"file": ("c.jpg", data, "image/jpeg")}, params={"alpha": 2})
        assert bad.status_code == 400 and "alpha" in bad.json()["detail"] and "--conformal" not in bad.json()["detail"]
    prediction = result["predictions"][0]
    assert "prediction_set" not in prediction and prediction["label"] in prediction["set"]
    # The key predict --conformal --json uses for the same thing (cli/fewshot.py).
    import inspect

    from clipxfer.cli import fewshot

    assert 'item["set"]' in inspect.getsource(fewshot.predict.callback)


# -- 6. route labels in /metrics ----------------------------------------------------------------

def test_docs_and_static_files_have_route_labels(client):
    for path in ("/docs", "/openapi.json", "/static/app.js", "/no/such/page"):
        client.get(path)
    client.get("/api/items/1")
    metrics = client.get("/metrics").text
    for route, status in (("/docs", 200), ("/openapi.json", 200), ("/static", 200), ("unmatched", 404),
                          ("/api/items/{item_id}", 200)):
        assert f'clipxfer_requests_total{{method="GET",route="{route}",status="{status}"}}' in metrics, route


# -- 8. file names that are not UTF-8 -----------------------------------------------------------

def test_non_utf8_file_names_are_shown_not_500(tmp_path, sample_photos_dir, lite):
    from clipxfer.index import Index

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sample_photos_dir / "chelsea.jpg", photos / "chelsea.jpg")
    shutil.copy(sample_photos_dir / "coffee.jpg", bytes(photos) + b"/caf\xe9.jpg")  # Latin-1, not UTF-8
    Index.update(photos, lite, path=tmp_path / "index", workers=0)
    config = ServeConfig(index=tmp_path / "index", labels=tmp_path / "l.json")
    with TestClient(create_app(config), base_url=LOCAL) as client:
        hits = client.get("/api/search", params={"q": "a cup of coffee", "k": 2})
        assert hits.status_code == 200
        cafe = hits.json()[0]
        assert cafe["name"] == "caf\\xe9.jpg" and cafe["path"].endswith("/caf\\xe9.jpg")
        item = client.get(f"/api/items/{cafe['id']}")
        assert item.status_code == 200 and item.json()["name"] == "caf\\xe9.jpg"
        chelsea = next(h["id"] for h in hits.json() if h["name"] == "chelsea.jpg")
        similar = client.get(f"/api/similar/{chelsea}", params={"k": 1})
        assert similar.status_code == 200 and similar.json()[0]["name"] == "caf\\xe9.jpg"
        assert client.get(f"/api/similar/{cafe['id']}").status_code == 200
        # The file itself is still served by id.
        assert client.get(f"/api/image/{cafe['id']}").status_code == 200
        assert client.put("/api/labels/classes", json={"classes": ["cat", "cup"]}).status_code == 200
        suggested = client.get("/api/labels/suggest", params={"n": 2})
        assert suggested.status_code == 200 and "caf\\xe9.jpg" in {s["path"].rsplit("/", 1)[-1] for s in suggested.json()}


def test_api_anomaly_says_unknown_for_a_detector_without_a_threshold(tiny):
    """A detector fitted on one good image has no calibrated threshold: the API must not answer 'ok'."""
    from clipxfer.anomaly import fit_detector
    from clipxfer.serve.routes.classify import detector_score

    rng = np.random.default_rng(0)
    part = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    detector = fit_detector(tiny, [part], shots=1)
    assert not detector.calibrated
    row = detector_score(detector, tiny, part)
    assert row["decision"] == "unknown" and row["threshold"] is None
