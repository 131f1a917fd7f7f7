"""A self-contained HTML page of search results: inline JPEG thumbnails, scores, escaped names."""

from __future__ import annotations

import base64
import html
import io
from typing import Sequence

from ..errors import ImageDecodeError
from ..images import open_image
from ..paths import path_text

THUMBNAIL_SIZE = 192


def thumbnail_data_uri(path, size: int = THUMBNAIL_SIZE) -> str | None:
    """A small JPEG of the image as a ``data:`` URI, or None when it no longer decodes."""
    try:
        img = open_image(path, draft_size=size)
    except ImageDecodeError:
        return None
    img.thumbnail((size, size))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(path_text(title))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
main, section {{ display: flex; flex-wrap: wrap; gap: 12px; }}
section {{ border-top: 1px solid #ccc; padding: 8px 0; }}
h2 {{ width: 100%; font-size: 15px; margin: 0; }}
figure {{ margin: 0; width: {THUMBNAIL_SIZE}px; }}
figure.delete img {{ outline: 3px solid #c33; }}
img, .missing {{ width: {THUMBNAIL_SIZE}px; height: {THUMBNAIL_SIZE}px; object-fit: contain; background: #eee; }}
figcaption {{ font-size: 12px; word-break: break-all; }}
</style></head>
<body><h1>{html.escape(path_text(title))}</h1>
{body}
</body></html>
"""


def _figure(path, caption: str, css_class: str = "") -> str:
    uri = thumbnail_data_uri(path)
    name = html.escape(path_text(path.name))
    image = f'<img src="{uri}" alt="{name}">' if uri else '<div class="missing">unreadable</div>'
    klass = f' class="{css_class}"' if css_class else ""
    return (f'<figure{klass} title="{html.escape(path_text(path))}">{image}'
            f"<figcaption>{caption}<br>{name}</figcaption></figure>")


def groups_page(title: str, report, keep: str | None = None) -> str:
    """A page of duplicate groups (a :class:`~clipxfer.index.duplicates.DuplicateReport`), one row
    per group; with ``keep``, the files that rule would delete are outlined in red."""
    delete = set(report.delete_list(keep)) if keep else set()
    sections = []
    for number, group in enumerate(report.groups, 1):
        figures = []
        for member in group.members:
            marked = member.path in delete
            caption = f"{member.width}&times;{member.height}, {member.size:,} bytes" + (" &middot; delete" if marked else "")
            figures.append(_figure(member.path, caption, "delete" if marked else ""))
        heading = f"<h2>#{number} {group.tier} ({len(group.members)} files, similarity &ge; {group.score:.3f})</h2>"
        sections.append(f"<section>{heading}{''.join(figures)}</section>")
    note = (f"<p>copies: similarity &ge; {report.copy_threshold:.4f}, margin &ge; {report.copy_margin:.4f} (learned from {report.learned_from} edited copies, "
            f"{report.space}); look-alike threshold {report.lookalike_threshold}</p>")
    return _page(title, note + "\n".join(sections))


def results_page(title: str, hits: Sequence) -> str:
    """The page for ``hits`` (objects with ``rank``, ``score``, ``path``)."""
    cards = []
    for hit in hits:
        uri = thumbnail_data_uri(hit.path)
        name = html.escape(path_text(hit.path.name))
        image = f'<img src="{uri}" alt="{name}">' if uri else '<div class="missing">unreadable</div>'
        cards.append(
            f'<figure title="{html.escape(path_text(hit.path))}">{image}'
            f"<figcaption>#{hit.rank} &middot; {hit.score:.3f}<br>{name}</figcaption></figure>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(path_text(title))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
main {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {THUMBNAIL_SIZE}px; }}
img, .missing {{ width: {THUMBNAIL_SIZE}px; height: {THUMBNAIL_SIZE}px; object-fit: contain; background: #eee; }}
figcaption {{ font-size: 12px; word-break: break-all; }}
</style></head>
<body><h1>{html.escape(path_text(title))}</h1>
<main>
{chr(10).join(cards)}
</main></body></html>
"""
