"""Faults found by a hostile test run against the index (issue 11): each ends in one clear line or
a correct result, never a traceback or a silent wrong answer."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clipxfer.cli import main
from clipxfer.errors import ClipxferError
from clipxfer.index import Index, store, vectors
from clipxfer.index.layout import DB_FILE
from clipxfer.index.lock import WriterLock

from .conftest import random_images
from .test_index import stored_paths, update, write_images

REPO = Path(__file__).resolve().parent.parent


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, *fragments):
    """The command failed with exit 2 and exactly one line, holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("indexing:")]  # progress bar
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output
    assert "Traceback" not in result.output
    return lines[0]


def assert_search_is_exact(index_path: Path) -> None:
    """Every stored vector finds itself first, and each score is the true cosine similarity."""
    with Index.open(index_path) as idx:
        paths, encoding = idx.load_encoding()
        hits = idx.search_vectors(encoding.embeddings, k=len(paths))
    for path, vector, row in zip(paths, encoding.embeddings, hits):
        assert row[0].path == path
        by_path = dict(zip(paths, encoding.embeddings @ vector))
        np.testing.assert_allclose([h.score for h in row], [by_path[h.path] for h in row], atol=1e-5)


def faiss_file(index_path: Path) -> Path:
    (file,) = index_path.glob("vectors-*.faiss")
    return file


# -- 1: the FAISS cache is bound to the exact SQLite content ------------------------------------
def test_faiss_cache_of_a_deleted_database_is_not_reused(tmp_path, tiny):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 6, seed=0)
    update(root, index_path, tiny)
    old_cache = faiss_file(index_path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index_path / DB_FILE}{suffix}").unlink(missing_ok=True)
    write_images(root, 6, seed=1)  # same names and count, other pictures
    update(root, index_path, tiny)
    assert faiss_file(index_path) == old_cache  # same version number, so the same file name
    assert_search_is_exact(index_path)


def test_altered_faiss_cache_is_caught_rebuilt_and_rewritten(tmp_path, tiny):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 8)
    update(root, index_path, tiny)
    with Index.open(index_path) as idx:
        generation = store.get_metadata(idx._conn)["generation"]
        ids, _, embeddings, _ = store.vectors(idx._conn, idx.dim)
    # A structurally valid cache, even with a matching header, whose vectors were altered.
    vectors.save(vectors.build("Flat", embeddings * 1e7, ids, tiny.dim), faiss_file(index_path), generation)
    with Index.open(index_path) as idx:
        hits = idx.search_vectors(embeddings[0], k=8)[0]
    assert all(-1.001 <= h.score <= 1.001 for h in hits) and hits[0].score == pytest.approx(1, abs=1e-5)
    assert_search_is_exact(index_path)

    # Altered bytes on disk (checksum no longer matches): `clipxfer index` rewrites the file.
    file = faiss_file(index_path)
    blob = bytearray(file.read_bytes())
    blob[-200:-100] = os.urandom(100)
    file.write_bytes(bytes(blob))
    update(root, index_path, tiny)
    with Index.open(index_path) as idx:
        meta = store.get_metadata(idx._conn)
    saved = vectors.load(faiss_file(index_path), meta["generation"], 8)  # raises if still stale
    for item_id, vector in zip(ids, embeddings):
        np.testing.assert_allclose(saved.reconstruct(int(item_id)), vector, atol=1e-6)


def test_reader_rewrites_a_stale_cache(tmp_path, tiny):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 4)
    update(root, index_path, tiny)
    faiss_file(index_path).write_bytes(b"not a faiss file")
    assert_search_is_exact(index_path)
    with Index.open(index_path) as idx:
        idx._vectors()
        assert idx._cache_generation is not None  # loaded from the file written by the last reader


