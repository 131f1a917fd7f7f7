"""Template sets, class names and descriptions: loading and the one-line errors."""

from __future__ import annotations

import json

import pytest

from clipxfer.datasets.prompts import (
    PROMPTS_DIR,
    classes_from_folder,
    list_template_sets,
    load_classnames,
    load_descriptions,
    load_templates,
    read_template_file,
)
from clipxfer.errors import ClipxferError

DOMAIN_PACKS = ["industrial", "medical", "satellite", "textures", "documents", "products"]


def test_builtin_sets_load():
    assert load_templates("simple") == ["a photo of a {}."]
    imagenet = load_templates("openai_imagenet")
    assert len(imagenet) == 80 and "a photo of a {}." in imagenet and not any(t.startswith("#") for t in imagenet)


@pytest.mark.parametrize("name", DOMAIN_PACKS)
def test_domain_packs_load_and_every_line_has_a_slot(name):
    templates = load_templates(name)
    assert 10 <= len(templates) <= 30
    assert len(set(templates)) == len(templates), "a template is repeated"
    lines = (PROMPTS_DIR / f"{name}.txt").read_text().splitlines()
    for line in lines:
        if line.strip() and not line.startswith("#"):
            assert line.count("{}") == 1, line
            assert line.format("cat")  # fills without error


def test_listing_has_descriptions_and_counts():
    listing = {entry["name"]: entry for entry in list_template_sets()}
    assert {"simple", "openai_imagenet", *DOMAIN_PACKS} <= set(listing)
    assert listing["openai_imagenet"]["templates"] == 80
    assert all(entry["description"] for entry in listing.values())


def test_user_file_with_comments(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my set\n\na {} on a table.\n# note\na close-up of a {}.\n")
    assert read_template_file(path) == ("my set", ["a {} on a table.", "a close-up of a {}."])
    assert load_templates(str(path)) == ["a {} on a table.", "a close-up of a {}."]


def test_template_errors(tmp_path):
    missing_slot = tmp_path / "bad.txt"
    missing_slot.write_text("a photo of a {}.\na photo of a cat.\n")
    with pytest.raises(ClipxferError, match=r"bad.txt:2: template 'a photo of a cat.' has no \{\}"):
        load_templates(str(missing_slot))
    two_slots = tmp_path / "two.txt"
    two_slots.write_text("a {} next to a {}.\n")
    with pytest.raises(ClipxferError, match="once"):
        load_templates(str(two_slots))
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ClipxferError, match="no templates in the file"):
        load_templates(str(empty))
    with pytest.raises(ClipxferError, match="unknown template set 'nosuchset': use one of .*simple"):
        load_templates("nosuchset")
    with pytest.raises(ClipxferError, match="template file .*missing.txt not found"):
        load_templates(str(tmp_path / "missing.txt"))


def test_class_names_from_list_file_and_folder(tmp_path):
    assert load_classnames("cat, dog ,car") == ["cat", "dog", "car"]
    listing = tmp_path / "classes.txt"
    listing.write_text("scratch\n\ndent\n# a comment\ncrack\n")
    assert load_classnames(str(listing)) == ["scratch", "dent", "crack"]
    for name in ("b_class", "a_class", ".hidden"):
        (tmp_path / "tree" / name).mkdir(parents=True)
    assert classes_from_folder(tmp_path / "tree") == ["a_class", "b_class"]


def test_class_name_errors(tmp_path):
    with pytest.raises(ClipxferError, match="found 1 class"):
        load_classnames("cat")
    with pytest.raises(ClipxferError, match="repeat"):
        load_classnames("cat,dog,cat")
    with pytest.raises(ClipxferError, match="empty class name"):
        load_classnames("cat,,dog")
    with pytest.raises(ClipxferError, match="class file .* not found"):
        load_classnames(str(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipxferError, match="no class subfolders"):
        classes_from_folder(tmp_path / "empty")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    with pytest.raises(ClipxferError, match="found 1 class"):
        classes_from_folder(tmp_path / "one")


def test_descriptions_csv_and_json(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('class,description\ncat,"a small furry pet with whiskers"\ndog,a loyal pet that barks\ncat,a {} on a sofa\n')
    assert load_descriptions(csv, ["cat", "dog", "car"]) == {
        "cat": ["a small furry pet with whiskers", "a {} on a sofa"],
        "dog": ["a loyal pet that barks"],
    }
    js = tmp_path / "d.json"
    js.write_text(json.dumps({"car": "a vehicle with four wheels", "dog": ["a pet", "a hound"]}))
    assert load_descriptions(js, ["cat", "dog", "car"]) == {"dog": ["a pet", "a hound"], "car": ["a vehicle with four wheels"]}


def test_description_errors(tmp_path):
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"cta": ["a pet"]}))
    with pytest.raises(ClipxferError, match="unknown class.*cta"):
        load_descriptions(typo, ["cat", "dog"])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ClipxferError, match="empty descriptions file"):
        load_descriptions(empty, ["cat", "dog"])
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("label,text\ncat,a pet\n")
    with pytest.raises(ClipxferError, match="missing column"):
        load_descriptions(wrong, ["cat", "dog"])
    with pytest.raises(ClipxferError, match="not found"):
        load_descriptions(tmp_path / "none.csv", ["cat", "dog"])
