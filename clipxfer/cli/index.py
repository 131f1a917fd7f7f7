"""``clipxfer index``, ``search``, ``info``, ``dups``: build and query an image index."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import click

from ..errors import ClipxferError
from ..paths import path_text
from .common import emit_json, model_options, printable
from .group import main

INDEX_OPTION = click.option(
    "--index",
    "index_path",
    type=click.Path(file_okay=False),
    default=None,
    help="Index folder. Default: $CLIPXFER_INDEX, else ~/.local/share/clipxfer/index.",
)


@main.command("index")
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False))
@INDEX_OPTION
@click.option(
    "--from-embeddings",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Build from embedding shards ('clipxfer embed') instead of a FOLDER.",
)
@model_options
@click.option(
    "--index-type",
    type=click.Choice(["flat", "hnsw", "ivf", "auto"]),
    default=None,
    help="flat (exact, the default for a new index), hnsw, ivf (IVF-PQ) or auto (by collection size and RAM).",
)
@click.option("--workers", type=int, default=None, help="Decoding processes (0: decode in this process).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--fail-fast", is_flag=True, help="Stop at the first unreadable file (after saving what is done).")
@click.option(
    "--rebuild",
    is_flag=True,
    help="Rebuild a damaged index: a new database from the rows of the old one that can still be read,"
    " then the rest encoded from FOLDER.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts and failed files as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def index_command(
    folder, index_path, from_embeddings, model, device, precision, index_type, workers, batch_size, fail_fast, rebuild,
    as_json, quiet,
):
    """Index the images below FOLDER (again: only new and changed files are encoded).

    Example: clipxfer index ~/Pictures --index idx --model lite
    """
    from ..index import Index

    if (folder is None) == (from_embeddings is None):
        raise ClipxferError("give either a FOLDER to index or --from-embeddings EMB/")
    if from_embeddings is not None:
        from .embed import ingest_embeddings

        return ingest_embeddings(from_embeddings, index_path, index_type, as_json, quiet)

    report = Index.update(
        folder,
        model,
        path=index_path,
        index_type=index_type,
        workers=workers,
        batch_size=batch_size,
        fail_fast=fail_fast,
        progress=not quiet,
        device=device,
        precision=None if precision == "auto" else precision,
        rebuild=rebuild,
    )
    if as_json:
        emit_json(report.to_dict())
        return
    if rebuild:
        kept = f"; the damaged database is kept as {printable(report.damaged_copy)}" if report.damaged_copy else ""
        click.echo(f"rebuilt: {report.recovered} indexed images recovered from the old database{kept}")
    click.echo(
        f"{report.added} added, {report.updated} updated, {report.moved} moved, {report.removed} removed, "
        f"{report.unchanged} unchanged, {len(report.failed)} failed ({printable(report.index)})"
    )
    for failure in report.failed:
        click.echo(f"failed: {printable(failure.path)}: {printable(failure.reason)}")


@main.command()
@click.argument("query", required=False)
@click.option("--image", "image", type=click.Path(exists=True, dir_okay=False), help="Search by this image instead.")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Number of results.")
@INDEX_OPTION
@click.option("--model", default=None, metavar="SPEC", help="Must name the index's model (default: the index's own).")
@click.option("--device", default="auto", show_default=True)
@click.option("--min-score", type=float, default=None, help="Drop results scoring below this cosine similarity.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {rank, score, path}.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV with columns rank, score, path.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write an HTML page with thumbnails.")
def search(query, image, k, index_path, model, device, min_score, as_json, as_csv, html_path):
    """Find indexed images matching a text QUERY (or --image PATH).

    Example: clipxfer search "a cracked weld" --index idx -k 5 --html results.html
    """
    from ..index import Index

    if (query is None) == (image is None):
        raise ClipxferError("give either a text QUERY or --image PATH")
    if as_json and as_csv:
        raise ClipxferError("choose one of --json and --csv")
    with Index.open(index_path) as idx:
        if image is not None:
            hits = idx.search_image(Path(image), k, idx.encoder(model, device=device), min_score)
        else:
            # A cached query loads no model; a new one only the text tower.
            hits = idx.search_text(query, k, model, min_score, device=device)
    if html_path:
        from ..index.html import results_page
        from ..paths import atomic_write_bytes

        title = f"clipxfer: {query}" if query is not None else f"clipxfer: images like {Path(image).name}"
        atomic_write_bytes(Path(html_path), results_page(title, hits).encode("utf-8"))
    if as_json:
        emit_json([hit.to_dict() for hit in hits])
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["rank", "score", "path"])
        for hit in hits:
            # CSV quotes newlines itself; only undecodable bytes need escaping.
            writer.writerow([hit.rank, f"{hit.score:.6f}", path_text(hit.path)])
    else:
        for hit in hits:
            click.echo(f"{hit.rank:>3}  {hit.score:.4f}  {printable(hit.path)}")


@main.command()
@INDEX_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def info(index_path, as_json):
    """Model, size, index type and last update of an index.

    Example: clipxfer info --index idx --json
    """
    from ..index import Index

    with Index.open(index_path) as idx:
        details = idx.info()
    if as_json:
        emit_json(details)
        return
    for key, value in details.items():
        click.echo(f"{key:<14}{printable(value)}")


@main.command()
@INDEX_OPTION
@click.option("--threshold", type=float, default=0.95, show_default=True, help="Minimum cosine similarity.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {score, a, b}.")
def dups(index_path, threshold, as_json):
    """Near-duplicate image pairs in an index, most similar first.

    Example: clipxfer dups --index idx --threshold 0.95
    """
    from ..index import Index

    with Index.open(index_path) as idx:
        pairs = idx.duplicates(threshold)
    if as_json:
        emit_json([pair.to_dict() for pair in pairs])
        return
    for pair in pairs:
        click.echo(f"{pair.score:.4f}  {printable(pair.a)}  {printable(pair.b)}")
