"""``cluster.malloc_mmap_threshold`` reaches the local worker processes' environment (before
they start, where glibc reads it), next to Dask's own ``MALLOC_TRIM_THRESHOLD_``, and nothing
changes when it is unset."""

from __future__ import annotations

import os

import dask

from laion_dask.ground.config import ClusterConfig
from laion_dask.orchestration import cluster


def _malloc_env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}


def _config(threshold: int | None) -> ClusterConfig:
    return ClusterConfig(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        gpu="never",
        dashboard_address=None,
        malloc_mmap_threshold=threshold,
    )


def test_malloc_mmap_threshold_reaches_local_worker_processes(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    before = dask.config.get("distributed.nanny.pre-spawn-environ")
    trim = str(before["MALLOC_TRIM_THRESHOLD_"])
    with cluster.cluster_client(_config(2**25)) as client:
        (env,) = client.run(_malloc_env).values()
        assert env == {"MALLOC_MMAP_THRESHOLD_": str(2**25), "MALLOC_TRIM_THRESHOLD_": trim}
        # a worker the Nanny restarts keeps it (the Nanny holds its environment)
        client.restart()
        (env,) = client.run(_malloc_env).values()
        assert env["MALLOC_MMAP_THRESHOLD_"] == str(2**25)
    # Dask's configuration is left as it was
    assert dask.config.get("distributed.nanny.pre-spawn-environ") == before
    os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)  # the Nanny also sets it in its own process
    with cluster.cluster_client(_config(None)) as client:
        (env,) = client.run(_malloc_env).values()
        assert env == {"MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": trim}
