"""``clipxfer embed --engine ray`` on a local Ray instance (2 CPUs, shared by this module)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from clipxfer.embed import embed, ingest, iter_embeddings

from .test_embed import corrupt_tar, data, images, search_all  # noqa: F401  (data, images: fixtures)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_instance():
    """One small local Ray instance for the module, shut down at its end."""
    from clipxfer.embed.ray_engine import start_ray

    started = start_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def rows(folder) -> dict[str, np.ndarray]:
    found = {}
    for batch in iter_embeddings(folder):
        for key, vector in zip(batch.keys, batch.embeddings):
            assert key not in found, f"{key} written twice"
            found[key] = vector
    return found


def assert_same_embeddings(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        cosine = float(a[key] @ b[key]) / float(np.linalg.norm(a[key]) * np.linalg.norm(b[key]))
        assert cosine >= 0.999, key


def test_ray_and_local_give_the_same_shards_and_search_results(tmp_path, tiny, data, images, ray_instance):
    corrupt_tar(data / "tars-with-bad", images)
    for source, shard_size in ((data / "tars", 10_000), (data / "folder", 100), (data / "tars-with-bad", 10_000)):
        local = embed(source, tmp_path / f"local-{source.name}", tiny, shard_size=shard_size, batch_size=32)
        distributed = embed(
            source, tmp_path / f"ray-{source.name}", tiny, engine="ray", shard_size=shard_size, batch_size=32, precision="fp32"
        )
        assert distributed.embedded == local.embedded and distributed.shards_written == local.shards_written
        assert [(str(f.path), f.reason) for f in distributed.failed] == [(str(f.path), f.reason) for f in local.failed]
        assert_same_embeddings(rows(tmp_path / f"ray-{source.name}"), rows(tmp_path / f"local-{source.name}"))
    ingest(tmp_path / "local-folder", tmp_path / "index-local")
    ingest(tmp_path / "ray-folder", tmp_path / "index-ray")
    local_hits, ray_hits = search_all(tmp_path / "index-local", tiny), search_all(tmp_path / "index-ray", tiny)
    assert [[p for p, _ in hits] for hits in ray_hits] == [[p for p, _ in hits] for hits in local_hits]


def encoder_actor_pids() -> list[int]:
    """Processes of Ray Data's encoder actors (Ray names them after the callable class)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "EncodeActor" in cmdline and proc.info["pid"] != os.getpid():
            pids.append(proc.info["pid"])
    return pids


@pytest.mark.slow
def test_worker_killed_mid_job_still_embeds_every_item_exactly_once(tmp_path, tiny, data, ray_instance):
    killed = []

    def kill_encoder_after_first_shard(shard) -> None:
        if not killed:
            pids = encoder_actor_pids()
            assert pids, "no encoder actor process found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)

    report = embed(
        data / "folder", tmp_path / "ray", tiny, engine="ray", shard_size=30, batch_size=16, precision="fp32",
        on_shard=kill_encoder_after_first_shard,
    )
    assert killed and report.embedded == 240 and report.shards_written == 8 and not report.failed
    local = embed(data / "folder", tmp_path / "local", tiny, shard_size=30)
    assert local.embedded == 240
    assert_same_embeddings(rows(tmp_path / "ray"), rows(tmp_path / "local"))
