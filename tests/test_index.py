"""The image index: incremental updates, bad files, crash safety, locking, search correctness."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipxfer.errors import ClipxferError
from clipxfer.index import Index
from clipxfer.index.layout import DB_FILE
from clipxfer.index.lock import WriterLock

from .conftest import random_images


def write_images(folder: Path, count: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, array in enumerate(random_images(count, seed)):
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def stored_paths(index_path: Path) -> list[str]:
    with sqlite3.connect(index_path / DB_FILE) as conn:
        return [row[0] for row in conn.execute("SELECT path FROM items ORDER BY path")]


def update(root, index_path, model="tiny", **kwargs):
    kwargs.setdefault("workers", 0)
    return Index.update(root, model, path=index_path, **kwargs)


def test_incremental_add_modify_delete_rename(tmp_path, tiny):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    paths = write_images(root, 6)
    first = update(root, index_path, tiny)
    assert (first.added, first.updated, first.moved, first.removed, first.unchanged) == (6, 0, 0, 0, 0)
    with Index.open(index_path) as idx:
        before_paths, before_encoding = idx.load_encoding()
        before = dict(zip(before_paths, before_encoding.embeddings))
        assert len(idx) == 6 and idx.model_id == tiny.id and idx.root == root.resolve()

    again = update(root, index_path, tiny)
    assert (again.added, again.updated, again.moved, again.removed, again.unchanged) == (0, 0, 0, 0, 6)

    (root / "sub").mkdir()
    paths[0].rename(root / "sub" / "renamed.png")  # moved + renamed
    paths[1].unlink()  # deleted
    Image.fromarray(random_images(1, seed=99)[0]).save(paths[2])  # modified in place
    os.utime(paths[2], ns=(time.time_ns(), time.time_ns() + 10**9))
    write_images(root, 2, seed=7, prefix="new")  # added

    class CountingEncoder:
        """tiny, counting how many images it is asked to encode."""

        def __init__(self, inner):
            self.inner, self.encoded = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def encode_pixels(self, pixels):
            self.encoded += len(pixels)
            return self.inner.encode_pixels(pixels)

    counting = CountingEncoder(tiny)
    report = update(root, index_path, counting)
    assert (report.added, report.updated, report.moved, report.removed, report.unchanged) == (2, 1, 1, 1, 3)
    assert counting.encoded == 3  # the moved file was not re-encoded
    assert stored_paths(index_path) == sorted(
        ["sub/renamed.png", "img002.png", "img003.png", "img004.png", "img005.png", "new000.png", "new001.png"]
    )
    with Index.open(index_path) as idx:
        after_paths, after = idx.load_encoding()
        by_path = dict(zip(after_paths, after.embeddings))
        np.testing.assert_array_equal(by_path[root.resolve() / "sub" / "renamed.png"], before[paths[0].resolve()])
        assert not np.allclose(by_path[paths[2].resolve()], before[paths[2].resolve()])
        # The FAISS side agrees with SQLite: every stored vector finds itself first.
        for path, vector in by_path.items():
            assert idx.search_vectors(vector, k=1)[0][0].path == path


def _save_exif_rotated(path: Path) -> None:
    """A landscape JPEG, red left half and blue right half, tagged 'rotate 90 clockwise'."""
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, :40] = (255, 0, 0)
    array[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(path, exif=exif, quality=95)


def make_bad_and_odd_files(folder: Path) -> dict[str, str]:
    """Every kind of awkward file; returns name -> 'ok' or an expected reason fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = random_images(1, seed=3, size=(64, 48))[0]
    Image.fromarray(rgb).save(folder / "good.jpg", quality=90)
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is text, not a photo")
    Image.fromarray(rgb).save(folder / "bomb.png")  # over the patched MAX_PIXELS below
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif")
    rgba = np.zeros((48, 64, 4), np.uint8)  # fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    _save_exif_rotated(folder / "rotated.jpg")
    return {
        "good.jpg": "ok",
        "cmyk.jpg": "ok",
        "deep16.png": "ok",
        "palette.gif": "ok",
        "transparent.png": "ok",
        "rotated.jpg": "ok",
        "truncated.jpg": "corrupt or truncated",
        "corrupt.png": "",
        "zero.png": "empty file",
        "notes.jpg": "not an image",
        "bomb.png": "decompression bomb",
    }


