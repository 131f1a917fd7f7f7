"""``clipxfer serve`` (HTTP API + web page) and ``clipxfer suggest`` (active-learning picks)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json
from .group import main
from .index import INDEX_OPTION


@main.command()
@INDEX_OPTION
@click.option("--head", "heads", multiple=True, type=click.Path(dir_okay=False),
              help="A head file to classify uploads with (repeatable; named by its file name).")
@click.option("--detector", type=click.Path(dir_okay=False), default=None, help="An anomaly detector file.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback also needs --token.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--token", default=None, envvar="CLIPXFER_TOKEN",
              help="Require this secret (Authorization: Bearer, or open /?token=...); printable ASCII, 8 or more "
              "characters. Env: CLIPXFER_TOKEN.")
@click.option("--allow-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests addressed to this host name (repeatable): without --token only "
              "localhost, loopback addresses and --host are answered, against DNS rebinding.")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False), default=None,
              help="Label file of the labelling loop. Default: labels.json in the index folder.")
@click.option("--method", "label_method", type=click.Choice(["probe", "tip"]), default="probe", show_default=True,
              help="Head the labelling loop refits (can be changed on the page).")
@click.option("--refit-every", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Refit the labelling head after this many label changes.")
@click.option("--max-upload-mb", type=click.FloatRange(0.01, 1024), default=20, show_default=True,
              help="Largest accepted upload.")
@click.option("--device", default="auto", show_default=True)
def serve(index_path, heads, detector, host, port, token, allowed_hosts, labels_path, label_method, refit_every,
          max_upload_mb, device):
    """Serve the HTTP API (OpenAPI at /docs) and the web page for searching and labelling an index.

    Example: clipxfer serve --index photos-index --head probe.safetensors --port 8000
    """
    from ..serve import ServeConfig, check_host, require_serve_extra
    from ..serve import serve as run_server

    check_host(host, token)
    require_serve_extra()
    config = ServeConfig(
        index=Path(index_path) if index_path else None, heads=[Path(h) for h in heads],
        detector=Path(detector) if detector else None, token=token,
        labels=Path(labels_path) if labels_path else None, label_method=label_method, refit_every=refit_every,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024), device=device, allowed_hosts=list(allowed_hosts),
    )
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"clipxfer serve: http://{shown}:{port}/ (API docs at /docs); Ctrl-C stops", err=True)
    run_server(config, host=host, port=port)


@main.command()
@INDEX_OPTION
@click.option("--head", "head_path", required=True, type=click.Path(dir_okay=False), help="A saved head.")
@click.option("-n", "n", type=click.IntRange(1, 10_000), default=20, show_default=True, help="Images to propose.")
@click.option("--strategy", type=click.Choice(["margin", "entropy", "least-confident"]), default="margin",
              show_default=True, help="How uncertainty is measured.")
@click.option("--diversity", type=click.FloatRange(0, 10), default=0.5, show_default=True,
              help="Penalty on similarity to images already picked (0: plain top-n).")
@click.option("--exclude", "exclude_csv", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A CSV manifest (path column) of images not to propose, e.g. those already labelled.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {rank, id, path, uncertainty, label, probability}.")
def suggest(index_path, head_path, n, strategy, diversity, exclude_csv, as_json):
    """The indexed images a head is least sure about, spread out: the ones to label next.

    Example: clipxfer suggest --index photos-index --head probe.safetensors -n 20
    """
    from ..serve.active import suggest as run_suggest

    exclude = None
    if exclude_csv:
        from ..datasets.labelled import manifest_paths

        exclude = [str(p) for p in manifest_paths(exclude_csv)]  # resolved as every manifest reader does
    picks = run_suggest(index_path, head_path, n, strategy, diversity, exclude, exclude_source=exclude_csv)
    if as_json:
        emit_json([p.to_dict() for p in picks])
        return
    for p in picks:
        click.echo(f"{p.rank:>3}  {p.uncertainty:.4f}  {p.label}:{p.probability:.3f}  {p.path}")