# -- 4: an unreadable subfolder is not a deleted one --------------------------------------------
def test_unreadable_subfolder_keeps_its_images(tmp_path, tiny, monkeypatch):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 2)
    write_images(root / "private", 3, seed=5)
    update(root, index_path, tiny)
    assert len(stored_paths(index_path)) == 5

    real_scandir = os.scandir
    denied = str(root.resolve() / "private")

    def scandir(path="."):  # what listing a folder without read permission does (root bypasses modes)
        if os.fspath(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = update(root, index_path, tiny)
    assert report.removed == 0 and len(stored_paths(index_path)) == 5
    assert [(str(f.path), f.reason) for f in report.failed] == [
        (denied, "cannot read folder (Permission denied); its indexed images are kept")
    ]
    monkeypatch.undo()
    assert update(root, index_path, tiny).unchanged == 5


# -- 6 and 16: file names that are not UTF-8, or hold a newline ---------------------------------
def test_non_utf8_and_newline_file_names(tmp_path, tiny):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 3)
    bad = root / os.fsdecode(b"bad\xff.png")
    newline = root / "two\nlines.png"
    Image.fromarray(random_images(1, seed=8)[0]).save(bad)
    Image.fromarray(random_images(1, seed=9)[0]).save(newline)

    result = cli("index", root, "--index", index_path, "--model", "tiny", "--workers", "0")
    assert result.exit_code == 0, result.output
    with sqlite3.connect(index_path / DB_FILE) as conn:
        raw = {row[0] for row in conn.execute("SELECT path FROM items")}
    assert b"bad\xff.png" in raw and "two\nlines.png" in raw  # stored losslessly

    result = cli("search", "--image", bad, "--index", index_path, "-k", "5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and lines[0].endswith("bad\\xff.png")
    assert any(line.endswith("two\\nlines.png") for line in lines)  # one line per hit

    result = cli("search", "--image", bad, "--index", index_path, "-k", "5", "--json", "--html", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    found = {os.fsencode(hit["path"]) for hit in json.loads(result.stdout)}
    assert os.fsencode(bad.resolve()) in found and os.fsencode(newline.resolve()) in found
    assert "bad\\xff.png" in (tmp_path / "r.html").read_text(encoding="utf-8")

    bad.rename(root / os.fsdecode(b"moved\xfe.png"))
    report = update(root, index_path, tiny)
    assert (report.moved, report.unchanged, report.failed) == (1, 4, [])

    result = cli("classify", root, "--classes", "cat,dog", "--model", "tiny", "--device", "cpu", "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    assert "moved\\xfe.png" in (tmp_path / "p.csv").read_text(encoding="utf-8")


# -- 7: a damaged database ---------------------------------------------------------------------
def build_small_index(tmp_path, tiny, count=30):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, count)
    update(root, index_path, tiny, batch_size=8)
    return root, index_path


def test_emptied_database_is_one_line_and_rebuilds(tmp_path, tiny):
    root, index_path = build_small_index(tmp_path, tiny)
    (index_path / DB_FILE).write_bytes(b"")
    for command in (["info"], ["search", "a cat"], ["dups"]):
        one_error_line(cli(*command, "--index", index_path), "empty or damaged", "--rebuild")
    result = cli("index", root, "--index", index_path, "--model", "tiny", "--workers", "0", "--rebuild")
    assert result.exit_code == 0, result.output
    assert "rebuilt: 0 indexed images recovered" in result.output and "30 added" in result.output
    assert_search_is_exact(index_path)


def test_corrupt_database_is_one_line_and_rebuild_keeps_readable_rows(tmp_path, tiny):
    root, index_path = build_small_index(tmp_path, tiny)
    db = index_path / DB_FILE
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[-2 * page :] = os.urandom(2 * page)  # the last pages: some rows are lost, the rest readable
    db.write_bytes(bytes(data))
    faiss_file(index_path).unlink()  # so that every command reads the rows

    for command in (["info"], ["search", "a cat"]):
        line = one_error_line(cli(*command, "--index", index_path), "is damaged", "--rebuild", str(root.resolve()))
    assert "can still be read" in line or "nothing in it can be recovered" in line
    one_error_line(cli("index", root, "--index", index_path, "--model", "tiny"), "is damaged", "--rebuild")

    report = Index.update(root, "tiny", path=index_path, workers=0, rebuild=True)
    assert report.recovered + report.added == 30 and report.failed == []
    assert 0 < report.recovered < 30
    assert report.damaged_copy is not None and Path(report.damaged_copy).is_file()  # kept: not fully read
    assert len(stored_paths(index_path)) == 30
    assert_search_is_exact(index_path)


def test_rebuild_of_a_healthy_index_reencodes_nothing(tmp_path, tiny):
    root, index_path = build_small_index(tmp_path, tiny, count=5)
    report = Index.update(root, tiny, path=index_path, workers=0, rebuild=True)
    assert (report.recovered, report.unchanged, report.added, report.damaged_copy) == (5, 5, 0, None)
    assert sorted(p.name for p in index_path.iterdir() if p.name.startswith(DB_FILE)) == [DB_FILE]


# -- 8: a read-only index -----------------------------------------------------------------------
class FixedTextEncoder:
    """Stands for tiny's text side without running torch (in a forked child)."""

    def __init__(self, model_id: str, dim: int):
        self.id, self.dim = model_id, dim

    def encode_texts(self, texts):
        return np.ones((len(texts), self.dim), np.float32) / np.sqrt(self.dim)


def run_as_nobody(check) -> str:
    """Run ``check()`` in a forked child without root's right to ignore file modes (the venv's
    interpreter may be unreadable to other users, so no new process is started); returns what
    it returns, or raises with the child's traceback."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(reader)
            import faulthandler

            faulthandler.dump_traceback_later(60, exit=True)  # a hang becomes a traceback
            import faiss

            faiss.omp_set_num_threads(1)  # the parent's OpenMP thread pool does not survive fork
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            message, status = "ok:" + json.dumps(check()), 0
        except BaseException:
            import traceback

            message = traceback.format_exc()
        finally:
            with os.fdopen(writer, "w") as out:
                out.write(message)
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader) as inp:
        message = inp.read()
    os.waitpid(pid, 0)
    assert message.startswith("ok:"), message
    return json.loads(message[3:])


def test_read_only_index_can_be_searched_not_written(tiny):
    base = Path(tempfile.mkdtemp(prefix="clipxfer-ro-"))
    try:
        root, index_path = base / "photos", base / "index"
        write_images(root, 5)
        update(root, index_path, tiny)
        faiss_file(index_path).unlink()  # a reader must rebuild it, and may not save it there
        for path in [base, *base.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)  # and owned by root: read-only to nobody
        before = {p.name: p.stat().st_mtime_ns for p in index_path.iterdir()}

        def check():
            os.environ["CLIPXFER_CACHE"] = str(base)  # the text cache cannot be written either
            with Index.open(index_path) as idx:
                hits = idx.search_text("a cat", k=10, model=FixedTextEncoder(tiny.id, tiny.dim))
                info = idx.info()
            result = CliRunner().invoke(main, ["info", "--index", str(index_path), "--json"])
            try:
                Index.update(root, tiny, path=index_path, workers=0)
                refused = "no error"
            except ClipxferError as exc:
                refused = str(exc)
            return {"hits": len(hits), "count": info["count"], "cli": result.exit_code, "refused": refused}

        seen = run_as_nobody(check)
        assert (seen["hits"], seen["count"], seen["cli"]) == (5, 5, 0)
        assert "cannot write index" in seen["refused"] and "read-only" in seen["refused"]
        assert {p.name: p.stat().st_mtime_ns for p in index_path.iterdir()} == before  # nothing written
    finally:
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755)
        shutil.rmtree(base)


# -- 9: disk full while indexing ----------------------------------------------------------------
def test_disk_full_in_sqlite_keeps_committed_work_and_resumes(tmp_path, tiny, monkeypatch):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 40)
    real_connect = store.connect

    def small_disk(path, create=False):  # a real SQLITE_FULL two pages on
        conn = real_connect(path, create)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        return conn

    monkeypatch.setattr(store, "connect", small_disk)
    result = cli("index", root, "--index", index_path, "--model", "tiny", "--workers", "0", "--batch-size", "4")
    one_error_line(result, "disk full", "kept", "run the same command again to resume")
    monkeypatch.undo()
    with Index.open(index_path) as idx:
        kept = len(idx)
    assert 0 < kept < 40
    report = update(root, index_path, tiny)
    assert (report.added, report.unchanged) == (40 - kept, kept)
    assert_search_is_exact(index_path)


def test_disk_full_saving_the_faiss_file(tmp_path, tiny, monkeypatch):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    write_images(root, 5)
    real_write = vectors.os.fsync

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vectors.os, "fsync", no_space)
    one_error_line(cli("index", root, "--index", index_path, "--model", "tiny", "--workers", "0"), "disk full", "resume")
    assert not list(index_path.glob("*vectors-*"))  # no half-written file left
    monkeypatch.setattr(vectors.os, "fsync", real_write)
    assert update(root, index_path, tiny).unchanged == 5
    assert_search_is_exact(index_path)


# -- 12: a bad checkpoint -----------------------------------------------------------------------
class Payload:
    """Anything that is not a tensor: open_clip's weights_only load refuses to unpickle it."""


@pytest.mark.parametrize("kind", ["garbage", "pickle", "other-architecture"])
def test_bad_checkpoint_is_one_line_and_creates_nothing(tmp_path, tiny, kind):
    root, index_path = tmp_path / "photos", tmp_path / "nested" / "index"
    write_images(root, 2)
    checkpoint = tmp_path / "model.pt"
    if kind == "garbage":
        checkpoint.write_bytes(os.urandom(5000))
    elif kind == "pickle":
        torch.save({"state_dict": Payload()}, checkpoint)
    else:
        state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
        state["visual.conv1.weight"] = torch.zeros(128, 3, 4, 4)  # another patch size and width
        torch.save(state, checkpoint)
    result = cli("index", root, "--index", index_path, "--model", f"clipxfer-tiny:{checkpoint}", "--device", "cpu")
    one_error_line(result, str(checkpoint), "not a usable clipxfer-tiny checkpoint")
    assert not (tmp_path / "nested").exists()


# -- 14: search options -------------------------------------------------------------------------
def test_search_refuses_bad_k_empty_query_and_nan(tmp_path, tiny):
    root, index_path = build_small_index(tmp_path, tiny, count=4)
    for k in ("0", "-1"):
        one_error_line(cli("search", "a cat", "--index", index_path, "-k", k), f"-k {k}")
    for query in ("", "   "):
        one_error_line(cli("search", query, "--index", index_path), "query is empty")
    one_error_line(cli("search", "a cat", "--index", index_path, "--min-score", "nan"), "--min-score nan")
    with Index.open(index_path) as idx:
        with pytest.raises(ClipxferError, match="-k 0"):
            idx.search_vectors(np.ones(tiny.dim, np.float32), k=0)
        assert len(idx.search_text("a cat", k=2, model=tiny)) == 2


# -- 16: messages -------------------------------------------------------------------------------
def test_index_being_built_is_not_called_stopped_early(tmp_path):
    index_path = tmp_path / "index"
    index_path.mkdir()
    store.connect(index_path / DB_FILE, create=True).close()  # schema, no meta yet
    with WriterLock(index_path):
        with pytest.raises(ClipxferError, match=f"being built by another process \\(pid {os.getpid()}\\)"):
            Index.open(index_path)
    with pytest.raises(ClipxferError, match="first run stopped early"):
        Index.open(index_path)


def test_permission_denied_is_not_called_corrupt(tmp_path, monkeypatch):
    from clipxfer.encoders import pipeline
    from clipxfer.errors import ImageDecodeError
    from clipxfer.images import load_model_input

    path = tmp_path / "locked.png"
    Image.fromarray(random_images(1)[0]).save(path)
    real_open = Image.open

    def denied(fp, *args, **kwargs):  # what opening a file without read permission raises
        if Path(fp) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(ImageDecodeError) as err:
        load_model_input(path, 32)
    assert err.value.reason.startswith("permission denied") and "corrupt" not in err.value.reason
    failure = pipeline.decode_file(path, 32)
    assert failure.reason.startswith("permission denied")


def test_model_mismatch_names_the_precision_when_only_that_differs():
    from clipxfer.encoders.ids import INT8_SUFFIX, LITE_ID, TINY_MODEL
    from clipxfer.index.errors import model_mismatch

    precision_only = str(model_mismatch(Path("idx"), LITE_ID + INT8_SUFFIX, "lite", LITE_ID))
    assert "--precision int8" in precision_only and "--model" not in precision_only.split("use ")[1].split(" (")[0]
    other_model = str(model_mismatch(Path("idx"), LITE_ID, "lite", f"open_clip:{TINY_MODEL}:random-seed0"))
    assert "use --model lite " in other_model