def test_bad_files_are_skipped_with_a_reason_and_odd_ones_indexed(tmp_path, tiny, monkeypatch):
    import clipxfer.images

    root, index_path = tmp_path / "photos", tmp_path / "index"
    expected = make_bad_and_odd_files(root)
    # Any image of 100x100 pixels or more counts as a bomb here; only bomb.png is that big.
    Image.fromarray(random_images(1, seed=4, size=(100, 100))[0]).save(root / "bomb.png")
    monkeypatch.setattr(clipxfer.images, "MAX_PIXELS", 100 * 100 - 1)

    report = update(root, index_path, tiny)
    failed = {f.path.name: f.reason for f in report.failed}
    ok = sorted(name for name, want in expected.items() if want == "ok")
    assert stored_paths(index_path) == ok
    assert sorted(failed) == sorted(set(expected) - set(ok))
    for name, reason in failed.items():
        assert expected[name] in reason and "\n" not in reason
    assert report.to_dict()["failed_count"] == len(failed)

    with sqlite3.connect(index_path / DB_FILE) as conn:
        width, height = conn.execute("SELECT width, height FROM items WHERE path='rotated.jpg'").fetchone()
    assert (width, height) == (40, 80)  # upright: portrait

    # A second run keeps everything indexed and reports the same failures.
    again = update(root, index_path, tiny)
    assert again.unchanged == len(ok) and len(again.failed) == len(failed)


def test_odd_images_decode_correctly(tmp_path):
    from clipxfer.images import load_model_input

    make_bad_and_odd_files(tmp_path)
    upright = load_model_input(tmp_path / "rotated.jpg", 32).astype(int)
    # Rotated 90 degrees clockwise, the red left half is on top.
    assert upright[2, 16, 0] > 200 and upright[2, 16, 2] < 60
    assert upright[29, 16, 2] > 200 and upright[29, 16, 0] < 60
    transparent = load_model_input(tmp_path / "transparent.png", 32)
    assert (transparent == 255).all()  # composited on white, not black
    deep = load_model_input(tmp_path / "deep16.png", 32)
    assert deep.min() < 30 and deep.max() > 225  # the whole 16-bit range used, not clipped
    assert load_model_input(tmp_path / "cmyk.jpg", 32).shape == (32, 32, 3)


def test_fail_fast_stops_and_keeps_what_was_done(tmp_path, tiny):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 3)
    (root / "zz-broken.png").write_bytes(b"")
    with pytest.raises(ClipxferError, match="zz-broken.png: empty file"):
        update(root, index_path, tiny, fail_fast=True, batch_size=2)
    with Index.open(index_path) as idx:
        assert len(idx) >= 2


KILL_SCRIPT = """
import sys, time
from clipxfer.encoders import load_encoder
from clipxfer.index import Index

def main():
    encoder = load_encoder("tiny", "cpu", "fp32")
    original = encoder.encode_pixels

    def slow(pixels):  # slow enough for the test to kill us in the middle
        time.sleep(0.15)
        return original(pixels)

    encoder.encode_pixels = slow
    Index.update(sys.argv[1], encoder, path=sys.argv[2], workers=int(sys.argv[3]), batch_size=4)

if __name__ == "__main__":
    main()
"""


def wait_until_committed(proc, index_path: Path, rows: int, timeout: float = 120) -> None:
    """Poll the index database until ``rows`` items are committed, ``proc`` ends, or time is up."""
    committed, deadline = 0, time.time() + timeout
    while committed < rows and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if (index_path / DB_FILE).is_file():
            try:
                with sqlite3.connect(index_path / DB_FILE, timeout=5) as conn:
                    committed = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            except sqlite3.OperationalError:  # schema not created yet
                pass


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_during_indexing_then_resume(tmp_path, tiny, workers):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    paths = write_images(root, 60)
    script = tmp_path / "run_index.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(index_path), str(workers)])
    try:
        wait_until_committed(proc, index_path, rows=8)
        assert proc.poll() is None, "indexing finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with Index.open(index_path) as idx:  # loads, with what was committed, and searches
        kept = len(idx)
        assert 8 <= kept < 60
        assert len(idx.search_vectors(np.eye(tiny.dim, dtype=np.float32)[0], k=100)[0]) == kept

    report = update(root, index_path, tiny)
    assert report.added == 60 - kept and report.unchanged == kept
    assert stored_paths(index_path) == sorted(p.name for p in paths)  # each file exactly once
    with Index.open(index_path) as idx:
        _, encoding = idx.load_encoding()
        hits = idx.search_vectors(encoding.embeddings, k=1)
        assert [h[0].path.name for h in hits] == sorted(p.name for p in paths)


