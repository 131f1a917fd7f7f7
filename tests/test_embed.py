"""Embedding shards from folders, webdataset tars, parquet and HF datasets; index from shards."""

from __future__ import annotations

import hashlib
import io
import json
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

QUERIES = ["a handwritten digit", "a shoe", "a shirt"]


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """240 real images: 160 scikit-learn digits and 80 Fashion-MNIST test images, as PNG bytes."""
    from clipxfer.datasets.labelled import fashion_mnist, sklearn_digits

    sources = list(sklearn_digits().subset(range(160)).sources)
    try:
        sources += list(fashion_mnist().split("test").subset(range(80)).sources)
    except ClipxferError:  # dataset-fashion-mnist not installed: digits only
        sources += list(sklearn_digits().subset(range(160, 240)).sources)
    return [_png(np.asarray(s)) for s in sources]


@pytest.fixture(scope="module")
def data(tmp_path_factory, images) -> Path:
    """The same images as a folder, as 4 webdataset tar shards and as 2 img2dataset parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("sources")
    for name in ("folder", "tars", "parquet"):
        (root / name).mkdir()
    for i, blob in enumerate(images):
        (root / "folder" / f"{i:04d}.png").write_bytes(blob)
    for shard in range(4):
        with tarfile.open(root / "tars" / f"{shard:06d}.tar", "w") as tar:
            for i in range(shard * 60, shard * 60 + 60):
                add_tar_member(tar, f"{i:04d}.png", images[i])
                add_tar_member(tar, f"{i:04d}.cls", str(i % 10).encode())
    for part in range(2):
        rows = range(part * 120, part * 120 + 120)
        table = pa.table(
            {
                "key": [f"{i:04d}" for i in rows],
                "jpg": [images[i] for i in rows],
                "caption": ["" for _ in rows],
                "status": ["success" for _ in rows],
            }
        )
        pq.write_table(table, root / "parquet" / f"{part:05d}.parquet")
    return root


def by_number(folder: Path) -> dict[int, tuple[str, np.ndarray]]:
    """Image number (from the key) -> (sha256, embedding) over all shards of ``folder``."""
    found = {}
    for batch in iter_embeddings(folder):
        for key, sha, vector in zip(batch.keys, batch.sha256, batch.embeddings):
            number = int(Path(key).stem.split("/")[-1])
            assert number not in found, f"{key} appears twice"
            found[number] = (sha, vector)
    return found


def test_folder_tar_and_parquet_give_the_same_items(tmp_path, tiny, data, images):
    results = {}
    for name in ("folder", "tars", "parquet"):
        report = embed(data / name, tmp_path / name, tiny, batch_size=32, shard_size=100)
        assert report.embedded == 240 and not report.failed
        results[name] = by_number(tmp_path / name)
    manifest = json.loads((tmp_path / "tars" / "manifest.json").read_text())
    assert manifest["count"] == 240 and manifest["model_id"] == tiny.id and len(manifest["shards"]) == 4
    assert [s["count"] for s in json.loads((tmp_path / "folder" / "manifest.json").read_text())["shards"]] == [100, 100, 40]
    for number, blob in enumerate(images):
        sha, vector = results["folder"][number]
        assert sha == hashlib.sha256(blob).hexdigest()
        for other in ("tars", "parquet"):
            assert results[other][number][0] == sha
            np.testing.assert_allclose(results[other][number][1], vector, atol=1e-6)
    # the stored vectors are the encoder's own
    direct = tiny.encode_images([data / "folder" / "0007.png"])[0]
    np.testing.assert_allclose(results["tars"][7][1], direct, atol=1e-5)


def test_hf_dataset_saved_to_disk(tmp_path, tiny, data, images):
    from datasets import Dataset, Image
    from PIL import Image as PILImage

    pictures = [PILImage.open(io.BytesIO(blob)) for blob in images[:50]]
    Dataset.from_dict({"image": pictures, "label": list(range(50))}).cast_column("image", Image()).save_to_disk(
        str(tmp_path / "hf")
    )
    report = embed(tmp_path / "hf", tmp_path / "emb", tiny, shard_size=20)
    assert report.embedded == 50 and report.shards_written == 3
    found = {int(b): v for batch in iter_embeddings(tmp_path / "emb") for b, v in zip(batch.keys, batch.embeddings)}
    expected = tiny.encode_images([data / "folder" / f"{i:04d}.png" for i in range(50)])
    np.testing.assert_allclose(np.stack([found[i] for i in range(50)]), expected, atol=1e-5)


def test_rerun_skips_finished_shards_and_hides_partial_ones(tmp_path, tiny, data):
    out = tmp_path / "emb"
    embed(data / "tars", out, tiny)
    first = by_number(out)
    (out / "000002.parquet").unlink()  # as if killed before this shard was renamed into place
    (out / ".000002.parquet.tmp-123").write_bytes(b"half a shard")
    report = embed(data / "tars", out, tiny)
    assert (report.shards_written, report.shards_skipped, report.embedded, report.total_embedded) == (1, 3, 60, 240)
    assert not list(out.glob(".*tmp*"))
    again = by_number(out)
    assert sorted(again) == sorted(first)
    for number in first:
        np.testing.assert_array_equal(again[number][1], first[number][1])
    assert embed(data / "tars", out, tiny).shards_written == 0


def test_other_model_or_source_is_refused(tmp_path, tiny, data):
    out = tmp_path / "emb"
    embed(data / "parquet", out, tiny)
    with pytest.raises(ClipxferError, match="holds embeddings of"):
        embed(data / "tars", out, tiny)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model_id"] = "open_clip:other"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ClipxferError, match="not open_clip:clipxfer-tiny"):
        embed(data / "parquet", out, tiny)


def corrupt_tar(folder: Path, images: list[bytes]) -> dict[str, str]:
    """A shard with good items, a truncated PNG, random bytes, an item without an image and a
    repeated key; returns the expected failing keys and a word of their reason."""
    folder.mkdir()
    with tarfile.open(folder / "bad.tar", "w") as tar:
        for i in range(5):
            add_tar_member(tar, f"good{i}.png", images[i])
        add_tar_member(tar, "truncated.png", images[5][: len(images[5]) // 2])
        add_tar_member(tar, "noise.jpg", bytes(range(256)) * 4)
        add_tar_member(tar, "captiononly.txt", b"a caption without its image")
        add_tar_member(tar, "good0.png", images[6])  # repeated key, later in the shard
    return {"bad.tar/truncated": "truncated", "bad.tar/noise": "not an image", "bad.tar/captiononly": "no image", "bad.tar/good0": "repeated"}


def test_corrupt_items_are_reported_per_key_and_skipped(tmp_path, tiny, images):
    expected = corrupt_tar(tmp_path / "tars", images)
    report = embed(tmp_path / "tars", tmp_path / "emb", tiny)
    assert report.embedded == 5
    reasons = {str(f.path): f.reason for f in report.failed}
    assert set(reasons) == set(expected)
    for key, word in expected.items():
        assert word in reasons[key]
    assert sorted(k for b in iter_embeddings(tmp_path / "emb") for k in b.keys) == [f"bad.tar/good{i}" for i in range(5)]
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["failed_count"] == 4


def search_all(index_path: Path, tiny) -> list[list[tuple[str, float]]]:
    with Index.open(index_path) as idx:
        text = [[(str(h.path), h.score) for h in idx.search_text(q, 10, tiny)] for q in QUERIES]
        _, encoding = idx.load_encoding()
        image = [[(str(h.path), h.score) for h in hits] for hits in idx.search_vectors(encoding.embeddings[:5], 10)]
    return text + image


def assert_same_results(a, b) -> None:
    for hits_a, hits_b in zip(a, b):
        assert [p for p, _ in hits_a] == [p for p, _ in hits_b]
        np.testing.assert_allclose([s for _, s in hits_a], [s for _, s in hits_b], atol=1e-5)


def test_index_from_shards_answers_like_index_from_folder(tmp_path, tiny, data):
    Index.update(data / "folder", tiny, path=tmp_path / "from-folder")
    embed(data / "folder", tmp_path / "emb", tiny, shard_size=64)
    report = ingest(tmp_path / "emb", tmp_path / "from-shards")
    assert (report.added, report.total) == (240, 240)
    expected = search_all(tmp_path / "from-folder", tiny)
    assert_same_results(search_all(tmp_path / "from-shards", tiny), expected)
    # ingesting again changes nothing; an index can be exported and rebuilt from its export
    assert ingest(tmp_path / "emb", tmp_path / "from-shards").unchanged == 240
    manifest = export_embeddings(tmp_path / "from-folder", tmp_path / "exported", rows_per_shard=100)
    assert manifest["count"] == 240 and len(manifest["shards"]) == 3
    ingest(tmp_path / "exported", tmp_path / "rebuilt")
    assert_same_results(search_all(tmp_path / "rebuilt", tiny), expected)


def test_ingest_trains_ivf_pq_on_a_sample(tmp_path):
    rng = np.random.default_rng(0)
    dim, count = 32, 12_000
    centres = rng.normal(size=(40, dim))
    vectors = centres[rng.integers(0, 40, count)] + 0.3 * rng.normal(size=(count, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    info = EncoderInfo("open_clip:synthetic:test", "synthetic", dim, dim)
    names = []
    (tmp_path / "emb").mkdir()
    for part, start in enumerate(range(0, count, 5000)):
        rows = range(start, min(start + 5000, count))
        keys = [f"v{i}" for i in rows]
        ones = [1] * len(keys)
        shard = ShardData(f"part-{part}", keys, [f"{i:064x}" for i in rows], ones, ones, ones, vectors[start : start + len(keys)], None)
        write_shard(tmp_path / "emb", info, shard)
        names.append(shard.name)
    write_manifest(tmp_path / "emb", info, {"kind": "synthetic", "root": str(tmp_path)}, names)
    import faiss

    # One OpenMP thread: on a shared, oversubscribed CI machine faiss's spinning threads make this
    # sub-second training take minutes.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        report = ingest(tmp_path / "emb", tmp_path / "idx", index_type="ivf")
    finally:
        faiss.omp_set_num_threads(threads)
    assert report.faiss.startswith("IVF") and ",PQ" in report.faiss and report.total == count
    with Index.open(tmp_path / "idx") as idx:
        assert idx.info()["faiss"] == report.faiss and len(idx) == count
        hits = idx.search_vectors(vectors[:100], 1)
    found = sum(h[0].path.name == f"v{i}" for i, h in enumerate(hits))
    assert found >= 80  # approximate search still finds most stored vectors themselves


def test_cli_embed_index_search_export(tmp_path, data):
    runner = CliRunner()
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    result = runner.invoke(main, ["embed", str(data / "parquet"), "--out", str(emb), "--model", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["embedded"] == 240
    result = runner.invoke(main, ["index", "--from-embeddings", str(emb), "--index", str(idx), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["total"] == 240
    result = runner.invoke(main, ["search", "a shoe", "--index", str(idx), "-k", "3", "--json"])
    assert result.exit_code == 0 and len(json.loads(result.output)) == 3
    assert "00000.parquet" not in result.output and "/parquet/0" in result.output  # keys from the key column
    result = runner.invoke(main, ["export-embeddings", "--index", str(idx), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "240 vectors" in result.output
    result = runner.invoke(main, ["index", str(data / "folder"), "--from-embeddings", str(emb), "--index", str(idx)])
    assert result.exit_code == 2 and "error: give either a FOLDER" in result.output
    result = runner.invoke(main, ["embed", str(tmp_path / "nothing"), "--out", str(emb)])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def test_missing_ray_is_one_clear_line(tmp_path, data, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(ClipxferError, match=r"pip install 'clipxfer\[ray\]'"):
        embed(data / "tars", tmp_path / "emb", "tiny", engine="ray")
    assert not (tmp_path / "emb").exists()
