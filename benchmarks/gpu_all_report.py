"""The one JSON of ``benchmarks/gpu_all.sh``: every step's own JSON, its status and seconds, and the
headline figures side by side. Run by the script: ``gpu_all_report.py WORK STARTED DRY_RUN``."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path


def gpu_name() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def json_document(text: str):
    """The first JSON document in a step's stdout that starts a line: a library (Ray, under load)
    may print lines of its own around the one the command writes."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"^[{\[]", text, re.MULTILINE):
        try:
            return decoder.raw_decode(text, match.start())[0]
        except ValueError:
            continue
    raise ValueError("no JSON document in the output")


def read_steps(work: Path) -> dict:
    steps = {}
    for meta in sorted(work.glob("*.meta")):
        status, start, end = meta.read_text().split()
        text = meta.with_suffix(".out").read_text()
        try:
            result = json_document(text) if text.strip() else None
        except ValueError:
            result = {"unparsed_output": text[-2000:]}
        steps[meta.stem] = {"status": status, "seconds": round(float(end) - float(start), 2), "result": result}
        if status != "ok":
            steps[meta.stem]["log_tail"] = meta.with_suffix(".log").read_text()[-2000:]
    return steps


def headline(steps: dict) -> dict:
    """The figures the issue asks for, taken from the steps that succeeded."""
    out = {}
    for name in ("encode_device_decode", "encode_pil_decode"):
        result = (steps.get(name) or {}).get("result") or {}
        for label, row in (result.get("runtimes") or {}).items():
            out[name] = {"runtime": label, "device_decode": result.get("device_decode"), **row,
                         "naive_images_per_s": next(iter(result["sets"].values()))[label]["naive_images_per_s"]}
    finetune = steps.get("finetune_lora") or {}
    if finetune.get("status") == "ok":
        result = finetune["result"]
        out["finetune_lora"] = {key: result.get(key) for key in ("fit_seconds", "epochs_run", "num_classes", "shots",
                                                                    "num_train", "accuracy", "val_accuracy")}
        out["finetune_lora"]["command_seconds"] = finetune["seconds"]
    embed = steps.get("embed_ray") or {}
    if embed.get("status") == "ok" and "embedded" in (embed.get("result") or {}):
        embedded = embed["result"]["embedded"]
        out["embed_ray"] = {"embedded": embedded, "seconds_with_ray_start": embed["seconds"],
                            "images_per_s": round(embedded / embed["seconds"], 1)}
    for name in ("search_gpu", "search_cpu"):
        search = steps.get(name) or {}
        if search.get("status") == "ok":
            out[name] = [{key: row[key] for key in ("size", "faiss", "build_s", "batched_qps", "single_qps",
                                                    "recall_at_10")} for row in search["result"]["results"]]
    return out


def main() -> None:
    work, started, dry_run = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
    steps = read_steps(work)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dry_run": dry_run,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "gpu": gpu_name(),
        "total_seconds": round(time.time() - started, 1),
        "headline": headline(steps),
        "steps": steps,
    }
    if "search_gpu" not in steps and not dry_run:
        report["search_gpu_skipped"] = "this faiss has no GPU support (pip install faiss-gpu-cu12)"
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
