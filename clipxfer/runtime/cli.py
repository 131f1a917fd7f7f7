"""``clipxfer-run``: the runtime's command line (argparse, no torch, no click).

    clipxfer-run BUNDLE IMAGES... [--json] [--alpha A]
    clipxfer-run watch FOLDER --bundle BUNDLE [--out results.jsonl] [--move-to OK NG] [--ok-class NAME]
    clipxfer-run serve BUNDLE [--host 127.0.0.1] [--port 8080] [--token SECRET] [--max-upload-mb 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import ClipxferError
from ..images import find_images


def _predict(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="clipxfer-run", description="Run an exported bundle on images "
                                     "(also: clipxfer-run watch ..., clipxfer-run serve ...).")  # fmt: skip
    parser.add_argument("bundle", help="a folder made by 'clipxfer export'")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--json", action="store_true", help="one JSON object with every answer")
    parser.add_argument("--alpha", type=float, default=None, help="conformal level instead of the bundle's")
    args = parser.parse_args(argv)
    from .bundle import Bundle

    bundle = Bundle.load(args.bundle)  # a bad bundle is named before the images are looked at
    paths: list[Path] = []
    for item in args.images:
        path = Path(item)
        if path.is_dir():
            paths.extend(find_images(path))
        elif path.is_file():
            paths.append(path)
        else:
            raise ClipxferError(f"{path}: no such image file or folder")
    if not paths:
        raise ClipxferError(f"no images found in {', '.join(args.images)}")
    answer = bundle.predict(paths, alpha=args.alpha)
    rows = [{"file": str(path), **row} for path, row in zip(paths, answer.rows())]
    if args.json:
        print(json.dumps({"bundle": bundle.describe(), "predictions": rows}))
        return
    for row in rows:
        extra = f"\t{{{', '.join(row['set'])}}}" if "set" in row else ""
        print(f"{row['decision']}\t{row['score']:.4f}{extra}\t{row['file']}")


def _watch(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="clipxfer-run watch", description="Inspect each image landing in FOLDER.")
    parser.add_argument("folder")
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--out", default=None, help="results JSON lines (default FOLDER/results.jsonl)")
    parser.add_argument("--move-to", nargs=2, metavar=("OK_DIR", "NG_DIR"), default=None)
    parser.add_argument("--ok-class", action="append", default=[], help="a classifier's good class (repeatable)")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds a file's size must hold still")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between scans without events")
    parser.add_argument("--polling", action="store_true", help="scan only, no inotify")
    parser.add_argument("--once", action="store_true", help="inspect what is there, then stop")
    parser.add_argument("--alpha", type=float, default=None)
    args = parser.parse_args(argv)
    from .bundle import Bundle
    from .watch import Watcher, WatchSettings

    settings = WatchSettings(Path(args.folder), Path(args.bundle), Path(args.out) if args.out else None,
                             tuple(args.move_to) if args.move_to else None, tuple(args.ok_class), args.settle,
                             args.interval, args.once, args.polling, args.alpha).check()  # fmt: skip
    Watcher(settings, Bundle.load(settings.bundle)).run()


def _serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="clipxfer-run serve", description="POST /predict for one bundle.")
    parser.add_argument("bundle")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token", default=os.environ.get("CLIPXFER_TOKEN"),
                        help="required from clients (Authorization: Bearer); default $CLIPXFER_TOKEN")
    parser.add_argument("--max-upload-mb", type=float, default=20.0)
    args = parser.parse_args(argv)
    from .bundle import Bundle
    from .server import check_host, make_server

    check_host(args.host, args.token)
    server = make_server(Bundle.load(args.bundle), args.host, args.port, args.token, args.max_upload_mb)
    print(f"serving {args.bundle} on http://{args.host}:{server.server_address[1]}/predict", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``clipxfer-run``; errors are one line and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"watch": _watch, "serve": _serve}
    try:
        if argv and argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            _predict(argv)
    except ClipxferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