def test_worker_processes_give_the_same_vectors(tmp_path, tiny):
    from clipxfer.encoders.pipeline import EncodedBatch, encode_files

    paths = write_images(tmp_path, 40)
    (tmp_path / "bad.png").write_bytes(b"nope")
    inline = list(encode_files(tiny, paths + [tmp_path / "bad.png"], batch_size=16, workers=0))
    pooled = list(encode_files(tiny, paths + [tmp_path / "bad.png"], batch_size=16, workers=2))
    rows = lambda items: np.concatenate([b.encoding.embeddings for b in items if isinstance(b, EncodedBatch)])
    np.testing.assert_allclose(rows(inline), rows(pooled), atol=1e-6)
    assert [f.path.name for f in pooled if not isinstance(f, EncodedBatch)] == ["bad.png"]


def test_second_writer_is_refused(tmp_path, tiny):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 2)
    index_path.mkdir()
    with WriterLock(index_path):
        with pytest.raises(ClipxferError, match="being updated by another process"):
            update(root, index_path, tiny)
    assert update(root, index_path, tiny).added == 2  # the lock is released afterwards


class RenamedEncoder:
    """tiny under another id: stands for 'a different model' without loading one."""

    def __init__(self, inner):
        self.inner = inner
        self.id = "open_clip:other-model:random-seed0"

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_model_mismatch_is_refused(tmp_path, tiny):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 2)
    update(root, index_path, tiny)
    other = RenamedEncoder(tiny)
    with pytest.raises(ClipxferError) as err:
        update(root, index_path, other)
    assert tiny.id in str(err.value) and other.id in str(err.value) and "--model tiny" in str(err.value)
    with pytest.raises(ClipxferError, match="--model tiny"):
        update(root, index_path, "lite")
    with Index.open(index_path) as idx:
        with pytest.raises(ClipxferError, match="--model tiny"):
            idx.search_text("a cat", model=other)
        assert len(idx) == 2  # nothing lost
    with pytest.raises(ClipxferError, match="use another --index"):
        update(tmp_path, index_path, tiny)  # another folder into the same index


def test_open_missing_index(tmp_path):
    with pytest.raises(ClipxferError, match="no index at"):
        Index.open(tmp_path / "nothing")


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_search_equals_brute_force(tmp_path, tiny, index_type):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 50)
    update(root, index_path, tiny, index_type=index_type)
    with Index.open(index_path) as idx:
        paths, encoding = idx.load_encoding()
        texts = ["a cat", "a red car", "a photo of the moon"]
        queries = tiny.encode_texts(texts)
        for text, query in zip(texts, queries):
            hits = idx.search_text(text, k=10, model=tiny)
            scores = encoding.embeddings @ query
            brute = dict(zip(paths, scores))
            top = np.sort(scores)[::-1][:10]
            # Each hit carries its true score, and the hits are the true top 10 (up to float ties).
            np.testing.assert_allclose([h.score for h in hits], [brute[h.path] for h in hits], atol=1e-5)
            np.testing.assert_allclose([h.score for h in hits], top, atol=1e-5)
            assert len({h.path for h in hits}) == 10
            assert [h.rank for h in hits] == list(range(1, 11))
        assert idx.info()["index_type"] == index_type
        ranked = np.sort(encoding.embeddings @ queries[0])[::-1]
        high = idx.search_text("a cat", k=50, model=tiny, min_score=float(ranked[2] + ranked[3]) / 2)
        assert len(high) == 3


def test_changing_index_type_and_auto(tmp_path, tiny):
    from clipxfer.index import vectors

    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 20)
    update(root, index_path, tiny)
    update(root, index_path, tiny, index_type="hnsw")
    with Index.open(index_path) as idx:
        assert idx.info()["faiss"] == "HNSW32,Flat"
    update(root, index_path, tiny, index_type="auto")
    with Index.open(index_path) as idx:
        assert (idx.info()["index_type"], idx.info()["faiss"]) == ("auto", "Flat")
    assert vectors.resolve_index_type("auto", 1_000, 512) == "flat"
    assert vectors.resolve_index_type("auto", 1_000_000, 512) == "hnsw"
    assert vectors.resolve_index_type("auto", 100_000_000, 512) == "ivf"  # 200 GB does not fit
    assert vectors.factory_string("ivf", 1_000_000, 512) == "IVF4096,PQ128"
    with pytest.raises(ClipxferError, match="unknown index type"):
        vectors.resolve_index_type("annoy", 10, 8)


def test_stale_faiss_file_is_rebuilt(tmp_path, tiny):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 5)
    update(root, index_path, tiny)
    for file in index_path.glob("vectors-*.faiss"):
        file.rename(index_path / "vectors-0.faiss")  # as if the last save never happened
    with Index.open(index_path) as idx:
        assert len(idx.search_vectors(np.ones(tiny.dim, np.float32) / 8, k=10)[0]) == 5


