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
