"""Embedding shards under hostile or changing input: folder re-runs keyed by content, shard keys
that are not names, manifests and shards that disagree, non-UTF-8 file names, bad Ray addresses."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from clipxfer.cli import main
from clipxfer.embed import embed, export_embeddings, ingest, iter_embeddings
from clipxfer.embed.shards import EncoderInfo, ShardData, write_manifest, write_shard
from clipxfer.errors import ClipxferError
from clipxfer.index import Index
from clipxfer.index.layout import DB_FILE

pytest.importorskip("pyarrow")


def png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def folder_of(path: Path, names: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        (path / name).write_bytes(png(seed))
    return path


def rows_by_key(out: Path) -> dict[str, list[str]]:
    """key -> the sha256 of every row holding it, over all shards of ``out``."""
    found: dict[str, list[str]] = {}
    for batch in iter_embeddings(out):
        for key, sha in zip(batch.keys, batch.sha256):
            found.setdefault(key, []).append(sha)
    return found


def one_line(result) -> str:
    """The CLI's one-line error (exit status 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output.strip()


# -- 1. folder units are keyed by content ------------------------------------------------------


def test_folder_rerun_embeds_exactly_the_added_and_changed_files(tmp_path, tiny):
    source = folder_of(tmp_path / "photos", [f"{i}.png" for i in (0, 2, 4, 6, 8)])
    out = tmp_path / "emb"
    assert embed(source, out, tiny, shard_size=2, workers=0).embedded == 5
    (source / "3.png").write_bytes(png(100))  # sorts into the middle of the first run
    report = embed(source, out, tiny, shard_size=2, workers=0)
    assert (report.embedded, report.total_embedded) == (1, 6)
    rows = rows_by_key(out)
    assert sorted(rows) == ["0.png", "2.png", "3.png", "4.png", "6.png", "8.png"]
    assert all(len(shas) == 1 for shas in rows.values()), rows
    assert embed(source, out, tiny, shard_size=2, workers=0).embedded == 0

    (source / "6.png").write_bytes(png(200))  # changed content, same name: its old row leaves
    (source / "8.png").write_bytes(png(300))  # and the shard that held only this one goes
    report = embed(source, out, tiny, shard_size=2, workers=0)
    assert (report.embedded, report.total_embedded) == (2, 6)
    import hashlib

    rows = rows_by_key(out)
    assert all(len(shas) == 1 for shas in rows.values()), rows
    assert rows["6.png"] == [hashlib.sha256(png(200)).hexdigest()]
    assert rows["8.png"] == [hashlib.sha256(png(300)).hexdigest()]
    assert len(list(out.glob("*.parquet"))) == 4  # 0+2, 4+6 less 6, 8 removed, 3, 6+8
    ingest(out, tmp_path / "idx")
    with Index.open(tmp_path / "idx") as index:
        assert len(index) == 6
        sha = {p.name: index.sha256_of(i) for i, p in zip(*index.load_items()[:2])}
    assert sha["6.png"] == hashlib.sha256(png(200)).hexdigest()
    for name in ("0.png", "3.png", "8.png"):
        assert sha[name] == rows[name][0]


# -- 2. shard keys are names, never paths to open ----------------------------------------------


