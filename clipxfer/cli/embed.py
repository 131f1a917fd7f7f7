"""``clipxfer embed`` and ``export-embeddings``: embedding shards in and out (the index & search panel)."""

from __future__ import annotations

import click

from ..paths import path_text
from .common import emit_json, model_options
from .group import main


@main.command()
@click.argument("source")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder for the shards and manifest.json.")
@model_options
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="This process, or Ray Data.")
@click.option(
    "--ray-address", default=None, metavar="ADDR",
    help="Ray cluster to join: HOST:PORT, ray://HOST:PORT or auto (default: start a local Ray instance).",
)
@click.option(
    "--ray-timeout", type=float, default=30, show_default=True, metavar="SECONDS",
    help="Give up on an unreachable --ray-address after this long.",
)
@click.option("--num-gpus-per-worker", type=float, default=0, show_default=True, help="GPUs per encoder actor (--engine ray).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--shard-size", type=int, default=10_000, show_default=True, help="Items per shard for folders and HF datasets.")
@click.option("--workers", type=int, default=None, help="Decoding processes for --engine local (0: decode in this process).")
@click.option("--json", "as_json", is_flag=True, help="Print the counts and failed items as JSON.")
def embed(
    source, out, model, device, precision, engine, ray_address, ray_timeout, num_gpus_per_worker, batch_size, shard_size,
    workers, as_json,
):
    """Embed SOURCE (a folder, webdataset .tar shards, parquet, a saved HF dataset) into parquet shards.

    A re-run skips finished shards; for a folder it embeds exactly the files added or changed
    since. --engine ray runs on Ray Data: at --ray-address, or on a local Ray instance using this
    machine's cores.

    Example: clipxfer embed 'shards/{000000..000099}.tar' --out emb/ --engine ray --num-gpus-per-worker 1
    """
    from ..embed import embed as run_embed

    report = run_embed(
        source,
        out,
        model,
        engine=engine,
        ray_address=ray_address,
        ray_timeout=ray_timeout,
        num_gpus_per_worker=num_gpus_per_worker,
        batch_size=batch_size,
        shard_size=shard_size,
        workers=workers,
        device=device,
        precision=None if precision == "auto" else precision,
        progress=not as_json,
    )
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(
        f"{report.embedded} embedded in {report.shards_written} shards, {report.shards_skipped} shards already done, "
        f"{len(report.failed)} failed; {report.total_embedded} in {report.out}"
    )
    for failure in report.failed:
        click.echo(f"failed: {path_text(failure.path)}: {failure.reason}")


@main.command("export-embeddings")
@click.option("--index", "index_path", type=click.Path(file_okay=False), default=None, help="Index folder (default as for 'index').")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Empty folder for the shards.")
@click.option("--rows-per-shard", type=int, default=100_000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_embeddings(index_path, out, rows_per_shard, as_json):
    """Write an index's vectors as parquet embedding shards (the 'clipxfer embed' format).

    Example: clipxfer export-embeddings --index photos.idx --out emb/
    """
    from ..embed import export_embeddings as run_export

    manifest = run_export(index_path, out, rows_per_shard)
    if as_json:
        emit_json(manifest)
        return
    click.echo(f"{manifest['count']} vectors in {len(manifest['shards'])} shards ({out})")


def ingest_embeddings(embeddings, index_path, index_type, as_json) -> None:
    """``clipxfer index --from-embeddings``: build or extend an index from shards."""
    from ..embed import ingest

    report = ingest(embeddings, index_path, index_type, progress=not as_json)
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(
        f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged; "
        f"{report.total} in {report.index} ({report.faiss})"
    )
