"""The labelling, thumbnail and storage side of ``clipxfer serve`` under attack: two servers on one
label file, formula cells, stale and concurrent thumbnails, a read-only index, undo across class
edits, an unbounded diversity, and file names that are not UTF-8."""

from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipxfer.csvcells import cell_text, safe_cell
from clipxfer.errors import ClipxferError
from clipxfer.paths import atomic_write_bytes
from clipxfer.serve.active import diverse_top
from clipxfer.serve.labels import LabelsNotWritable, LabelStore
from clipxfer.serve.thumbnails import ThumbnailCache, render_jpeg

LOCAL = "http://127.0.0.1"  # the server refuses foreign Host names (TestClient says "testserver") without a token

FORMULAS = ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd", "'quoted", "''x"]


def write_photo(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (64, 48), colour).save(path, format="JPEG")
    return path


def fail_writes_under(folder: Path, monkeypatch) -> None:
    """Make every write below ``folder`` fail as on a read-only file system. chmod does not stop
    root (where CI runs), so the refusal is made where Python asks the OS to write."""
    folder = os.path.realpath(folder)

    def inside(path) -> bool:
        try:
            return os.path.realpath(os.fspath(path)).startswith(folder + os.sep) or os.path.realpath(path) == folder
        except TypeError:  # a file descriptor
            return False

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open, real_os_open, real_mkdir, real_replace = builtins.open, os.open, os.mkdir, os.replace

    def guarded_open(file, mode="r", *args, **kwargs):
        if inside(file) and any(flag in mode for flag in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def guarded_replace(src, dst, *args, **kwargs):
        if inside(dst):
            refuse(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    monkeypatch.setattr(os, "replace", guarded_replace)


# ------------------------------------------------------------------ the label file, two writers


def test_a_second_writer_is_refused_and_never_loses_acknowledged_labels(tmp_path):
    path = tmp_path / "labels.json"
    first = LabelStore(path)
    first.set_classes(["cat", "dog"])
    second = LabelStore(path)  # a second server started on the same labels
    first.set_label(1, "/a/1.jpg", "cat")  # acknowledged
    with pytest.raises(LabelsNotWritable, match=r"another clipxfer serve \(pid \d+\)"):
        second.set_label(2, "/a/2.jpg", "dog")
    assert second.labels == {}  # the refused change is not half-made in memory either
    first.set_label(3, "/a/3.jpg", "dog")
    first.close()  # the first server stops
    second.set_label(2, "/a/2.jpg", "dog")  # now it writes, starting from what the first wrote
    assert LabelStore(path).labels == {1: ("/a/1.jpg", "cat"), 2: ("/a/2.jpg", "dog"), 3: ("/a/3.jpg", "dog")}


def test_another_process_is_refused_while_a_server_holds_the_labels(tmp_path):
    path = tmp_path / "labels.json"
    store = LabelStore(path)
    store.set_classes(["cat", "dog"])
    store.set_label(1, "/a/1.jpg", "cat")
    script = (
        "import sys; from clipxfer.serve.labels import LabelStore, LabelsNotWritable\n"
        "try:\n    LabelStore(sys.argv[1]).set_label(2, '/a/2.jpg', 'dog')\n"
        "except LabelsNotWritable as exc:\n    print(exc); sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    refused = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env)
    assert refused.returncode == 3, refused.stderr
    assert f"pid {os.getpid()}" in refused.stdout and "--labels" in refused.stdout
    store.close()
    accepted = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert LabelStore(path).labels == {1: ("/a/1.jpg", "cat"), 2: ("/a/2.jpg", "dog")}


# ------------------------------------------------------------------ CSV formula injection


@pytest.mark.parametrize("text", [*FORMULAS, "plain", "", "a=b", "'", "x'"])
def test_safe_cells_never_start_a_formula_and_read_back_exactly(text):
    cell = safe_cell(text)
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert cell_text(cell) == text


def test_label_manifest_cells_are_text_in_spreadsheets_and_read_back_by_probe(tmp_path):
    from clipxfer.datasets.labelled import from_csv

    names = [name for name in FORMULAS if name == name.strip()]  # class names are stripped
    store = LabelStore(tmp_path / "labels.json")
    store.set_classes(names)
    for i, name in enumerate(names):
        store.set_label(i, str(write_photo(tmp_path / f"{i}.jpg", (i * 30, 0, 0))), name)
    text = store.manifest_csv()
    rows = list(csv.reader(io.StringIO(text)))[1:]
    assert rows and all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for row in rows for cell in row)
    manifest = tmp_path / "labels.csv"
    manifest.write_text(text)
    read = from_csv(manifest)
    assert [read.classnames[label] for label in read.labels] == names


def test_drawn_split_manifests_mark_formula_cells(tmp_path):
    from clipxfer.datasets.labelled import LabelledImages, from_csv
    from clipxfer.datasets.splits import FewShotSplit

    names = ['=HYPERLINK("http://evil.example","x")', "@evil"]  # '|' separates multi-labels, so not in a name
    sources = [write_photo(tmp_path / f"-{i}.jpg", (0, i * 20, 0)) for i in range(8)]
    dataset = LabelledImages("t", names, sources, np.array([0, 1] * 4), [p.name for p in sources])
    split = FewShotSplit(np.arange(4), np.arange(4, 6), np.arange(6, 8), shots=2, seed=0)
    manifest = split.write_manifest(dataset, tmp_path / "split.csv")
    cells = [cell for row in csv.reader(manifest.open()) for cell in row]
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells)
    read = from_csv(manifest)
    assert set(read.classnames) == set(names) and read.sources == sources


# ------------------------------------------------------------------ thumbnails


def test_a_replaced_file_with_an_older_mtime_gets_a_new_thumbnail(tmp_path):
    source = write_photo(tmp_path / "a.jpg", (250, 0, 0))
    cache = ThumbnailCache(tmp_path / "index")
    first = cache.thumbnail(7, source).read_bytes()
    stamp = source.stat().st_mtime_ns
    write_photo(source, (0, 0, 250))  # re-indexed content, restored with an older clock
    os.utime(source, ns=(stamp - 10**9, stamp - 10**9))
    second = cache.thumbnail(7, source)
    assert second.read_bytes() == render_jpeg(source, cache.size) != first
    assert [p.name for p in (tmp_path / "index" / "thumbnails").iterdir()] == [second.name]  # old one dropped


def test_concurrent_first_requests_for_one_thumbnail_all_succeed(tmp_path):
    source = write_photo(tmp_path / "a.jpg", (10, 200, 10))
    cache = ThumbnailCache(tmp_path / "index")
    start = threading.Barrier(20)
    results: list = []

    def request():
        start.wait()
        try:
            results.append(cache.thumbnail(3, source).read_bytes())
        except Exception as exc:  # noqa: BLE001 - the failure is what the test reports
            results.append(exc)

    threads = [threading.Thread(target=request) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(r, bytes) and r == render_jpeg(source, cache.size) for r in results), results
    assert not list((tmp_path / "index" / "thumbnails").glob(".*"))  # no temporary file left


def test_concurrent_atomic_writes_of_one_file_each_land_whole(tmp_path):
    target = tmp_path / "f.bin"
    start = threading.Barrier(20)
    errors: list = []

    def write(i):
        start.wait()
        try:
            atomic_write_bytes(target, bytes([i]) * 2_000_000)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    data = target.read_bytes()
    assert not errors and len(data) == 2_000_000 and len(set(data)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_thumbnails_of_a_read_only_index_come_from_a_temporary_folder(tmp_path, monkeypatch):
    source = write_photo(tmp_path / "a.jpg", (0, 0, 0))
    index = tmp_path / "index"
    index.mkdir()
    fail_writes_under(index, monkeypatch)
    cache = ThumbnailCache(index)
    thumb = cache.thumbnail(1, source)
    assert not thumb.is_relative_to(index) and thumb.read_bytes() == render_jpeg(source, 256)
    cache.close()
    assert not thumb.parent.exists()  # the temporary folder does not outlive the cache


def test_an_unclosed_cache_removes_its_temporary_folder_when_collected(tmp_path, monkeypatch):
    import gc

    source = write_photo(tmp_path / "a.jpg", (0, 0, 0))
    index = tmp_path / "index"
    index.mkdir()
    fail_writes_under(index, monkeypatch)
    cache = ThumbnailCache(index)
    folder = cache.thumbnail(1, source).parent
    del cache
    gc.collect()
    assert not folder.exists()


def test_a_stopped_server_leaves_no_temporary_thumbnail_folder(sample_photos_dir, lite, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from clipxfer.index import Index
    from clipxfer.serve import ServeConfig, create_app

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sample_photos_dir / "chelsea.jpg", photos / "chelsea.jpg")
    Index.update(photos, lite, path=tmp_path / "index", workers=0)
    fail_writes_under(tmp_path / "index", monkeypatch)
    with TestClient(create_app(ServeConfig(index=tmp_path / "index", labels=tmp_path / "labels.json")),
                    base_url=LOCAL) as client:
        item_id = client.get("/api/search", params={"q": "a cat", "k": 1}).json()[0]["id"]
        assert client.get(f"/api/thumb/{item_id}").status_code == 200
        folder = client.app.state.clipxfer.thumbnails.folder
        assert folder.is_dir() and not folder.is_relative_to(tmp_path / "index")
    assert not folder.exists()


def test_labels_in_a_read_only_folder_are_refused_and_memory_is_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "labels.json"
    store = LabelStore(path)
    store.set_classes(["cat", "dog"])
    store.set_label(1, "/a/1.jpg", "cat")
    on_disk = path.read_bytes()
    fail_writes_under(tmp_path, monkeypatch)
    with pytest.raises(LabelsNotWritable, match="cannot be written.*--labels"):
        store.set_label(2, "/a/2.jpg", "dog")
    with pytest.raises(LabelsNotWritable):
        store.undo()
    with pytest.raises(LabelsNotWritable):
        store.set_classes(["cat", "dog", "bird"])
    assert store.snapshot() == (["cat", "dog"], {1: ("/a/1.jpg", "cat")}) and path.read_bytes() == on_disk
    with pytest.raises(LabelsNotWritable, match="read-only"):  # a server started on the read-only folder
        LabelStore(path).set_label(2, "/a/2.jpg", "dog")


# ------------------------------------------------------------------ undo and class edits


def test_undo_after_a_class_was_removed_keeps_labels_and_classes_consistent(tmp_path):
    store = LabelStore(tmp_path / "labels.json")
    store.set_classes(["a", "b", "c"])
    store.set_label(1, "/x/1.jpg", "c")
    store.set_label(1, "/x/1.jpg", "a")
    store.set_classes(["a", "b"])  # c has no labels any more: it may go

    def consistent():
        classes, labels = store.snapshot()
        assert {label for _, label in labels.values()} <= set(classes)

    assert store.undo() == "classes"  # the class edit is undone first
    consistent()
    assert store.classes == ["a", "b", "c"]
    assert store.undo() == 1 and store.labels[1][1] == "c"
    consistent()
    store.set_classes(["a", "b", "c", "d"])  # the class list can still be set
    assert json.loads((tmp_path / "labels.json").read_text())["classes"] == ["a", "b", "c", "d"]


def test_undo_of_a_legacy_step_whose_class_is_gone_is_refused(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"format": "clipxfer-labels/1", "classes": ["a", "b"], "labels": [],
                                "history": [{"id": 1, "path": "/x/1.jpg", "before": "c"}]}))
    store = LabelStore(path)
    with pytest.raises(ClipxferError, match="class 'c' was removed"):
        store.undo()
    assert store.labels == {} and store.classes == ["a", "b"]


