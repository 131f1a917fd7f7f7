"""Search features: query arithmetic, filters inside the search, the relevance cutoff, duplicate tiers;
from the Python API, the command line and the HTTP API, on scikit-image's sample photos."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clipxfer.cli import main
from clipxfer.errors import ClipxferError
from clipxfer.index import Index
from clipxfer.index.filters import Filters
from clipxfer.index.query import QueryError, Term, combine, parse_query
from clipxfer.index.relevance import ScoreNull


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory, sample_photos_dir, tiny):
    """The sample photos indexed with tiny; chelsea.jpg backdated, logo.png the only PNG."""
    root = tmp_path_factory.mktemp("photos")
    for path in sample_photos_dir.iterdir():
        shutil.copy(path, root / path.name)
    old = time.mktime((2020, 6, 1, 12, 0, 0, 0, 0, -1))
    os.utime(root / "chelsea.jpg", (old, old))
    index = tmp_path_factory.mktemp("index") / "index"
    Index.update(root, tiny, path=index, workers=0)
    return root, index


# -------------------------------------------------------------------------------- query grammar
@pytest.mark.parametrize(
    "query, expected",
    [
        ("a cat", [(1, "text", "a cat")]),
        ("t-shirt", [(1, "text", "t-shirt")]),
        ('"a dress" + red - "long sleeves"', [(1, "text", "a dress"), (1, "text", "red"), (-1, "text", "long sleeves")]),
        ('2*"red car" - 0.5 * blurry', [(2, "text", "red car"), (-0.5, "text", "blurry")]),
        ("- blurry", [(-1, "text", "blurry")]),
        ('"rock - paper"', [(1, "text", "rock - paper")]),
        ("3 cats + image:a.jpg", [(1, "text", "3 cats"), (1, "image", "a.jpg")]),
        ('image:"my photo.jpg" -dog', [(1, "image", "my photo.jpg"), (-1, "text", "dog")]),
    ],
)
def test_query_grammar(query, expected):
    assert [(t.weight, t.kind, t.value) for t in parse_query(query)] == expected


@pytest.mark.parametrize(
    "query, column, words",
    [
        ('"a cat" +', 10, "after '+' or '-'"),
        ("2*", 3, "after '*'"),
        ('"a cat', 1, "never closed"),
        ('"" + x', 1, "inside the quotes"),
        ('"a" "b"', 5, "expected + or -"),
        ("red + image:", 13, "file path"),
    ],
)
def test_malformed_query_is_one_line_with_its_column(query, column, words):
    with pytest.raises(QueryError) as caught:
        parse_query(query)
    message = str(caught.value)
    assert f"column {column}:" in message and words in message and "\n" not in message


def test_combined_vector_is_the_normalised_weighted_sum():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 16)).astype(np.float32)
    terms = [Term(2.0, "text", "a"), Term(1.0, "text", "b"), Term(-1.0, "text", "c")]
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = 2 * units[0] + units[1] - units[2]
    np.testing.assert_allclose(combine(terms, vectors), expected / np.linalg.norm(expected), atol=1e-6)
    with pytest.raises(ClipxferError, match="cancel out"):
        combine([Term(1.0, "text", "a"), Term(-1.0, "text", "a")], vectors[[0, 0]])


def test_arithmetic_search_ranks_by_the_combined_vector(photo_index, tiny):
    root, index = photo_index
    with Index.open(index) as idx:
        paths, encoding = idx.load_encoding()
        texts = tiny.encode_texts(["a cat", "a clock"])
        image = tiny.encode_images([root / "coffee.jpg"])[0]
        hits = idx.search('2*"a cat" - "a clock"', k=5, model=tiny, images=[root / "coffee.jpg"])
    query = image + 2 * texts[0] - texts[1]
    scores = dict(zip(paths, encoding.embeddings @ (query / np.linalg.norm(query))))
    assert [h.path for h in hits] == sorted(scores, key=lambda p: -scores[p])[:5]
    np.testing.assert_allclose([h.score for h in hits], [scores[h.path] for h in hits], atol=1e-5)


# -------------------------------------------------------------------------------- filters
def test_filters_select_by_glob_date_and_size(photo_index):
    root, index = photo_index
    with Index.open(index) as idx:
        def names(**options):
            return _names(idx, Filters.from_options(**options))

        assert names(path="*.png") == {"logo.png"}
        assert names(path=str(root / "c*.jpg")) == {"camera.jpg", "chelsea.jpg", "clock.jpg", "coffee.jpg", "coins.jpg",
                                                      "colorwheel.jpg"}
        assert names(modified_before="2021-01-01") == {"chelsea.jpg"}
        assert "chelsea.jpg" not in names(modified_after="2021-01-01")
        wide = {p.name for p in root.iterdir() if Image.open(p).size[0] >= 600}
        assert names(min_width=600) == wide and 0 < len(wide) < 19
        tall = {p.name for p in root.iterdir() if Image.open(p).size[1] >= 500 and Image.open(p).size[0] >= 500}
        assert names(min_width=500, min_height=500) == tall


def _names(idx, filters):
    ids, paths, _ = idx.load_items()
    allowed = set(idx.allowed_ids(filters).tolist())
    return {p.name for i, p in zip(ids, paths) if i in allowed}


@pytest.mark.parametrize("bad, words", [
    ({"modified_after": "last tuesday"}, "YYYY-MM-DD"),
    ({"min_width": 0}, "--min-width 0"),
    ({"modified_after": "2024-02-01", "modified_before": "2024-01-01"}, "no file can match"),
    ({"path": " "}, "--path"),
])
def test_bad_filters_are_one_line(bad, words):
    with pytest.raises(ClipxferError, match=words):
        Filters.from_options(**bad)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_filtered_search_returns_k_when_k_match(tmp_path, sample_photos_dir, tiny, monkeypatch, index_type):
    """The filter acts inside FAISS (an ID selector, exact scoring as the fallback): k hits come back
    whenever k files pass, however far down the unfiltered ranking they are."""
    from clipxfer.index import filtered

    root = tmp_path / "photos"
    root.mkdir()
    for path in sample_photos_dir.iterdir():  # 19 photos, each in 8 sizes: 152 files
        image = Image.open(path).convert("RGB")
        for n in range(8):
            side = 40 + 8 * n
            image.resize((side, side)).save(root / f"{path.stem}-{side}.png")
    Index.update(root, tiny, path=tmp_path / "index", workers=0, index_type=index_type)
    monkeypatch.setattr(filtered, "EXACT_MAX", 0)  # always through the FAISS selector
    with Index.open(tmp_path / "index") as idx:
        query = tiny.encode_texts(["a cat"])
        everything = idx.search_vectors(query, k=152)[0]
        hits = idx.search_vectors(query, k=10, filters=Filters.from_options(path="*-96.png"))[0]
        expected = [h for h in everything if h.path.name.endswith("-96.png")][:10]
        assert [h.path for h in hits] == [h.path for h in expected] and len(hits) == 10
        assert len(idx.search_vectors(query, k=50, filters=Filters.from_options(min_width=88))[0]) == 19 * 2
        assert idx.search_vectors(query, k=5, filters=Filters.from_options(path="nothing*"))[0] == []


# -------------------------------------------------------------------------------- relevance
def test_relevance_separates_outliers_from_the_null():
    rng = np.random.default_rng(0)
    background = rng.normal(0.2, 0.03, 5000)
    null = ScoreNull.fit(background, 5000)
    top = np.sort(np.concatenate([[0.5, 0.45], rng.normal(0.2, 0.03, 20)]))[::-1]
    relevance = null.relevance(top)
    assert relevance[0] > 0.99 and relevance[1] > 0.99  # 8 and 10 sigma above
    assert np.all(relevance[2:] < 0.95)  # the bulk's own maximum is chance
    assert np.all(np.diff(relevance) <= 1e-12)  # monotone down the ranking


@pytest.mark.slow  # the lite model over the sample photos
def test_min_relevance_keeps_the_cat_and_drops_chance(sample_photo_index, lite):
    with Index.open(sample_photo_index) as idx:
        hits = idx.search("a cat", k=10, model=lite, min_relevance=0.95)
        plain = idx.search("a cat", k=10, model=lite)
    assert hits and hits[0].path.name == "chelsea.jpg" and len(hits) < len(plain) == 10
    assert all(h.relevance >= 0.95 for h in hits) and "relevance" in hits[0].to_dict()
    assert plain[0].relevance is None and "relevance" not in plain[0].to_dict()
    with pytest.raises(ClipxferError, match="--min-relevance 1.5"):
        Index.open(sample_photo_index).search("a cat", model=lite, min_relevance=1.5)


# -------------------------------------------------------------------------------- command line
def test_cli_search_arithmetic_filters_and_errors(photo_index):
    root, index = photo_index
    runner = CliRunner()
    common = ["--index", str(index)]
    result = runner.invoke(main, ["search", "--image", str(root / "coffee.jpg"), "-", "blurry", *common, "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 3
    result = runner.invoke(main, ["search", "a", "cat", "+", "2*clock", *common, "--path", "c*", "--json"])
    assert result.exit_code == 0, result.output
    assert {os.path.basename(h["path"])[0] for h in json.loads(result.stdout)} == {"c"}
    result = runner.invoke(main, ["search", '"a cat', *common])
    assert result.exit_code == 2 and "column 1: this \" is never closed" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["search", "cat", *common, "--modified-after", "soon"])
    assert result.exit_code == 2 and "--modified-after 'soon'" in result.output
    result = runner.invoke(main, ["search", "cat", *common, "--jsn"])
    assert result.exit_code == 2 and "no such option: --jsn" in result.output
    result = runner.invoke(main, ["search", "a cat", *common, "--min-relevance", "--json"])
    assert result.exit_code == 0, result.output
    assert all("relevance" in hit for hit in json.loads(result.stdout))


def test_cli_min_relevance_default_matches_the_library():
    from clipxfer.cli.index import DEFAULT_MIN_RELEVANCE
    from clipxfer.index.relevance import DEFAULT_MIN_RELEVANCE as LIBRARY_DEFAULT

    assert DEFAULT_MIN_RELEVANCE == LIBRARY_DEFAULT


def test_cli_classify_index_with_a_filter(photo_index):
    _, index = photo_index
    result = CliRunner().invoke(main, ["classify", "--index", str(index), "--classes", "cat,clock", "--path", "c*",
                                       "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 6  # camera, chelsea, clock, coffee, coins, colorwheel
    result = CliRunner().invoke(main, ["classify", "--index", str(index), "--classes", "cat,clock", "--path", "zz*"])
    assert result.exit_code == 2 and "no image passes the filters" in result.output


# -------------------------------------------------------------------------------- duplicates
@pytest.fixture(scope="module")
def dups_folder(tmp_path_factory, sample_photos_dir):
    """Eight sample photos, an exact copy, a resized + recompressed copy and a cropped grayscale copy."""
    root = tmp_path_factory.mktemp("dups")
    names = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle", "camera", "page", "brick"]
    for name in names:
        shutil.copy(sample_photos_dir / f"{name}.jpg", root / f"{name}.jpg")
    shutil.copy(root / "chelsea.jpg", root / "chelsea-again.jpg")
    coffee = Image.open(root / "coffee.jpg")
    coffee.resize((coffee.width // 3, coffee.height // 3)).save(root / "coffee-small.jpg", quality=60)
    rocket = Image.open(root / "rocket.jpg")
    rocket.crop((12, 10, rocket.width - 10, rocket.height - 12)).convert("L").save(root / "rocket-grey.png")
    return root


def test_aligned_correlation_finds_a_one_pixel_crop_of_a_small_image(sample_photos_dir):
    from clipxfer.index import alignment

    def small(name):
        return Image.open(sample_photos_dir / f"{name}.jpg").convert("L").resize((28, 28), Image.LANCZOS)

    original = small("camera")
    cropped = original.crop((1, 1, 27, 27))  # one pixel off each side: 26 x 26
    signature = alignment.signature(original)
    crop_score = alignment.aligned_correlation(signature, alignment.signature(cropped))
    unaligned = float(alignment.templates(alignment.thumbnail(original))[0].ravel()
                      @ alignment.templates(alignment.thumbnail(cropped))[0].ravel())
    others = [alignment.aligned_correlation(signature, alignment.signature(small(n))) for n in ("astronaut", "coffee")]
    assert crop_score > 0.9 > unaligned and max(others) < 0.5


@pytest.mark.slow  # lite encodes the photos and 32 learned copies
def test_dups_three_tiers_cli_outputs_and_keep(tmp_path, dups_folder, lite):
    index = tmp_path / "index"
    Index.update(dups_folder, lite, path=index, workers=0)
    with Index.open(index) as idx:
        report = idx.duplicate_groups(0.99, lite)
        few = idx.duplicate_groups(0.99, lite, learn_sample=4)
    assert few.images_compared < 11  # only the learned originals and the images of candidate pairs are read
    groups = {(g.tier, frozenset(m.path.name for m in g.members)) for g in report.groups}
    assert ("exact", frozenset({"chelsea.jpg", "chelsea-again.jpg"})) in groups
    assert ("copy", frozenset({"coffee.jpg", "coffee-small.jpg"})) in groups
    assert ("copy", frozenset({"rocket.jpg", "rocket-grey.png"})) in groups
    assert not [g for g in report.groups if g.tier == "copy" and len(g.members) != 2]
    assert report.learned_from == 44 and report.space == "features"  # 4 edits of each of the 11 images

    runner = CliRunner()
    common = ["dups", "--index", str(index), "--threshold", "0.99"]
    result = runner.invoke(main, [*common, "--keep", "largest", "--json", "--html", str(tmp_path / "d.html")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    deleted = {os.path.basename(p) for p in data["delete"]}
    assert {"coffee-small.jpg", "rocket-grey.png"} <= deleted and len(deleted & {"chelsea.jpg", "chelsea-again.jpg"}) == 1
    assert all((dups_folder / name).exists() for name in deleted)  # printed, never deleted
    page = (tmp_path / "d.html").read_text()
    assert page.count('class="delete"') == len(deleted) and "copy (2 files" in page
    result = runner.invoke(main, [*common, "--csv"])
    rows = result.stdout.splitlines()
    assert rows[0].startswith("group,tier,score,path") and any(",exact," in r for r in rows)
    result = runner.invoke(main, [*common, "--keep", "newest"])
    assert result.exit_code == 0 and "nothing was deleted" in result.output


# -------------------------------------------------------------------------------- HTTP API
@pytest.fixture()
def client(photo_index, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipxfer.serve import ServeConfig, create_app

    _, index = photo_index
    config = ServeConfig(index=index, labels=tmp_path / "labels.json")
    with TestClient(create_app(config), base_url="http://127.0.0.1") as test_client:  # the server checks Host
        yield test_client


def test_api_arithmetic_filters_relevance_and_errors(client, photo_index):
    root, _ = photo_index
    plain = client.get("/api/search", params={"q": "a cat", "k": 3}).json()
    assert len(plain) == 3 and "relevance" not in plain[0]
    combined = client.get("/api/search", params={"q": '2*"a cat" - clock', "k": 19}).json()
    assert len(combined) == 19 and [h["name"] for h in combined] != [h["name"] for h in plain]
    pngs = client.get("/api/search", params={"q": "a cat", "path": "*.png"}).json()
    assert [h["name"] for h in pngs] == ["logo.png"]
    relevant = client.get("/api/search", params={"q": "a cat", "min_relevance": 0.5}).json()
    assert all("relevance" in h for h in relevant)
    data = (root / "coffee.jpg").read_bytes()
    hits = client.post("/api/search/image", files={"file": ("c.jpg", data, "image/jpeg")},
                       params={"q": "- blurry", "k": 2, "min_width": 500}).json()
    assert len(hits) == 2
    for params, words in [({"q": '"a cat'}, "never closed"), ({"q": "x", "min_height": 0}, "--min-height"),
                          ({"q": "x", "modified_before": "never"}, "YYYY-MM-DD"),
                          ({"q": "x", "min_relevance": 2}, "between 0 and 1"),
                          ({"q": "x + image:/etc/passwd"}, "not accepted here")]:
        response = client.get("/api/search", params=params)
        assert response.status_code == 400 and words in response.json()["detail"], (params, response.text)