def test_tar_and_parquet_keys_that_leave_the_source_are_failures(tmp_path, tiny):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / "000000.tar", "w") as tar:
        for name, data in (("good.png", png(1)), ("../../escape.png", png(2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = embed(tars, tmp_path / "emb-tar", tiny, workers=0)
    assert report.embedded == 1
    assert [f.path for f in report.failed] == ["000000.tar/../../escape"]
    assert "key has empty, '.' or '..' parts" in report.failed[0].reason

    victim = tmp_path / "elsewhere" / "secret.png"
    victim.parent.mkdir()
    victim.write_bytes(png(3))
    rows = tmp_path / "rows"
    rows.mkdir()
    pq.write_table(pa.table({"key": [str(victim), "fine"], "jpg": [png(4), png(5)]}), rows / "00000.parquet")
    report = embed(rows, tmp_path / "emb-pq", tiny, workers=0)
    assert report.embedded == 1 and [f.path for f in report.failed] == [str(victim)]
    assert "an absolute path" in report.failed[0].reason


def hostile_shards(folder: Path, tiny, keys: list[str]) -> Path:
    """Shards written by another tool: ``keys`` for rows of random unit vectors of tiny's width."""
    info = EncoderInfo.of(tiny)
    vectors = np.random.default_rng(0).normal(size=(len(keys), info.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    folder.mkdir()
    shard = ShardData("part-0", keys, ["0" * 64] * len(keys), [8] * len(keys), [8] * len(keys), [10] * len(keys), vectors, None)
    write_shard(folder, info, shard)
    write_manifest(folder, info, {"kind": "parquet", "root": str(folder)}, ["part-0"])
    return folder


def test_ingest_refuses_keys_that_are_paths_before_writing(tmp_path, tiny):
    for number, key in enumerate(["/etc/passwd", "000000.tar/../../escape", "a//b"]):
        shards = hostile_shards(tmp_path / f"emb{number}", tiny, ["fine", key])
        with pytest.raises(ClipxferError, match="keys name items below the source root"):
            ingest(shards, tmp_path / f"idx{number}")
        assert not (tmp_path / f"idx{number}").exists()


@pytest.fixture()
def app_client():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipxfer.serve import ServeConfig, create_app

    def make(index: Path):
        return TestClient(create_app(ServeConfig(index=index)), base_url="http://127.0.0.1")

    return make


def test_image_route_serves_only_the_indexed_bytes(tmp_path, tiny, app_client):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A parquet row whose key names a file that exists below the root with other bytes.
    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / "other.png").write_bytes(png(7))
    pq.write_table(pa.table({"key": ["other.png"], "jpg": [png(8)]}), rows / "00000.parquet")
    embed(rows / "00000.parquet", tmp_path / "emb", tiny, workers=0)
    ingest(tmp_path / "emb", tmp_path / "idx")
    # A folder index: its files are served as before, and refused once they change.
    photos = folder_of(tmp_path / "photos", ["a.png", "b.png"])
    Index.update(photos, tiny, path=tmp_path / "folder-idx", workers=0)
    with app_client(tmp_path / "idx") as client:
        item = client.get("/api/search", params={"q": "x", "k": 1}).json()[0]["id"]
        for route in ("image", "thumb"):  # the thumbnail is made from the indexed bytes too, never another file
            response = client.get(f"/api/{route}/{item}")
            assert response.status_code == 404 and "can no longer be read" in response.json()["detail"], route
    with app_client(tmp_path / "folder-idx") as client:
        ids = {hit["name"]: hit["id"] for hit in client.get("/api/search", params={"q": "x", "k": 2}).json()}
        assert client.get(f"/api/image/{ids['a.png']}").status_code == 200
        assert client.get(f"/api/thumb/{ids['a.png']}").status_code == 200
        (photos / "b.png").write_bytes(png(9))
        for route in ("image", "thumb"):
            response = client.get(f"/api/{route}/{ids['b.png']}")
            assert response.status_code == 404 and "changed since indexing" in response.json()["detail"], route


# -- 3, 4. ingest checks the manifest and every shard before writing ---------------------------


@pytest.fixture()
def embedded(tmp_path, tiny) -> Path:
    source = folder_of(tmp_path / "photos", [f"{i}.png" for i in range(4)])
    embed(source, tmp_path / "emb", tiny, shard_size=2, workers=0)
    return tmp_path / "emb"


def edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    for name in [k for k, v in changes.items() if v is None]:
        del manifest[name]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def add_foreign_shard(folder: Path, info: EncoderInfo, name: str = "part-foreign") -> None:
    """A shard written by another encoder, listed in ``folder``'s manifest."""
    vectors = np.eye(2, info.dim, dtype=np.float32)
    shard = ShardData(name, ["x.png", "y.png"], ["1" * 64, "2" * 64], [8, 8], [8, 8], [9, 9], vectors, None)
    write_shard(folder, info, shard)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"].append({"name": name, "file": f"{name}.parquet", "count": 2, "failed": 0})
    (folder / "manifest.json").write_text(json.dumps(manifest))


def index_rows(path: Path) -> list[tuple]:
    with Index.open(path) as index:
        ids, paths, encoding = index.load_items()
        return [(int(i), str(p), encoding.embeddings[n].tobytes()) for n, (i, p) in enumerate(zip(ids, paths))]


def test_a_shard_of_another_encoder_is_refused(tmp_path, tiny, embedded):
    info = EncoderInfo.of(tiny)
    add_foreign_shard(embedded, EncoderInfo(info.model_id + "+ft-0123456789ab", info.model_spec, info.dim, info.feature_dim))
    with pytest.raises(ClipxferError, match=r"part-foreign.parquet holds embeddings of .*\+ft-0123456789ab"):
        ingest(embedded, tmp_path / "idx")


def test_a_shard_of_another_width_leaves_the_index_as_it_was(tmp_path, tiny, embedded):
    ingest(embedded, tmp_path / "idx")
    before = index_rows(tmp_path / "idx")
    info = EncoderInfo.of(tiny)
    add_foreign_shard(embedded, EncoderInfo(info.model_id, info.model_spec, info.dim // 2, info.dim // 2))
    result = CliRunner().invoke(main, ["index", "--from-embeddings", str(embedded), "--index", str(tmp_path / "idx")])
    assert "part-foreign.parquet: vectors embedding" in one_line(result)
    assert index_rows(tmp_path / "idx") == before
    with Index.open(tmp_path / "idx") as index:
        assert len(index.search_text("x", 2, tiny)) == 2


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"dim": 32}, "'features' is False"),
        ({"dim": 32, "feature_dim": 32}, "vectors embedding 64, the manifest says embedding 32"),
        ({"model_id": "open_clip:ViT-B-32/openai"}, "holds embeddings of"),
        ({"feature_dim": 99}, "'features' is False"),
        ({"features": True, "feature_dim": 99}, "vectors embedding"),
        ({"dim": None}, "no 'dim'"),
        ({"shards": "x"}, "'shards' is \"x\""),
        ({"shards": ["x"]}, "shard entry"),
        ({"shards": [{"name": "../part", "file": "../part.parquet"}]}, "shard entry"),
        ({"count": "many"}, "'count'"),
    ],
)
def test_a_manifest_that_disagrees_with_its_shards_is_one_line(tmp_path, embedded, changes, words):
    edit_manifest(embedded, **changes)
    result = CliRunner().invoke(main, ["index", "--from-embeddings", str(embedded), "--index", str(tmp_path / "idx")])
    assert words in one_line(result)
    assert not (tmp_path / "idx").exists()


def test_an_index_of_another_width_with_the_same_id_is_refused(tmp_path, tiny, embedded):
    ingest(embedded, tmp_path / "idx")
    other = hostile_shards(tmp_path / "other", tiny, ["9.png"])
    edit_manifest(other, source={"kind": "folder", "root": str(tmp_path / "photos")})
    import sqlite3

    with sqlite3.connect(tmp_path / "idx" / DB_FILE) as conn:  # as if built by an edited manifest
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'feature_dim'")
    with pytest.raises(ClipxferError, match="has feature_dim 99"):
        ingest(other, tmp_path / "idx")


# -- 5. file names that are not UTF-8 ----------------------------------------------------------


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="needs a file system that takes any bytes")
def test_non_utf8_names_round_trip_through_shards_and_the_index(tmp_path, tiny):
    source = tmp_path / "photos"
    source.mkdir()
    odd = os.fsdecode(b"caf\xe9.png")
    (source / odd).write_bytes(png(1))
    (source / "plain.png").write_bytes(png(2))
    result = CliRunner().invoke(main, ["embed", str(source), "--out", str(tmp_path / "emb"), "--model", "tiny", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert sorted(rows_by_key(tmp_path / "emb")) == sorted([odd, "plain.png"])
    ingest(tmp_path / "emb", tmp_path / "idx")
    with Index.open(tmp_path / "idx") as index:
        assert sorted(p.name for p in index.load_items()[1]) == sorted([odd, "plain.png"])
    # An index of the folder itself exports the same keys, and they come back as the same paths.
    Index.update(source, tiny, path=tmp_path / "folder-idx", workers=0)
    result = CliRunner().invoke(main, ["export-embeddings", "--index", str(tmp_path / "folder-idx"), "--out", str(tmp_path / "exp")])
    assert result.exit_code == 0, result.output
    assert sorted(rows_by_key(tmp_path / "exp")) == sorted([odd, "plain.png"])
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "exp" / "part-000000.parquet")
    shown = dict(zip(table.column("key").to_pylist(), table.column("key_bytes").to_pylist()))
    assert shown == {"caf\\xe9.png": b"caf\xe9.png", "plain.png": None}
    ingest(tmp_path / "exp", tmp_path / "idx2")
    with Index.open(tmp_path / "idx2") as index:
        assert (source / odd) in index.load_items()[1]


# -- 6. Ray addresses --------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "address, words",
    [
        ("nohostport", "not HOST:PORT"),
        ("127.0.0.1:abc", "the port must be a number"),
        ("127.0.0.1:99999", "the port must be a number"),
        ("http://127.0.0.1:6379", "unknown scheme 'http://'"),
        ("127.0.0.1:{port}", "cannot connect"),
        ("no-such-host.invalid:6379", "no-such-host.invalid"),
    ],
)
def test_bad_ray_addresses_are_one_line_before_any_work(tmp_path, address, words):
    pytest.importorskip("ray.data")
    source = folder_of(tmp_path / "photos", ["a.png"])
    args = ["embed", str(source), "--out", str(tmp_path / "emb"), "--model", "tiny", "--engine", "ray"]
    result = CliRunner().invoke(main, args + ["--ray-address", address.format(port=closed_port()), "--ray-timeout", "5"])
    assert words in one_line(result)
    assert not (tmp_path / "emb").exists()


def test_ray_client_address_without_the_client_extra_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("ray.data")
    import importlib.util

    from clipxfer.embed.ray_engine import check_ray_address

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else find_spec(name, *a))
    with pytest.raises(ClipxferError, match=r"pip install 'ray\[client\]'"):
        check_ray_address("ray://127.0.0.1:10001", 5)
    with pytest.raises(ClipxferError, match="--ray-timeout must be a positive"):
        check_ray_address("127.0.0.1:6379", 0)