# ------------------------------------------------------------------ suggestions


@pytest.mark.parametrize("diversity", [float("inf"), float("nan"), -1.0, 11.0])
def test_diversity_must_be_finite_and_bounded(diversity):
    vectors = np.eye(4, dtype=np.float32)
    with pytest.raises(ClipxferError, match="diversity must be a number from 0 to 10"):
        diverse_top(np.array([0.9, 0.8, 0.7, 0.6]), vectors, 3, diversity)


# ------------------------------------------------------------------ file names that are not UTF-8


def test_manifest_of_a_file_name_that_is_not_utf8_encodes(tmp_path):
    store = LabelStore(tmp_path / "labels.json")
    store.set_classes(["cat", "dog"])
    store.set_label(1, os.fsdecode(b"/a/\xff.jpg"), "cat")
    text = LabelStore(tmp_path / "labels.json").manifest_csv()
    assert "/a/\\xff.jpg" in text.encode("utf-8").decode("utf-8")


# ------------------------------------------------------------------ through the server


@pytest.mark.slow
def test_server_labels_on_a_read_only_index_two_servers_and_bad_input(sample_photo_index, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipxfer.serve import ServeConfig, create_app

    index = tmp_path / "index"
    shutil.copytree(sample_photo_index, index, ignore=shutil.ignore_patterns("thumbnails", "labels.json*"))
    config = ServeConfig(index=index)
    with TestClient(create_app(config), base_url=LOCAL) as first, TestClient(create_app(config), base_url=LOCAL) as second:
        ids = [hit["id"] for hit in first.get("/api/search", params={"q": "a", "k": 3}).json()]
        assert first.put("/api/labels/classes", json={"classes": ["=HYPERLINK(\"x\")", "b"]}).status_code == 200
        assert first.put(f"/api/labels/{ids[0]}", json={"label": "b"}).status_code == 200
        refused = second.put(f"/api/labels/{ids[1]}", json={"label": "b"})
        assert refused.status_code == 409 and "another clipxfer serve" in refused.json()["detail"]
        for value in ("inf", "nan", "-1", "11"):
            answer = first.get("/api/labels/suggest", params={"diversity": value})
            assert answer.status_code == 422 and "diversity must be" in answer.json()["detail"], answer.text
        assert first.put(f"/api/labels/{ids[1]}", json={"label": "=HYPERLINK(\"x\")"}).status_code == 200
        manifest = first.get("/api/labels/manifest.csv")
        assert manifest.status_code == 200
        assert sorted(row["label"] for row in csv.DictReader(io.StringIO(manifest.text))) == ["'=HYPERLINK(\"x\")", "b"]

        fail_writes_under(index, monkeypatch)  # the index folder turns read-only
        before = first.get("/api/labels").json()["labels"]
        refused = first.put(f"/api/labels/{ids[2]}", json={"label": "b"})
        assert refused.status_code == 409 and "cannot be written" in refused.json()["detail"]
        assert first.get("/api/labels").json()["labels"] == before
        thumb = first.get(f"/api/thumb/{ids[2]}")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


@pytest.mark.slow
def test_server_exports_labels_of_file_names_that_are_not_utf8(tmp_path, lite):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipxfer.index import Index
    from clipxfer.serve import ServeConfig, create_app

    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(Path(os.fsdecode(bytes(photos) + b"/caf\xe9.jpg")), (200, 10, 10))
    write_photo(photos / "plain.jpg", (10, 10, 200))
    Index.update(photos, lite, path=tmp_path / "index", workers=0)
    with TestClient(create_app(ServeConfig(index=tmp_path / "index")), base_url=LOCAL) as client:
        with Index.open(tmp_path / "index") as idx:
            ids, paths, _ = idx.load_items()
        odd = int(ids[[p.name.startswith("caf") and p.name != "plain.jpg" for p in paths].index(True)])
        assert client.put("/api/labels/classes", json={"classes": ["red", "blue"]}).status_code == 200
        assert client.put(f"/api/labels/{odd}", json={"label": "red"}).status_code == 200
        manifest = client.get("/api/labels/manifest.csv")
        assert manifest.status_code == 200 and "caf\\xe9.jpg,red" in manifest.text
