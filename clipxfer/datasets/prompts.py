"""What zero-shot classification reads: prompt template sets, class names and per-class descriptions.

Template sets are plain text files in ``prompts/`` (one template per line, ``{}`` marks the class
name, ``#`` lines are comments; the first comment describes the set). A user's own file works
everywhere a set name does. Class names come from ``"a,b,c"``, a text file (one per line) or the
subfolders of an ImageFolder. Descriptions (CuPL, Pratt et al. 2023) are extra sentences per
class, averaged into the class embedding together with the templates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ClipxferError

PROMPTS_DIR = Path(__file__).parent / "prompt_sets"


# ---------------------------------------------------------------- template sets


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ClipxferError(f"{path}: not a UTF-8 text file; write one template per line") from None
    except OSError as exc:
        raise ClipxferError(f"{path}: cannot read ({exc.strerror})") from None


def check_template(template: str, where: str) -> None:
    """A template must hold exactly one ``{}`` and no other braces (it is filled with ``str.format``)."""
    if "{}" not in template:
        raise ClipxferError(f"{where}: template '{template}' has no {{}} where the class name goes")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        raise ClipxferError(f"{where}: template '{template}' must hold {{}} once and no other braces") from None


def read_template_file(path: str | os.PathLike) -> tuple[str, list[str]]:
    """``(description, templates)`` of a template file; the description is its first ``#`` line."""
    path = Path(path)
    description, templates = "", []
    for number, raw in enumerate(_read_lines(path), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            description = description or line.lstrip("#").strip()
            continue
        check_template(line, f"{path}:{number}")
        templates.append(line)
    if not templates:
        raise ClipxferError(f"{path}: no templates in the file; write one per line with {{}} for the class name")
    return description, templates


def template_set_names() -> list[str]:
    """Names of the built-in template sets."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))


def template_set_path(spec: str) -> Path:
    """The file behind a set name or a path, or one clear error."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    named = PROMPTS_DIR / f"{spec}.txt"
    if named.is_file():
        return named
    if path.suffix or os.sep in spec:
        raise ClipxferError(f"template file {spec} not found")
    raise ClipxferError(f"unknown template set '{spec}': use one of {', '.join(template_set_names())} or a text file path")


def load_templates(spec: str) -> list[str]:
    """Templates of a named set (``simple``, ``openai_imagenet``, ``industrial``, ...) or of a text file."""
    return read_template_file(template_set_path(spec))[1]


def list_template_sets() -> list[dict]:
    """Every built-in set: ``{"name", "description", "templates" (count), "example", "path"}``."""
    listing = []
    for name in template_set_names():
        path = PROMPTS_DIR / f"{name}.txt"
        description, templates = read_template_file(path)
        listing.append(
            {"name": name, "description": description, "templates": len(templates), "example": templates[0], "path": str(path)}
        )
    return listing


# ---------------------------------------------------------------- class names


def check_classes(classnames: list[str], where: str) -> list[str]:
    """At least two distinct, non-empty names, or one clear error naming ``where``."""
    from .labelled import check_classes as check

    if any(not name for name in classnames):
        raise ClipxferError(f"{where}: an empty class name; write each class once, separated by commas or one per line")
    check(classnames, where)
    return classnames


def classes_from_folder(root: str | os.PathLike) -> list[str]:
    """The sorted subfolder names of an ImageFolder (hidden folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise ClipxferError(f"{root}: not a folder")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ClipxferError(f"{root}: no class subfolders; give --classes or put each class's images in its own subfolder")
    return check_classes(names, str(root))


def load_classnames(spec: str) -> list[str]:
    """Class names from a text file (one per line) or a comma-separated list (``"cat,dog,car"``)."""
    path = Path(spec).expanduser()
    if path.is_file():
        names = [line.strip() for line in _read_lines(path) if line.strip() and not line.strip().startswith("#")]
        if not names:
            raise ClipxferError(f"{path}: no class names in the file; write one per line")
        return check_classes(names, str(path))
    if "," not in spec and path.suffix in (".txt", ".csv", ".lst"):
        raise ClipxferError(f"class file {spec} not found")
    return check_classes([name.strip() for name in spec.split(",")], f"--classes '{spec}'")


def prompt_name(classname: str) -> str:
    """How a class name is written into a template: folder names use ``_`` for spaces."""
    return classname.replace("_", " ")


# ---------------------------------------------------------------- descriptions


def load_descriptions(path: str | os.PathLike, classnames: list[str]) -> dict[str, list[str]]:
    """Per-class descriptions from a CSV (columns ``class,description``, one row per sentence) or a
    JSON object (``class -> list of sentences`` or one sentence). Classes without descriptions use
    the templates alone; a class that is not in ``classnames`` is an error (a typo would silently
    drop its sentences)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ClipxferError(f"descriptions file {path} not found")
    if not path.read_bytes().strip():
        raise ClipxferError(f"{path}: empty descriptions file; write class,description rows or a JSON object")
    table = _read_description_json(path) if path.suffix.lower() == ".json" else _read_description_csv(path)
    unknown = sorted(set(table) - set(classnames))
    if unknown:
        raise ClipxferError(
            f"{path}: descriptions for unknown class(es) {', '.join(unknown[:5])}; classes are {', '.join(classnames)}"
        )
    for name, sentences in table.items():
        for sentence in sentences:
            if "{}" in sentence:
                check_template(sentence, f"{path} ({name})")
    if not any(table.values()):
        raise ClipxferError(f"{path}: no descriptions in the file")
    return {name: table[name] for name in classnames if table.get(name)}


def _read_description_json(path: Path) -> dict[str, list[str]]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClipxferError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ClipxferError(f"{path}: expected a JSON object mapping each class to a list of descriptions")
    table = {}
    for name, value in raw.items():
        sentences = [value] if isinstance(value, str) else value
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise ClipxferError(f"{path}: descriptions of '{name}' must be a string or a list of strings")
        table[str(name)] = [s.strip() for s in sentences if s.strip()]
    return table


def _read_description_csv(path: Path) -> dict[str, list[str]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ClipxferError(f"{path}: not a readable CSV ({exc}); expected columns class,description") from None
    missing = {"class", "description"} - set(frame.columns)
    if missing:
        raise ClipxferError(f"{path}: missing column(s) {', '.join(sorted(missing))}; expected class,description")
    table: dict[str, list[str]] = {}
    for name, sentence in zip(frame["class"], frame["description"]):
        if sentence.strip():
            table.setdefault(name.strip(), []).append(sentence.strip())
    return table


def description_texts(classname: str, descriptions: dict[str, list[str]] | None) -> list[str]:
    """The description sentences of one class, with ``{}`` (if any) filled with its name."""
    sentences = (descriptions or {}).get(classname, [])
    return [s.format(prompt_name(classname)) if "{}" in s else s for s in sentences]
