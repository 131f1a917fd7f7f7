"""Cold start: wall time from process start to the command's last output line, for the commands
users run by hand, against the interpreter's own start (``python -c pass``).

    python benchmarks/cold_start.py [--runs 7] [--index DIR] [--json]

Cases: ``--help``, ``info``, ``models``, ``prompts``, ``search`` with a cached query (the query
embedding is in the text cache: no model loads), and ``search`` with a new query each run on a
``lite`` index (the text tower loads: MiniLM, not EfficientNet). Without ``--index`` it indexes
scikit-image's sample photos with ``lite`` first (not timed). The text cache lives in a fresh
``CLIPXFER_CACHE`` folder. Each case runs ``--runs`` times, interleaved with the others so machine
load hits all alike; the medians are reported, and ``over_python`` = median - python's median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHED_QUERY = "a photo of the night sky"


def timed(command: list[str], env: dict) -> float:
    """Seconds from starting ``command`` to its exit (its output complete); it must succeed."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def cases(index: Path) -> dict:
    """name -> function of the run number giving the command line."""
    cli = [sys.executable, "-m", "clipxfer"]
    return {
        "python -c pass": lambda run: [sys.executable, "-c", "pass"],
        "--help": lambda run: [*cli, "--help"],
        "info": lambda run: [*cli, "info", "--index", str(index)],
        "models": lambda run: [*cli, "models"],
        "prompts": lambda run: [*cli, "prompts"],
        "search (cached query)": lambda run: [*cli, "search", CACHED_QUERY, "--index", str(index)],
        # A query no earlier run asked: the text tower loads and encodes it.
        "search (new query, lite)": lambda run: [*cli, "search", f"cold start {time.time_ns()} {run}", "--index", str(index)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--index", type=Path, default=None, help="a lite index to search (default: built here)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CLIPXFER_CACHE": str(Path(tmp) / "cache")}
        index = args.index
        if index is None:
            index = Path(tmp) / "index"
            for command in (["sample-photos", str(Path(tmp) / "photos")],
                            ["index", str(Path(tmp) / "photos"), "--index", str(index), "--model", "lite", "--quiet"]):
                timed([sys.executable, "-m", "clipxfer", *command], env)
        commands = cases(index)
        timed(commands["search (cached query)"](0), env)  # fills the text cache
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        for run in range(args.runs):
            for name, command in commands.items():
                seconds[name].append(timed(command(run), env))
    baseline = statistics.median(seconds["python -c pass"])
    rows = {
        name: {"median_s": round(statistics.median(values), 3), "over_python_s": round(statistics.median(values) - baseline, 3),
               "runs_s": [round(v, 3) for v in values]}
        for name, values in seconds.items()
    }
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_end": os.getloadavg()[0],
        "runs": args.runs,
        "cases": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name, row in rows.items():
        print(f"{name:<26} median {row['median_s']:6.3f} s   over python {row['over_python_s']:6.3f} s")
    print(f"load average at the end: {report['load_average_at_end']:.1f}")


if __name__ == "__main__":
    main()
