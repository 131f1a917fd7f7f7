"""Prompt template sets: the files in prompts/ (one template per line, ``{}`` marks the class)."""

from __future__ import annotations

from pathlib import Path

from .errors import ClipxferError

PROMPTS_DIR = Path(__file__).parent / "prompt_sets"


def load_templates(spec: str) -> list[str]:
    """Templates of a named set (``simple``, ``openai_imagenet``, ...) or of a text file."""
    path = Path(spec)
    if not path.is_file():
        path = PROMPTS_DIR / f"{spec}.txt"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.txt")))
            raise ClipxferError(f"unknown template set '{spec}': use one of {known} or a text file path")
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not templates:
        raise ClipxferError(f"{path}: no templates in the file; write one per line with {{}} for the class name")
    for number, template in enumerate(templates, 1):
        if "{}" not in template:
            raise ClipxferError(f"{path}:{number}: template '{template}' has no {{}} where the class name goes")
    return templates