def test_export_then_ingest_keeps_every_row(tmp_path, tiny):
    """The shard columns added here (key_bytes) keep the plain round trip exact."""
    source = folder_of(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    Index.update(source, tiny, path=tmp_path / "idx", workers=0)
    export_embeddings(tmp_path / "idx", tmp_path / "exp", rows_per_shard=2)
    ingest(tmp_path / "exp", tmp_path / "idx2")
    assert [r[1:] for r in index_rows(tmp_path / "idx")] == [r[1:] for r in index_rows(tmp_path / "idx2")]
    shutil.rmtree(tmp_path / "idx2")


def test_a_port_that_is_not_a_ray_head_times_out_with_one_line(tmp_path):
    """Ray retries such an address for many minutes; --ray-timeout gives up in seconds. A separate
    process, as the abandoned join leaves Ray half started in it."""
    import subprocess
    import sys

    pytest.importorskip("ray.data")
    source = folder_of(tmp_path / "photos", ["a.png"])
    with socket.socket() as listener:  # accepts connections (backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = "127.0.0.1:%d" % listener.getsockname()[1]
        args = ["embed", str(source), "--out", str(tmp_path / "emb"), "--model", "tiny", "--engine", "ray"]
        done = subprocess.run(
            [sys.executable, "-m", "clipxfer", *args, "--ray-address", address, "--ray-timeout", "3"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no Ray cluster joined within 3 s" in done.stderr and "Traceback" not in done.stderr
