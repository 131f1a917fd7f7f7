"""``clipxfer serve`` for load (issue 25): orjson responses, ``--workers N`` on a real port with
read-only labels, and the worker config handed down through the environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")

from clipxfer.errors import ClipxferError  # noqa: E402
from clipxfer.serve import ServeConfig, serve  # noqa: E402
from clipxfer.serve.labels import LabelsNotWritable, LabelStore  # noqa: E402
from clipxfer.serve.responses import SafeJSONResponse  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_responses_render_numpy_and_surrogates():
    body = SafeJSONResponse({"score": np.float32(0.5), "n": np.int64(3), "path": "caf\udce9.jpg", 7: "seven"}).body
    assert body == b'{"score":0.5,"n":3,"path":"caf\\\\xe9.jpg","7":"seven"}'


def test_responses_without_orjson_still_show_surrogates(monkeypatch):
    from clipxfer.serve import responses

    monkeypatch.setattr(responses, "orjson", None)
    assert SafeJSONResponse({"path": "caf\udce9.jpg"}).body == b'{"path":"caf\\\\xe9.jpg"}'


def test_config_survives_the_environment(tmp_path):
    config = ServeConfig(index=tmp_path / "i", heads=[tmp_path / "h.safetensors"], labels=tmp_path / "l.json",
                         token="secret-token", allowed_hosts=["box"], labels_read_only=True, max_upload_bytes=123)
    assert ServeConfig.from_json(config.to_json()) == config
    assert ServeConfig.from_json(ServeConfig().to_json()) == ServeConfig()


def test_read_only_labels_refuse_changes_and_keep_the_file(tmp_path):
    path = tmp_path / "labels.json"
    LabelStore(path).set_classes(["cat", "dog"])
    before = path.read_bytes()
    store = LabelStore(path, read_only="read-only here")
    assert store.classes == ["cat", "dog"]
    with pytest.raises(LabelsNotWritable, match="read-only here"):
        store.set_classes(["x"])
    assert path.read_bytes() == before


def test_zero_workers_is_one_line(tmp_path):
    with pytest.raises(ClipxferError, match="--workers 0"):
        serve(ServeConfig(index=tmp_path), workers=0)


@pytest.mark.slow  # two worker processes, each loading lite and the index
def test_workers_serve_search_and_refuse_label_changes(sample_photo_index, tmp_path):
    port = free_port()
    labels = tmp_path / "labels.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "clipxfer", "serve", "--index", str(sample_photo_index),
                               "--port", str(port), "--labels", str(labels), "--workers", "2"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stdout.read().decode(errors="replace")
            assert time.time() < deadline, "server did not start"
            time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(4):  # new connections: spread over the workers
                hits = client.get("/api/search", params={"q": "a cat", "k": 2}, headers={"Connection": "close"})
                assert hits.status_code == 200 and len(hits.json()) == 2
            refused = client.put("/api/labels/classes", json={"classes": ["cat", "dog"]})
            assert refused.status_code == 409 and "--workers 1" in refused.json()["detail"]
            assert client.get("/api/labels").status_code == 200
        assert not labels.exists()
    finally:
        server.terminate()
        server.wait(timeout=60)
