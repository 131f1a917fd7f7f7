"""``clipxfer bench-episodes``: the benchmark's episodes mode, novel-class N-way K-shot accuracy
with 95% confidence intervals (raw prototypes, meta-learned adapter, transductive, zero-shot) on
the same episodes. ``--json`` prints the summary rows (``method, ways, shots, episodes, accuracy,
ci95, diff, diff_ci95``)."""

from __future__ import annotations

import click

from .common import emit_json, model_options
from .group import main


@main.command("bench-episodes")
@click.argument("data")
@click.option("--novel", default=None, help="Novel classes (comma-separated names or numbers; default all).")
@click.option("--meta", type=click.Path(dir_okay=False), default=None, help="Meta-trained head to compare.")
@click.option("--methods", default=None, help="Comma-separated: zeroshot,prototypes,meta,transductive.")
@click.option("--ways", type=int, default=5, show_default=True)
@click.option("--shots", default="1,5", show_default=True, help="Comma-separated shots per class.")
@click.option("--queries", type=int, default=15, show_default=True, help="Query images per class per episode.")
@click.option("--episodes", type=int, default=300, show_default=True, help="Episodes per shot count.")
@click.option("--max-per-class", type=int, default=100, show_default=True, help="Test images per novel class to encode.")
@click.option("--seed", type=int, default=0, show_default=True)
@model_options
@click.option("--out", "out_dir", default="bench-episodes-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary rows as JSON.")
def bench_episodes(data, novel, meta, methods, ways, shots, queries, episodes, max_per_class, seed, model, device,
                   precision, out_dir, as_json):
    """N-way K-shot episodes on DATA's novel classes (test split); writes episodes.csv and episodes.md.

    Example: clipxfer bench-episodes fashion-mnist --novel 5,6,7,8,9 --meta meta.safetensors --out episodes/
    """
    from ..bench.config import parse_int_list
    from ..bench.episodes import episodes_markdown, run_episodes

    summary, _ = run_episodes(
        data, novel, model=model, meta=meta,
        methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None, ways=ways,
        shots=parse_int_list(shots, "--shots"), queries=queries, episodes=episodes, max_per_class=max_per_class,
        seed=seed, out=out_dir, progress=not as_json, device=device, precision=precision,
    )  # fmt: skip
    if as_json:
        emit_json(summary.to_dict(orient="records"))
    else:
        click.echo(episodes_markdown(summary))
        click.echo(f"wrote {out_dir}/episodes.csv, episodes.md")
