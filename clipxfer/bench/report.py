"""Turning results.csv into summary.md (mean +- std, gain over zero-shot) and plot.png."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..paths import atomic_write_bytes


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std of accuracy per dataset, method and shots over seeds, plus the gain over the
    dataset's zero-shot accuracy."""
    grouped = table.groupby(["dataset", "method", "shots"], as_index=False).agg(
        accuracy_mean=("accuracy", "mean"),
        accuracy_std=("accuracy", "std"),
        seeds=("seed", "nunique"),
        fit_seconds=("fit_seconds", "mean"),
    )
    grouped["accuracy_std"] = grouped["accuracy_std"].fillna(0.0)
    # Methods in the order the run listed them, not alphabetically.
    order = {method: i for i, method in enumerate(table["method"].drop_duplicates())}
    grouped = grouped.sort_values(["dataset", "method", "shots"], key=lambda col: col.map(order) if col.name == "method" else col)
    zeroshot = table[table["method"] == "zeroshot"].groupby("dataset")["accuracy"].mean()
    grouped["gain_over_zeroshot"] = grouped["accuracy_mean"] - grouped["dataset"].map(zeroshot)
    return grouped


def summary_markdown(table: pd.DataFrame) -> str:
    """One markdown table per dataset: rows = methods, columns = shots, cells = mean +- std (gain)."""
    summary = summarize(table)
    lines = ["# Benchmark summary", ""]
    model_ids = ", ".join(sorted(table["model_id"].astype(str).unique()))
    lines += [f"Model: `{model_ids}`. Accuracy on the held-out test set, mean +- std over seeds; "
              "in brackets the gain over zero-shot.", ""]  # fmt: skip
    for dataset, rows in summary.groupby("dataset"):
        adapted = rows[rows["method"] != "zeroshot"]  # label-free (0-shot) cells of transductive methods too
        shots = sorted(int(s) for s in adapted["shots"].unique())
        zs = rows[rows["method"] == "zeroshot"]
        lines += [f"## {dataset}", ""]
        if len(zs):
            lines += [f"Zero-shot: {zs['accuracy_mean'].iloc[0]:.3f} (n_test = {int(table[table['dataset'] == dataset]['n_test'].iloc[0])})", ""]
        if adapted.empty:  # only zero-shot ran: no table to draw
            continue
        lines.append("| method | " + " | ".join(f"{k} shots" for k in shots) + " |")
        lines.append("| --- |" + " --- |" * len(shots))
        for method, method_rows in adapted.groupby("method", sort=False):
            by_shots = method_rows.set_index("shots")
            cells = []
            for k in shots:
                if k not in by_shots.index:
                    cells.append("")
                    continue
                r = by_shots.loc[k]
                gain = "" if pd.isna(r["gain_over_zeroshot"]) else f" ({r['gain_over_zeroshot']:+.3f})"
                spread = f" +- {r['accuracy_std']:.3f}" if r["seeds"] > 1 else ""
                cells.append(f"{r['accuracy_mean']:.3f}{spread}{gain}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_accuracy(table: pd.DataFrame, path: Path) -> None:
    """Accuracy vs shots per method (error bars = std over seeds), zero-shot as a flat line;
    one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(table)
    datasets = list(summary["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = summary[summary["dataset"] == dataset]
        for method, method_rows in rows[rows["shots"] > 0].groupby("method", sort=False):
            method_rows = method_rows.sort_values("shots")
            ax.errorbar(method_rows["shots"], method_rows["accuracy_mean"], yerr=method_rows["accuracy_std"],
                        marker="o", capsize=3, label=method)  # fmt: skip
        zs = rows[rows["method"] == "zeroshot"]
        if len(zs):
            ax.axhline(zs["accuracy_mean"].iloc[0], color="black", linestyle="--", label="zero-shot")
        ax.set_xscale("log", base=2)
        shots = sorted(s for s in rows["shots"].unique() if s > 0)
        if shots:
            ax.set_xticks(shots, [str(s) for s in shots])
        ax.set_xlabel("labelled images per class")
        ax.set_ylabel("test accuracy")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(table: pd.DataFrame, out: Path) -> None:
    """summary.md and plot.png next to results.csv."""
    if table.empty:
        return
    atomic_write_bytes(out / "summary.md", summary_markdown(table).encode())
    plot_accuracy(table, out / "plot.png")
