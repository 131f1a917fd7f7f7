"""A hot folder on the line: every new image is inspected once, one JSON line per part.

The results file is the ledger. A part is identified by its name, size and modification time; on
start the ledger is read back and anything in the folder it does not list is inspected, so a
restart (even after ``kill -9``) neither repeats a part nor loses one. Each line is written with one
``write`` and fsynced before the part is moved (``--move-to``); a torn last line (killed mid-write)
is cut off and that part inspected again. A file is taken only once its size and modification time
have held still for ``settle`` seconds (a camera still writing it is left alone); a file that does
not decode gets a line with its reason and is not retried.

Finding files is a scan of the folder; ``watchdog`` (inotify) only wakes the scan early, and
without it (or where inotify fails: network shares) the scan runs every ``interval`` seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ClipxferError, ImageDecodeError
from ..images import is_image_path
from .bundle import Bundle


@dataclass
class WatchSettings:
    """What ``clipxfer-run watch`` was asked for, checked before the bundle is loaded."""

    folder: Path
    bundle: Path
    out: Path | None = None
    move_to: tuple[Path, Path] | None = None
    ok_classes: tuple[str, ...] = ()
    settle: float = 0.5
    interval: float = 1.0
    once: bool = False
    polling: bool = False
    alpha: float | None = None

    def check(self) -> "WatchSettings":
        self.folder = Path(self.folder)
        if not self.folder.is_dir():
            raise ClipxferError(f"{self.folder}: not a folder to watch")
        self.out = Path(self.out) if self.out else self.folder / "results.jsonl"
        if self.settle < 0 or self.interval <= 0:
            raise ClipxferError("--settle must be >= 0 and --interval > 0 seconds")
        if self.move_to:
            self.move_to = (Path(self.move_to[0]), Path(self.move_to[1]))
            for target in self.move_to:
                target.mkdir(parents=True, exist_ok=True)
        return self


@dataclass
class Ledger:
    """The results file: parts already answered, keyed by (name, size, mtime_ns)."""

    path: Path
    done: set = field(default_factory=set)

    def load(self) -> "Ledger":
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # killed mid-write: that part was never answered
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as handle:
                handle.truncate(cut)
            data = data[:cut]
        for line in data.splitlines():
            try:
                row = json.loads(line)
                self.done.add((row["file"], row["size"], row["mtime_ns"]))
            except (ValueError, KeyError, TypeError):
                continue  # a foreign line: kept in the file, ignored here
        return self

    def append(self, row: dict) -> None:
        line = (json.dumps(row) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done.add((row["file"], row["size"], row["mtime_ns"]))


class Watcher:
    """Inspect the images landing in ``settings.folder`` with ``bundle``; see the module docstring."""

    def __init__(self, settings: WatchSettings, bundle: Bundle, log=sys.stderr):
        self.settings = settings.check()
        self.bundle = bundle
        self.log = log
        self.ledger = Ledger(self.settings.out).load()
        self.seen: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, since)
        self.wake = threading.Event()
        self.stopping = False
        if settings.move_to and bundle.kind == "classifier":
            unknown = [name for name in settings.ok_classes if name not in bundle.classes]
            if not settings.ok_classes or unknown:
                raise ClipxferError("--move-to with a classifier needs --ok-class NAME for each good class "
                                    f"(classes: {', '.join(bundle.classes)})")

    def _key(self, path: Path, stat) -> tuple[str, int, int]:
        return (path.name, stat.st_size, stat.st_mtime_ns)

    def candidates(self) -> list[tuple[Path, os.stat_result]]:
        """Image files directly in the folder whose size and time held still for ``settle`` seconds."""
        now, ready, present = time.monotonic(), [], set()
        for entry in sorted(os.scandir(self.settings.folder), key=lambda e: e.name):
            path = Path(entry.path)
            if not entry.is_file(follow_symlinks=False) or not is_image_path(path) or entry.name.startswith("."):
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone between listing and stat
            key = self._key(path, stat)
            if key in self.ledger.done:
                self._finish_move(path, key)  # answered before a restart, not moved yet
                continue
            present.add(entry.name)
            size_time = (stat.st_size, stat.st_mtime_ns)
            previous = self.seen.get(entry.name)
            if previous is None or previous[:2] != size_time:
                self.seen[entry.name] = (*size_time, now)
                if self.settings.settle > 0:
                    continue
            if now - self.seen[entry.name][2] >= self.settings.settle:
                ready.append((path, stat))
        self.seen = {name: value for name, value in self.seen.items() if name in present}
        return ready

    def inspect(self, path: Path, stat) -> dict:
        """Answer one part and record it; an unreadable file is recorded with its reason."""
        started = time.perf_counter()
        row = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "file": path.name,
               "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}  # fmt: skip
        try:
            answer = self.bundle.predict([path], alpha=self.settings.alpha)
            row.update(answer.rows()[0])
        except ImageDecodeError as exc:
            row.update(decision="unreadable", reason=exc.reason)
            print(f"refused {path}: {exc.reason}", file=self.log)
        row["latency_ms"] = round(1000 * (time.perf_counter() - started), 2)
        self.ledger.append(row)
        self._finish_move(path, self._key(path, stat), row["decision"])
        return row

    def _finish_move(self, path: Path, key, decision: str | None = None) -> None:
        if not self.settings.move_to:
            return
        if decision is None:  # after a restart: read the decision back from the ledger
            decision = self._decision_of(key)
        if decision in (None, "unreadable"):
            return
        good = decision == "ok" or decision in self.settings.ok_classes
        target = self.settings.move_to[0 if good else 1] / path.name
        try:
            shutil.move(str(path), str(target))
        except OSError as exc:
            print(f"could not move {path} to {target.parent}: {exc.strerror or exc}", file=self.log)

    def _decision_of(self, key) -> str | None:
        for line in reversed(self.ledger.path.read_text().splitlines()):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if (row.get("file"), row.get("size"), row.get("mtime_ns")) == key:
                return row.get("decision")
        return None

    def run_once(self) -> list[dict]:
        """One scan: inspect every part that is ready now."""
        return [self.inspect(path, stat) for path, stat in self.candidates() if not self.stopping]

    def run(self) -> None:
        """Scan until stopped (SIGINT/SIGTERM), woken early by filesystem events when watchdog works."""
        observer = None if self.settings.polling else self._start_observer()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())
        how = "inotify (watchdog)" if observer else f"polling every {self.settings.interval:g} s"
        print(f"watching {self.settings.folder} ({how}); results in {self.settings.out}", file=self.log)
        try:
            while not self.stopping:
                rows = self.run_once()
                if self.settings.once and not self.seen:
                    break
                if not rows:
                    # Files still settling are looked at again after the settle time.
                    wait = min(self.settings.interval, self.settings.settle or self.settings.interval) if self.seen \
                        else self.settings.interval
                    self.wake.wait(wait)
                    self.wake.clear()
        finally:
            if observer:
                observer.stop()
                observer.join(timeout=2)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def _start_observer(self):
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            return None
        wake = self.wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event):
                wake.set()

        try:
            observer = Observer()
            observer.schedule(Wake(), str(self.settings.folder), recursive=False)
            observer.start()
            return observer
        except OSError:  # inotify limits, filesystems without events: scanning alone still works
            return None
