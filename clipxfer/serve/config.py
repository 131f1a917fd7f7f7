"""What ``clipxfer serve`` was started with: :class:`ServeConfig` (no web dependencies, so the CLI
can build one before checking the ``serve`` extra)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024


@dataclass
class ServeConfig:
    """What ``clipxfer serve`` was started with."""

    index: Path | None = None
    heads: list[Path] = field(default_factory=list)
    detector: Path | None = None
    token: str | None = None
    labels: Path | None = None
    label_method: str = "probe"
    refit_every: int = 3
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    device: str | None = None
    #: Host names besides localhost and loopback addresses that requests may be addressed to
    #: (``--allow-host``): a name for this machine, or the public name of a reverse proxy.
    allowed_hosts: list[str] = field(default_factory=list)