def test_text_queries_are_cached(tmp_path, tiny, monkeypatch):
    from clipxfer.index.textcache import cached_text_embeddings

    query = f"a unique query {time.time_ns()}"
    first = cached_text_embeddings(tiny, [query])

    def refuse(texts, batch_size=256):
        raise AssertionError("text encoder called for a cached query")

    monkeypatch.setattr(tiny, "encode_texts", refuse)
    np.testing.assert_array_equal(cached_text_embeddings(tiny, [query]), first)


def test_duplicates(tmp_path, tiny):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    paths = write_images(root, 4)
    (root / "copy.png").write_bytes(paths[1].read_bytes())
    update(root, index_path, tiny)
    with Index.open(index_path) as idx:
        pairs = idx.duplicates(0.999)
    assert [{p.a.name, p.b.name} for p in pairs] == [{"img001.png", "copy.png"}]
    assert pairs[0].score > 0.999


def test_load_encoding_keeps_lite_style_features(tmp_path, tiny):
    """Encoders with separate probe features get them stored (float16) and returned."""
    from clipxfer.encoders.base import ImageEncoding

    class WithFeatures(RenamedEncoder):
        feature_dim = 8

        def encode_pixels(self, pixels):
            encoding = self.inner.encode_pixels(pixels)
            return ImageEncoding(encoding.embeddings, encoding.embeddings[:, :8] * 3)

    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 3)
    encoder = WithFeatures(tiny)
    update(root, index_path, encoder)
    with Index.open(index_path) as idx:
        paths, encoding = idx.load_encoding()
    assert encoding.features.shape == (3, 8) and encoding.features.dtype == np.float32
    np.testing.assert_allclose(encoding.features, encoding.embeddings[:, :8] * 3, atol=1e-2)
    assert [p.name for p in paths] == ["img000.png", "img001.png", "img002.png"]


def test_cli_index_search_info_dups(tmp_path):
    import json

    from click.testing import CliRunner

    from clipxfer.cli import main

    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 6)
    odd_name = root / "<b>&odd.png"
    Image.fromarray(random_images(1, seed=5)[0]).save(odd_name)
    (root / "broken.jpg").write_bytes(b"")
    runner = CliRunner()
    common = ["--index", str(index_path)]

    result = runner.invoke(main, ["index", str(root), *common, "--model", "tiny", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts["added"] == 7 and counts["failed"] == [{"path": str(root / "broken.jpg"), "reason": "empty file (0 bytes)"}]

    result = runner.invoke(main, ["search", "a cat", *common, "-k", "3", "--json", "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3] and set(hits[0]) == {"rank", "score", "path"}
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 3

    result = runner.invoke(main, ["search", "--image", str(odd_name), *common, "-k", "2", "--csv", "--html", str(tmp_path / "i.html")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "rank,score,path" and lines[1].endswith(str(odd_name)) and len(lines) == 3
    page = (tmp_path / "i.html").read_text()
    assert "&lt;b&gt;&amp;odd.png" in page and "<b>&odd" not in page

    result = runner.invoke(main, ["search", "a cat", *common, "-k", "2"])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2

    result = runner.invoke(main, ["info", *common, "--json"])
    details = json.loads(result.stdout)
    assert details["count"] == 7 and details["model_spec"] == "tiny" and details["bytes_on_disk"] > 0

    result = runner.invoke(main, ["dups", *common, "--threshold", "-1", "--json"])
    groups = json.loads(result.stdout)["groups"]  # every pair is at least a look-alike: all 7 files are grouped
    assert sorted(m["path"] for g in groups for m in g["members"]) == sorted(str(p) for p in root.iterdir() if p.name != "broken.jpg")

    result = runner.invoke(main, ["search", "a cat", *common, "--model", "lite"])
    assert result.exit_code == 2 and "--model tiny" in result.output
    result = runner.invoke(main, ["search", *common])
    assert result.exit_code == 2 and "QUERY or --image" in result.output


@pytest.mark.slow
def test_lite_finds_the_cat(tmp_path, sample_photos_dir, lite):
    index_path = tmp_path / "index"
    update(sample_photos_dir, index_path, lite, workers=2)
    with Index.open(index_path) as idx:
        hits = idx.search_text("a cat", k=3)
        assert hits[0].path.name == "chelsea.jpg"
        _, encoding = idx.load_encoding()
        assert encoding.features.shape[1] == lite.feature_dim  # backbone features stored
