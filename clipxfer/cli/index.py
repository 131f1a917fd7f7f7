"""``clipxfer index``, ``search``, ``info``, ``dups``: build and query an image index."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import click

from ..errors import ClipxferError
from ..paths import path_text
from .common import emit_json, model_options, printable
from .filters import filter_options
from .group import main

#: ``--min-relevance`` given without a value (clipxfer.index.relevance.DEFAULT_MIN_RELEVANCE; not imported
#: here so that --help stays fast).
DEFAULT_MIN_RELEVANCE = 0.95

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


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("query", nargs=-1)
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Search by this image (repeat to add more); QUERY may then add or subtract terms: - blurry.")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Number of results.")
@INDEX_OPTION
@click.option("--model", default=None, metavar="SPEC", help="Must name the index's model (default: the index's own).")
@click.option("--device", default="auto", show_default=True)
@click.option("--min-score", type=float, default=None, help="Drop results scoring below this cosine similarity.")
@click.option("--min-relevance", type=float, default=None, is_flag=False, flag_value=DEFAULT_MIN_RELEVANCE,
              metavar="P", help=f"Keep only hits standing out from this query's scores over the index: at most about "
              f"1-P of those kept are chance-level (alone: {DEFAULT_MIN_RELEVANCE}).")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {rank, score, path[, relevance]}.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV with columns rank, score, path.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write an HTML page with thumbnails.")
def search(query, images, k, index_path, model, device, min_score, min_relevance, filters, as_json, as_csv, html_path):
    """Find indexed images matching QUERY (or --image PATH).

    \b
    QUERY is text, or terms joined by + and - with optional weights:
      "a dress" + red - "long sleeves"      2*"red car" - blurry      t-shirt (a - inside a word is text)
      --image a.jpg - blurry                image:b.jpg (another image, as a term)
    Each term's vector is normalised, weighted, summed, and the sum normalised.

    Example: clipxfer search "a cracked weld" --index idx -k 5 --html results.html
    """
    from ..index import Index
    from ..index.query import format_terms, parse_query

    unknown = [word for word in query if word.startswith("--")]
    if unknown:
        raise ClipxferError(f"no such option: {unknown[0]} (see 'clipxfer search --help')")
    text = " ".join(query) if query else None
    if text is None and not images:
        raise ClipxferError("give either a text QUERY or --image PATH")
    if as_json and as_csv:
        raise ClipxferError("choose one of --json and --csv")
    with Index.open(index_path) as idx:
        # Cached query texts load no model; new ones only the text tower; image terms the whole encoder.
        hits = idx.search(text, k, model, [Path(p) for p in images], filters, min_score, min_relevance, device=device)
    if html_path:
        from ..index.html import results_page
        from ..paths import atomic_write_bytes

        if images and text is None:
            title = f"clipxfer: images like {', '.join(Path(p).name for p in images)}"
        else:
            title = "clipxfer: " + (text if not images else format_terms(parse_query(text)))
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
            relevance = "" if hit.relevance is None else f"  {hit.relevance:.3f}"
            click.echo(f"{hit.rank:>3}  {hit.score:.4f}{relevance}  {printable(hit.path)}")


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
@click.option("--threshold", type=float, default=0.9, show_default=True,
              help="Look-alikes: minimum cosine similarity of two different images.")
@click.option("--keep", type=click.Choice(["newest", "largest"]), default=None,
              help="Print the files to delete (never deletes): all but the newest or largest of each exact and copy "
              "group.")
@click.option("--learn-from", type=click.IntRange(min=1), default=32, show_default=True,
              help="Indexed images copied (resized, recompressed, cropped, recoloured) to learn the copy threshold.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of that sample and its edits.")
@click.option("--model", default=None, metavar="SPEC", help="Must name the index's model (default: the index's own).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object: thresholds and groups (and delete).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV: group, tier, score, path, size, width, height, modified.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write an HTML page of the groups.")
def dups(index_path, threshold, keep, learn_from, seed, model, device, as_json, as_csv, html_path):
    """Duplicates in three tiers: exact files, copies, look-alikes.

    \b
    exact      the same bytes (SHA-256)
    copy       the same image resized, recompressed, cropped a little or recoloured: the threshold is
               learned from such copies of the index's own images, encoded with its model
    lookalike  different images with cosine similarity >= --threshold

    Example: clipxfer dups --index idx --keep newest --html dups.html
    """
    from ..index import Index

    if as_json and as_csv:
        raise ClipxferError("choose one of --json and --csv")
    with Index.open(index_path) as idx:
        idx.encoder(model, device=device)
        report = idx.duplicate_groups(threshold, model, learn_from, seed)
    delete = report.delete_list(keep) if keep else []
    if html_path:
        from ..index.html import groups_page
        from ..paths import atomic_write_bytes

        atomic_write_bytes(Path(html_path), groups_page(f"clipxfer: duplicates in {index_path or 'the index'}",
                                                        report, keep).encode("utf-8"))
    if as_json:
        emit_json(report.to_dict(keep))
        return
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["group", "tier", "score", "path", "size", "width", "height", "modified", "delete"])
        doomed = set(delete)
        for number, group in enumerate(report.groups, 1):
            for member in group.members:
                row = member.to_dict()
                writer.writerow([number, group.tier, f"{group.score:.6f}", path_text(member.path), row["size"],
                                 row["width"], row["height"], row["modified"], int(member.path in doomed)])
        return
    if keep:
        for path in delete:
            click.echo(printable(path))
        click.echo(f"{len(delete)} files would be deleted (keeping the {keep} of each exact and copy group); "
                   "nothing was deleted", err=True)
        return
    click.echo(f"copies: similarity >= {report.copy_threshold:.4f} and margin >= {report.copy_margin:.4f} (learned "
               f"from {report.learned_from} edited copies, {report.space}); look-alikes >= {report.lookalike_threshold}",
               err=True)
    for number, group in enumerate(report.groups, 1):
        click.echo(f"#{number} {group.tier} {group.score:.4f}")
        for member in group.members:
            click.echo(f"    {printable(member.path)}")
