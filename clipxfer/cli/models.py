"""``clipxfer models``: which encoders exist and which open_clip weights are cached here."""

from __future__ import annotations

import click

from .common import emit_json
from .group import main


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
@click.option("--all", "show_all", is_flag=True, help="List every open_clip pair, not only cached ones.")
def models(as_json: bool, show_all: bool):
    """List backends and open_clip model:pretrained pairs, marking those cached locally.

    Example: clipxfer models --all --json
    """
    from ..encoders.registry import available_models

    listing = available_models()
    if as_json:
        emit_json(listing)
        return
    click.echo("backends:")
    for backend in listing["backends"]:
        click.echo(f"  {backend['spec']:<18} {backend['description']}")
    pairs = listing["open_clip"]
    cached = [p for p in pairs if p["cached"]]
    click.echo(f"open_clip: {len(pairs)} model:pretrained pairs, {len(cached)} cached here")
    for pair in pairs if show_all else cached:
        click.echo(f"  {pair['spec']}{'  (cached)' if pair['cached'] else ''}")
    if not show_all:
        click.echo("  (--all lists every pair; uncached ones download on first use when online)")
    click.echo(f"default: {listing['default']}")


@main.command("sample-photos")
@click.argument("target", type=click.Path(file_okay=False))
def sample_photos(target: str):
    """Export scikit-image's ~20 real sample photos into TARGET, to try clipxfer on.

    Example: clipxfer sample-photos demo/photos
    """
    from ..sample_photos import export_sample_photos

    paths = export_sample_photos(target)
    click.echo(f"{len(paths)} photos in {target}")
