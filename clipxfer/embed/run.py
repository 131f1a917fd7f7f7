"""``embed``: a source of images -> a folder of embedding shards, on this machine or on Ray."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..encoders.pipeline import DEFAULT_BATCH_SIZE, Failure
from ..errors import ClipxferError
from ..paths import path_text
from . import shards
from .shards import EncoderInfo, ShardData
from .sources import DEFAULT_SHARD_SIZE, open_source

ENGINES = ("local", "ray")


@dataclass
class EmbedReport:
    """What one ``clipxfer embed`` run did."""

    out: str
    engine: str
    model_id: str
    shards_written: int = 0
    shards_skipped: int = 0
    embedded: int = 0
    failed: list[Failure] = field(default_factory=list)
    total_embedded: int = 0  # in the whole folder, earlier runs included

    def to_dict(self) -> dict:
        """The stable JSON form: counts, ``failed_count`` and ``failed`` as {key, reason} objects."""
        return {
            "out": self.out,
            "engine": self.engine,
            "model_id": self.model_id,
            "shards_written": self.shards_written,
            "shards_skipped": self.shards_skipped,
            "embedded": self.embedded,
            "total_embedded": self.total_embedded,
            "failed_count": len(self.failed),
            "failed": [{"key": path_text(f.path), "reason": f.reason} for f in self.failed],
        }


def embed(
    source: str | os.PathLike,
    out: str | os.PathLike,
    model=None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_timeout: float = 30,
    num_gpus_per_worker: float = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    actors: int | None = None,
    progress: bool = False,
    on_shard: Callable[[ShardData], None] | None = None,
) -> EmbedReport:
    """Embed every image of ``source`` into parquet shards + a manifest in ``out``.

    ``source``: a folder of images, webdataset ``.tar`` shards (a folder, one file or a brace
    pattern), parquet files with image bytes or paths (img2dataset's layout), or a Hugging Face
    dataset saved with ``save_to_disk``. One shard per input unit (see :mod:`.sources`); units
    whose shard exists are skipped, so a re-run resumes a killed job; for a folder, a re-run
    embeds exactly the files added or changed since. ``engine`` ``ray`` runs the same decode and
    encode code on Ray Data (at ``ray_address``, or a local instance; ``ray_timeout`` seconds to
    reach it).
    ``on_shard`` is called after each shard is written (progress reporting).
    """
    from ..encoders.registry import load_encoder

    if engine not in ENGINES:
        raise ClipxferError(f"unknown engine '{engine}': use local or ray")
    if batch_size < 1:
        raise ClipxferError(f"--batch-size must be at least 1, not {batch_size}")
    if engine == "ray":
        from .ray_engine import check_ray_address, import_ray

        import_ray()  # a missing extra or a malformed address is reported before any work
        check_ray_address(ray_address, ray_timeout)
    out = Path(out).expanduser()
    src = open_source(source, shard_size, lambda: shards.embedded_items(out))
    out.mkdir(parents=True, exist_ok=True)
    shards.remove_partial_files(out)
    encoder = model if model is not None and not isinstance(model, str) else load_encoder(
        model, "cpu" if engine == "ray" and device in (None, "auto") else device, precision
    )
    info = EncoderInfo.of(encoder)
    source_info = {**src.describe(), "spec": str(source)}
    _check_existing(out, info, source_info)
    done = [u.name for u in src.units if shards.shard_path(out, u.name).is_file()]
    todo = [u for u in src.units if u.name not in set(done)]
    if src.kind == "folder":
        # Every shard there holds files of this folder, and the units are exactly the files not in
        # one (a unit named as an old shard holds that shard's files, all changed: it replaces it).
        done, todo = shards.shard_names(out), list(src.units)
    for name in done:
        meta = shards.shard_metadata(shards.shard_path(out, name))
        if meta.get("model_id") != info.model_id:
            raise ClipxferError(f"{shards.shard_path(out, name)} was made with {meta.get('model_id')}, not {info.model_id}: use another --out")
    report = EmbedReport(str(out), engine, info.model_id, shards_skipped=len(done))
    written = list(done)
    order = {name: i for i, name in enumerate(done + [u.name for u in src.units if u.name not in set(done)])}
    if todo:
        run = _run(engine, todo, encoder, info, batch_size, workers, ray_address, ray_timeout, num_gpus_per_worker, precision, actors, progress)
        for shard in run:
            shards.write_shard(out, info, shard, {"source_kind": src.kind})
            if shard.name not in written:
                written.append(shard.name)
            report.shards_written += 1
            report.embedded += len(shard)
            report.failed.extend(shard.failed)
            shards.write_manifest(out, info, source_info, sorted(written, key=order.__getitem__))
            if on_shard:
                on_shard(shard)
    if src.kind == "folder" and report.shards_written:
        written = _drop_superseded(out, info, done, written, {u.name for u in todo})
    manifest = shards.write_manifest(out, info, source_info, sorted(written, key=order.__getitem__))
    report.total_embedded = manifest["count"]
    return report


def _drop_superseded(out: Path, info: EncoderInfo, done: list[str], written: list[str], new: set[str]) -> list[str]:
    """Changed files were embedded again in this run's shards: their old rows leave the older
    shards (each rewritten atomically after the new one exists, so every file is always in a
    shard). Returns the shard names still present."""
    pq = shards.need("pyarrow.parquet")

    again: set[str] = set()
    for name in new:
        path = shards.shard_path(out, name)
        if path.is_file():
            again.update(shards.keys_of(pq.read_table(path, columns=_key_columns(path))))
    for name in written:
        if name in done and name not in new:
            shards.drop_keys(out, info, name, again)
    return [name for name in written if shards.shard_path(out, name).is_file()]


def _key_columns(path: Path) -> list[str]:
    pq = shards.need("pyarrow.parquet")

    return [c for c in ("key", "key_bytes") if c in pq.read_schema(path).names]


def _check_existing(out: Path, info: EncoderInfo, source_info: dict) -> None:
    manifest = shards.read_manifest(out)
    if manifest is None:
        return
    if manifest["model_id"] != info.model_id:
        raise ClipxferError(
            f"{out} holds embeddings of {manifest['model_id']}, not {info.model_id}: "
            f"use --model {manifest['model_spec']} or another --out"
        )
    if manifest["source"].get("root") != source_info["root"]:
        raise ClipxferError(f"{out} holds embeddings of {manifest['source'].get('root')}: use another --out for this source")


def _run(engine, todo, encoder, info, batch_size, workers, ray_address, ray_timeout, num_gpus_per_worker, precision, actors, progress):
    if engine == "local":
        from .local import run_local

        yield from run_local(todo, encoder, batch_size, workers)
        return
    from .ray_engine import run_ray, start_ray

    started = start_ray(ray_address, timeout=ray_timeout)
    try:
        yield from run_ray(
            todo,
            info.model_spec,
            info.model_id,
            encoder.input_size,
            (info.dim, info.feature_dim),
            batch_size,
            num_gpus_per_worker,
            precision,
            actors,
            progress,
        )
    finally:
        if started:
            import ray

            ray.shutdown()
