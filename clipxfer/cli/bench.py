"""``clipxfer bench``: zero-shot vs adapted accuracy over shots and seeds."""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json
from .group import main


@main.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--data", "data", multiple=True, metavar="NAME|PATH",
              help="Built-in dataset (fashion-mnist, digits, mnist-5k), ImageFolder or CSV manifest; repeatable.")
@click.option("--methods", help="Comma-separated: zeroshot,probe,tip,tipf,coop,mix,transductive,lpp,clap,meta-probe,meta-coop, "
                   "or any head with +trans (TransCLIP over the test set), e.g. probe+trans.")
@click.option("--shots", help="Comma-separated shots per class, e.g. 1,2,4,8,16.")
@click.option("--seeds", help="Comma-separated seeds, e.g. 1,2,3.")
@click.option("--model", default=None, metavar="SPEC", help="Encoder (see 'clipxfer models').")
@click.option("--runtime", type=click.Choice(["auto", "torch", "openvino"]), default="auto", show_default=True,
              help="Image tower runtime (see 'clipxfer index --help').")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16", "int8"]), default="auto",
              show_default=True, help="Precision (see 'clipxfer index --help').")
@click.option("--templates", default=None, help="Template set or file for --data datasets (default simple).")
@click.option("--max-test", type=int, default=None, help="Cap the test set of --data datasets (default 2000).")
@click.option("--out", "out_dir", default="bench-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--meta", "meta", type=click.Path(dir_okay=False), default=None,
              help="Meta-trained head (clipxfer meta-train) for the meta-probe and meta-coop methods.")
@click.option("--task", type=click.Choice(["classify", "multilabel", "anomaly"]), default=None,
              help="classify (default, or the config's task); multilabel: zeroshot vs the multi-label probe "
                   "(mAP, micro/macro F1) on seeded 2x2 mosaics of built-in datasets or on multi-label "
                   "manifests, writes multilabel_results.csv, multilabel_summary.md; "
                   "anomaly: detectors over good shots (default 1,4,16) x seeds on --data anomaly sets "
                   "(train/good + test/, e.g. 'clipxfer anomaly textures'); writes anomaly_results.csv, anomaly_summary.md.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary rows as JSON.")
def bench(config_file, data, methods, shots, seeds, model, runtime, precision, templates, max_test, meta, out_dir, task,
          as_json):
    """Benchmark zero-shot against few-shot methods; writes results.csv, summary.md, plot.png.

    CONFIG_FILE is an optional TOML file (see the README); options given here override it.
    Re-running with the same --out skips finished cells.

    Example: clipxfer bench benchmarks/configs/fashion-mnist-lite.toml --out bench-out
    """
    if task == "anomaly":
        return _anomaly_bench(data, shots, seeds, model, out_dir, as_json, methods)
    from ..bench.config import (  # fmt: skip
        DEFAULT_MAX_TEST,
        BenchConfig,
        DatasetSpec,
        load_config,
        parse_int_list,
        with_overrides,
    )
    from ..bench.report import summarize
    from ..bench.run import run_bench

    config = load_config(config_file) if config_file else BenchConfig(datasets=())
    if task == "multilabel" and config.task != "multilabel" and not methods:
        from ..bench.config import MULTILABEL_METHODS

        config = with_overrides(config, methods=MULTILABEL_METHODS)  # the classify defaults do not apply
    config = with_overrides(config, task=task)
    datasets = tuple(
        DatasetSpec(source=d, templates=templates or "simple", max_test=DEFAULT_MAX_TEST if max_test is None else max_test) for d in data
    )
    config = with_overrides(
        config,
        datasets=datasets or None,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None,
        shots=parse_int_list(shots, "--shots") if shots else None,
        seeds=parse_int_list(seeds, "--seeds") if seeds else None,
        model=model,
    )
    if meta:
        options = {**config.method_options, **{m: {**config.method_options.get(m, {}), "init": meta}
                                               for m in ("meta-probe", "meta-coop")}}
        config = with_overrides(config, method_options=options)
    encoder = None
    if (runtime, precision) != ("auto", "auto"):
        from ..device import join_compute
        from ..encoders import load_encoder

        encoder = load_encoder(config.model, precision=join_compute(runtime, precision))
    if config.task == "multilabel":
        return _multilabel_bench(config, out_dir, encoder, as_json)
    table = run_bench(config, out_dir, encoder=encoder)
    if as_json:
        emit_json(summarize(table).to_dict(orient="records"))
    else:
        click.echo(Path(out_dir, "summary.md").read_text())
        click.echo(f"wrote {out_dir}/results.csv, summary.md, plot.png")


def _multilabel_bench(config, out_dir, encoder, as_json):
    from ..bench.multilabel import run_multilabel_bench, summarize

    table = run_multilabel_bench(config, out_dir, encoder=encoder)
    if as_json:
        emit_json(summarize(table).to_dict(orient="records"))
    else:
        click.echo(Path(out_dir, "multilabel_summary.md").read_text())
        click.echo(f"wrote {out_dir}/multilabel_results.csv, multilabel_summary.md")


def _anomaly_bench(data, shots, seeds, model, out_dir, as_json, methods=None):
    from ..bench.anomaly import DEFAULT_SEEDS, DEFAULT_SHOTS, run_anomaly_bench, summarize
    from ..bench.config import parse_int_list
    from ..errors import ClipxferError

    if not data:
        raise ClipxferError("--task anomaly needs --data PATH (an anomaly set: train/good + test/, or folders of them)")
    # --methods for this task: anomaly methods (auto = calibrated fusion, patchcore, gaussian, ...).
    for source in data:
        for method in (methods or "auto").split(","):
            table = run_anomaly_bench(
                source, out_dir,
                shots=parse_int_list(shots, "--shots") if shots else DEFAULT_SHOTS,
                seeds=parse_int_list(seeds, "--seeds") if seeds else DEFAULT_SEEDS,
                model=model, method=method.strip(),
            )  # fmt: skip
    if as_json:
        summary = summarize(table)
        summary.columns = [f"{name}_{stat}" for name, stat in summary.columns]
        emit_json(summary.reset_index().to_dict(orient="records"))
    else:
        click.echo(Path(out_dir, "anomaly_summary.md").read_text())
        click.echo(f"wrote {out_dir}/anomaly_results.csv, anomaly_summary.md")
