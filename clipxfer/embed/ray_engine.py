"""The Ray Data scheduler: the same read, decode and encode code as :mod:`.local`, spread over a
Ray cluster (or a local Ray instance on this machine's cores).

Stages, streaming::

    units --flat_map(read_unit)--> items --map_batches(decode, CPU tasks)--> pixels
          --map_batches(EncodeActor, an actor pool, GPUs per actor as asked)--> vectors
          --> this process, which writes each unit's shard once all its rows have arrived

Every row carries its unit, its position in the unit and the unit's item count, so the writer
knows when a unit is complete. A killed worker's batch is retried by Ray Data (actors restart,
tasks retry); the writer keeps one row per (unit, position), so every item lands exactly once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..encoders.pipeline import Failure, ItemInfo
from ..errors import ClipxferError
from ..extras import import_extra
from .local import ShardBuilder
from .shards import ShardData
from .sources import Unit, decode_item, read_unit

# CPU-only clusters: one encoder actor per this many CPUs, the rest decode.
CPUS_PER_CPU_ACTOR = 8
# Host memory reserved per encoder actor: a ViT-B model, its batches and the torch runtime.
ACTOR_MEMORY_BYTES = 2 << 30


def import_ray():
    """The ``ray`` module, or one clear line naming the extra."""
    import_extra("ray.data", "ray", "--engine ray")
    import ray

    return ray


def worker_runtime_env() -> dict:
    """Workers import clipxfer from where this process did (a checkout works like an install)."""
    package_parent = str(Path(__file__).resolve().parents[2])
    paths = [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}


def _parse_address(address: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of a ``--ray-address`` (``auto``: scheme ``auto``, no host), or
    one line saying which forms are accepted."""
    forms = "give HOST:PORT (the head's GCS port, e.g. 10.0.0.5:6379), ray://HOST:PORT (Ray Client) or auto"
    if address == "auto":
        return "auto", "", None
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    if scheme not in ("", "ray"):
        raise ClipxferError(f"--ray-address {address}: unknown scheme '{scheme}://'; {forms}")
    host, colon, port = rest.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not colon or not host or "/" in rest:
        raise ClipxferError(f"--ray-address {address}: not HOST:PORT; {forms}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ClipxferError(f"--ray-address {address}: the port must be a number from 1 to 65535; {forms}")
    return scheme, host, int(port)


def check_ray_address(address: str | None, timeout: float = 30) -> None:
    """Refuse a malformed ``address``, a ``ray://`` one without the Ray Client extra, or one
    that cannot be reached within ``timeout`` seconds, each with one line, before any work (Ray
    itself retries an unreachable address for many minutes, then fails with a traceback)."""
    import importlib.util
    import socket
    import threading

    if address is None:
        return
    if not timeout > 0:
        raise ClipxferError(f"--ray-timeout must be a positive number of seconds, not {timeout}")
    scheme, host, port = _parse_address(address)
    if scheme == "ray" and importlib.util.find_spec("grpc") is None:
        raise ClipxferError(f"--ray-address {address} uses Ray Client, which is not installed: pip install 'ray[client]'")
    if scheme == "auto":
        return  # Ray finds the running cluster itself (RAY_ADDRESS or this machine's)

    outcome: list[BaseException | None] = []

    def connect():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    # Name resolution has no timeout of its own, so the attempt runs in a daemon thread that is
    # waited on for at most ``timeout`` seconds (left behind, it does not hold the exit).
    thread = threading.Thread(target=connect, name="ray-address-check", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise ClipxferError(f"--ray-address {address}: no answer within {timeout:g} s (--ray-timeout); is the Ray head running there?")
    error = outcome[0]
    if isinstance(error, socket.gaierror):
        raise ClipxferError(f"--ray-address {address}: cannot resolve host '{host}' ({error.strerror or error})")
    if error is not None:
        reason = "timed out" if isinstance(error, TimeoutError) else error.strerror or type(error).__name__
        raise ClipxferError(f"--ray-address {address}: cannot connect ({reason}); is the Ray head running there?")


def start_ray(address: str | None = None, num_cpus: int | None = None, timeout: float = 30) -> bool:
    """Connect to the cluster at ``address`` (checked by :func:`check_ray_address` within
    ``timeout`` seconds), or start a local instance with ``num_cpus`` (the machine's cores by
    default). Returns True when this call started or joined Ray (and the caller should shut it
    down), False when Ray was already initialised."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    options = dict(runtime_env=worker_runtime_env(), log_to_driver=False, configure_logging=False)
    if address:
        check_ray_address(address, timeout)
        _join_within(ray, address, timeout, options)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **options)
    return True


def _join_within(ray, address: str, timeout: float, options: dict) -> None:
    """``ray.init(address)``, given up after ``timeout`` seconds: something that answers on the
    port but is not a Ray head makes Ray retry for many minutes. The attempt runs in a daemon
    thread, which does not hold the process's exit when it is abandoned."""
    import threading

    outcome: list[BaseException | None] = []

    def join():
        try:
            ray.init(address=address, **options)
            outcome.append(None)
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=join, name="ray-init", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise ClipxferError(
            f"--ray-address {address}: something answers there, but no Ray cluster joined within {timeout:g} s "
            "(--ray-timeout); is it the head's GCS port (ray start --head --port PORT)?"
        )
    if outcome[0] is not None:
        text = str(outcome[0]).strip()
        first = text.splitlines()[0] if text else type(outcome[0]).__name__
        raise ClipxferError(f"--ray-address {address}: Ray could not join the cluster ({first})")


def _read_rows(row: dict, units: Sequence[Unit]) -> list[dict]:
    """Read stage: one unit -> its items as rows (payload as bytes or a local path)."""
    unit_index = int(row["unit"])
    items = read_unit(units[unit_index])
    rows = []
    for seq, item in enumerate(items):
        failed = isinstance(item, Failure)
        key = str(item.path) if failed else item[0]
        payload = None if failed else item[1]
        rows.append(
            {
                "unit": unit_index,
                "unit_count": len(items),
                "seq": seq,
                "key": key,
                "data": payload if isinstance(payload, bytes) else None,
                "path": payload if isinstance(payload, str) else "",
                "error": item.reason if failed else "",
            }
        )
    return rows


def _decode_batch(batch: dict, size: int) -> dict:
    """Decode stage (CPU tasks): the shared :func:`decode_item` per row."""
    count = len(batch["key"])
    pixels = np.zeros((count, size, size, 3), np.uint8)
    sha256, errors = [], list(batch["error"])
    widths, heights, sizes = np.zeros(count, np.int32), np.zeros(count, np.int32), np.zeros(count, np.int64)
    for row in range(count):
        sha256.append("")
        if errors[row]:
            continue
        payload = batch["path"][row] or batch["data"][row]
        result = decode_item((batch["key"][row], payload), size)
        if isinstance(result, Failure):
            errors[row] = result.reason
            continue
        pixels[row], info = result
        sha256[row], widths[row], heights[row], sizes[row] = info.sha256, info.width, info.height, info.size
    return {
        "unit": batch["unit"],
        "unit_count": batch["unit_count"],
        "seq": batch["seq"],
        "key": batch["key"],
        "sha256": np.array(sha256, dtype=object),
        "width": widths,
        "height": heights,
        "size": sizes,
        "error": np.array(errors, dtype=object),
        "pixels": pixels,
    }


class EncodeActor:
    """Encode stage: a stateful actor that loads the model once and encodes batches of pixels."""

    def __init__(self, model_spec: str, device: str, precision: str | None, model_id: str):
        from ..encoders.registry import load_encoder

        if device == "cpu":
            import torch

            # Ray limits an actor to its num_cpus threads; on CPU the model should use the cores
            # an actor stands for, as the local engine's model does.
            torch.set_num_threads(max(1, min(os.cpu_count() or 1, CPUS_PER_CPU_ACTOR)))
        self.encoder = load_encoder(model_spec, device, precision)
        if self.encoder.id != model_id:  # a worker with other weights must not mix spaces
            raise ClipxferError(f"worker loaded {self.encoder.id}, expected {model_id}: install the same model everywhere")

    def __call__(self, batch: dict) -> dict:
        encoder = self.encoder
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        count = len(ok)
        embeddings = np.zeros((count, encoder.dim), np.float32)
        features = np.zeros((count, encoder.feature_dim), np.float32)
        if ok.any():
            encoding = encoder.encode_pixels(np.ascontiguousarray(batch["pixels"][ok]))
            embeddings[ok] = encoding.embeddings
            features[ok] = encoding.features
        out = {name: value for name, value in batch.items() if name != "pixels"}
        out["embedding"] = embeddings
        out["features"] = features
        return out


def _actor_count(ray, num_gpus_per_worker: float) -> int:
    resources = ray.cluster_resources()
    if num_gpus_per_worker > 0:
        gpus = resources.get("GPU", 0)
        if gpus < num_gpus_per_worker:
            raise ClipxferError(
                f"--num-gpus-per-worker {num_gpus_per_worker} but the Ray cluster has {gpus:g} GPUs: "
                "add GPU workers or use --num-gpus-per-worker 0"
            )
        return max(1, int(gpus // num_gpus_per_worker))
    return max(1, int(resources.get("CPU", 1)) // CPUS_PER_CPU_ACTOR)


class _UnitRows:
    """Rows of one unit as they arrive, one per position (retried batches overwrite)."""

    def __init__(self, count: int):
        self.count = count
        self.rows: dict[int, tuple] = {}

    def complete(self) -> bool:
        return len(self.rows) >= self.count


def run_ray(
    units: Sequence[Unit],
    model_spec: str,
    model_id: str,
    input_size: int,
    dims: tuple[int, int],
    batch_size: int,
    num_gpus_per_worker: float = 0,
    precision: str | None = None,
    actors: int | None = None,
    progress: bool = False,
) -> Iterator[ShardData]:
    """Encode ``units`` on the Ray instance this process is connected to (see :func:`start_ray`);
    yields one :class:`ShardData` per unit as soon as the unit is complete, in completion order."""
    ray = import_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = False
    dim, feature_dim = dims
    device = "cuda" if num_gpus_per_worker > 0 else "cpu"
    actors = actors or _actor_count(ray, num_gpus_per_worker)
    units = list(units)
    dataset = (
        ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=max(1, len(units)))
        .flat_map(_read_rows, fn_kwargs={"units": units})
        .map_batches(
            _decode_batch,
            fn_kwargs={"size": input_size},
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=1,
        )
        .map_batches(
            EncodeActor,
            fn_constructor_kwargs={"model_spec": model_spec, "device": device, "precision": precision, "model_id": model_id},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=num_gpus_per_worker or None,
            num_cpus=1,
            # The model's memory, reserved per actor. Stages with different resources are not
            # fused, so decoding also stays in CPU tasks instead of running inside the actors,
            # where each model would wait for its own decoding.
            memory=ACTOR_MEMORY_BYTES,
        )
    )
    pending: dict[int, _UnitRows] = {}
    written: set[int] = set()
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for row in range(len(batch["key"])):
                unit_index = int(batch["unit"][row])
                if unit_index in written:  # a re-run batch of a unit already written
                    continue
                rows = pending.setdefault(unit_index, _UnitRows(int(batch["unit_count"][row])))
                rows.rows[int(batch["seq"][row])] = tuple(batch[name][row] for name in _COLUMNS)
                if rows.complete():
                    written.add(unit_index)
                    yield _to_shard(units[unit_index].name, pending.pop(unit_index), dim, feature_dim)
    except ray.exceptions.RayError as exc:
        raise _as_clipxfer_error(exc) from None
    for unit_index, rows in pending.items():  # only reachable if Ray lost rows: never silently
        raise ClipxferError(f"unit {units[unit_index].name}: {len(rows.rows)} of {rows.count} items came back from Ray")


_COLUMNS = ("key", "sha256", "width", "height", "size", "error", "embedding", "features")


def _to_shard(name: str, rows: _UnitRows, dim: int, feature_dim: int) -> ShardData:
    builder = ShardBuilder(name)
    infos, embeddings, features = [], [], []
    for seq in sorted(rows.rows):
        key, sha256, width, height, size, error, embedding, feature = rows.rows[seq]
        if error:
            builder.failed.append(Failure(str(key), str(error)))
            continue
        infos.append(ItemInfo(str(key), str(sha256), int(width), int(height), int(size)))
        embeddings.append(embedding)
        features.append(feature)
    if infos:
        emb = np.stack(embeddings).astype(np.float32)
        feats = np.stack(features).astype(np.float32)
        builder.add(infos, emb, emb if feature_dim == dim and np.array_equal(emb, feats) else feats)
    return builder.build(dim, feature_dim)


def _as_clipxfer_error(exc: Exception) -> ClipxferError:
    """A Ray failure as one line; a ClipxferError raised in a worker keeps its own message."""
    cause = getattr(exc, "cause", None)
    while cause is not None and not isinstance(cause, ClipxferError):
        cause = getattr(cause, "cause", None) or cause.__cause__
    if isinstance(cause, ClipxferError):
        return cause
    print(f"ray: {exc}", file=sys.stderr)
    return ClipxferError(f"the Ray job failed ({type(exc).__name__}); finished shards are kept: run the same command again")
