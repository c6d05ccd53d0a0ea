"""make_client: LocalCluster on CPU, LocalCUDACluster with a GPU resource when CUDA is visible."""

from __future__ import annotations

import dataclasses
import os
import sys
import types

import pytest
from distributed import LocalCluster

from laion_dask.ground.config import ClusterConfig
from laion_dask.orchestration import cluster
from tests.helpers.cluster import LOOPBACK_CLUSTER

CPU = dict(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)


def test_cpu_machine_gets_a_local_cluster_without_gpu_resources(monkeypatch) -> None:
    monkeypatch.setattr(cluster, "gpu_available", lambda: False)
    with cluster.cluster_client(ClusterConfig(**CPU)) as client:
        assert isinstance(client.cluster, LocalCluster)
        assert client.submit(sum, [1, 2]).result() == 3
        assert cluster.scoring_resources(client) is None


def test_gpu_require_without_cuda_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(cluster, "gpu_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cluster.make_client(ClusterConfig(gpu="require", **CPU))


def test_gpu_visible_without_dask_cuda_falls_back_or_raises(monkeypatch) -> None:
    monkeypatch.setattr(cluster, "gpu_available", lambda: True)
    monkeypatch.setattr(cluster, "dask_cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="dask-cuda is not installed"):
        cluster.make_client(ClusterConfig(gpu="require", **CPU))
    with cluster.cluster_client(ClusterConfig(**CPU)) as client:
        assert cluster.scoring_resources(client) is None


def test_a_cpu_cluster_start_does_not_import_torch() -> None:
    """Without dask-cuda no GPU cluster can start: torch (1.4 s CPU) is not imported to ask."""
    import subprocess

    code = (
        "import sys\n"
        "from laion_dask.ground.config import ClusterConfig\n"
        "from laion_dask.orchestration import cluster\n"
        "cluster.dask_cuda_available = lambda: False\n"
        "cluster._nvidia_driver_loaded = lambda: False\n"
        "cfg = ClusterConfig(n_workers=1, processes=False, dashboard_address=None)\n"
        "with cluster.cluster_client(cfg) as client:\n"
        "    assert client.submit(sum, [1, 2]).result() == 3\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]


def test_gpu_path_builds_local_cuda_cluster_with_gpu_resource(monkeypatch) -> None:
    """With CUDA visible and dask-cuda importable, LocalCUDACluster gets resources={"GPU": 1}.

    dask-cuda needs a real GPU to start, so a stand-in records its arguments and starts the
    equivalent LocalCluster (one in-process worker carrying the same resources).
    """
    import torch

    seen: dict = {}

    def fake_local_cuda_cluster(**kwargs):
        seen.update(kwargs)
        kwargs.pop("CUDA_VISIBLE_DEVICES")
        return LocalCluster(n_workers=1, processes=False, **kwargs)

    monkeypatch.setitem(
        sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=fake_local_cuda_cluster)
    )
    monkeypatch.setattr(cluster, "gpu_available", lambda: True)
    monkeypatch.setattr(cluster, "dask_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = ClusterConfig(threads_per_worker=2, dashboard_address=None)
    with cluster.cluster_client(cfg) as client:
        assert seen["resources"] == {"GPU": 1}
        assert seen["CUDA_VISIBLE_DEVICES"] == "0"
        assert cluster.scoring_resources(client) == {"GPU": 1}
    # gpu = never keeps the CPU cluster even when a GPU is visible
    seen.clear()
    with cluster.cluster_client(ClusterConfig(gpu="never", **CPU)) as client:
        assert not seen and cluster.scoring_resources(client) is None


def test_scheduler_address_connects_to_a_running_scheduler() -> None:
    with LocalCluster(**CPU) as lc:
        with cluster.make_client(ClusterConfig(scheduler_address=lc.scheduler_address)) as client:
            assert client.scheduler.address == lc.scheduler_address
            assert client.submit(max, [3, 4]).result() == 4


def test_gpu_available_matches_torch() -> None:
    import torch

    assert cluster.gpu_available() == (torch.cuda.is_available() and torch.cuda.device_count() > 0)


def _one_worker(processes: bool) -> ClusterConfig:
    """A one-worker local cluster on loopback, its dashboard on a free port."""
    return ClusterConfig(
        n_workers=1,
        threads_per_worker=1,
        processes=processes,
        gpu="never",
        dashboard_address="127.0.0.1:0",
    )


def test_cluster_client_closes_the_cluster_it_started():
    from distributed import Client
    from distributed.core import Status

    cfg = _one_worker(processes=False)
    with cluster.cluster_client(cfg) as client:
        local = client.cluster
        assert client.submit(sum, [1, 2]).result() == 3
    assert local.status == Status.closed
    # a client of a scheduler it did not start leaves that scheduler running
    with LocalCluster(n_workers=1, **LOOPBACK_CLUSTER) as remote:
        cluster.close_client(Client(remote.scheduler_address))
        assert remote.status == Status.running


def _child_pid() -> int:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=sum, args=([1, 2],))
    proc.start()  # a daemonic worker process raises here
    proc.join()
    return proc.exitcode


def test_child_processes_start_non_daemonic_local_workers():
    cfg = _one_worker(processes=True)
    with cluster.cluster_client(cfg, child_processes=True) as client:
        assert client.submit(_child_pid, pure=False).result() == 0
    with cluster.cluster_client(cfg) as client:  # the default: daemonic, as distributed has it
        with pytest.raises(AssertionError, match="daemonic"):
            client.submit(_child_pid, pure=False).result()


def _preloaded() -> tuple[bool, int]:
    return "laion_dask.orchestration.pipeline" in sys.modules, os.getppid()


def test_local_process_workers_are_forked_with_the_stage_runners_imported():
    """Workers come from a fork server that imported the stage runners once (issue 17: a spawned
    worker imported them again on its first task), and the server stops with the cluster."""
    import multiprocessing.forkserver

    cfg = dataclasses.replace(_one_worker(processes=True), n_workers=2)
    with cluster.cluster_client(cfg) as client:
        got = list(client.run(_preloaded).values())
        assert [loaded for loaded, _ in got] == [True, True]
        assert {parent for _, parent in got} != {os.getpid()}  # the server's children, not ours
    assert multiprocessing.forkserver._forkserver._forkserver_pid is None


def _worker_facts() -> tuple[int, int, str | None]:
    return os.getppid(), hash("laion-dask"), os.environ.get("OMP_NUM_THREADS")


def test_a_worker_server_started_early_forks_the_clusters_workers():
    """The CLI starts the fork server before it imports the pipeline; the cluster then forks
    its workers from it, with the environment the Nanny gives workers from their start (the
    fixed hash seed: every worker hashes alike, as spawned ones do)."""
    import multiprocessing.forkserver
    import subprocess

    cfg = _one_worker(processes=True)
    cluster.start_worker_server(cfg)
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    assert server is not None
    with cluster.cluster_client(cfg) as client:
        ((parent, hashed, omp),) = client.run(_worker_facts).values()
    assert parent == server
    seeded = {**os.environ, "PYTHONHASHSEED": "6640"}
    code = "print(hash('laion-dask'))"
    expected = subprocess.run([sys.executable, "-c", code], env=seeded, capture_output=True)
    assert hashed == int(expected.stdout)
    assert omp == "1"
    assert multiprocessing.forkserver._forkserver._forkserver_pid is None


def _language_models_loaded() -> int:
    from laion_dask.stages.language import load_language_model

    return load_language_model.cache_info().currsize


def test_a_preloaded_language_model_is_shared_by_the_forked_workers():
    """`laion-dask extract` has the server load the language model once; its workers start
    with it (py3langid's model file took ~0.6 s CPU per worker to read)."""
    cfg = dataclasses.replace(_one_worker(processes=True), n_workers=2)
    cluster.start_worker_server(cfg, ["laion_dask.orchestration.preload_language"])
    with cluster.cluster_client(cfg) as client:
        assert list(client.run(_language_models_loaded).values()) == [1, 1]


def test_a_cluster_without_dashboard_leaves_port_8787_alone(recwarn) -> None:
    """--no-dashboard: the scheduler's /health server takes a free port, so a cluster already on
    8787 (a user's other run) does not make distributed print a port-in-use warning."""
    import socket

    with socket.socket() as busy:
        try:
            busy.bind(("127.0.0.1", 8787))
            busy.listen()
        except OSError:
            pass  # someone holds 8787 already: the same situation
        with cluster.cluster_client(ClusterConfig(**CPU)) as client:
            assert client.submit(sum, [1, 2]).result() == 3
    assert not [w for w in recwarn if "already in use" in str(w.message)]


def test_line_progress_writes_whole_lines_with_a_heartbeat() -> None:
    import io
    import time

    from laion_dask.orchestration.runner import LineProgress

    out = io.StringIO()
    progress = LineProgress("download", 40, interval=0.02, stream=out)
    progress.start()
    progress.update(12, failed=1)
    deadline = time.monotonic() + 30
    while "download: 12/40" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)  # the heartbeat thread's own pace; no timing is asserted
    progress.update(40, failed=1)
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "download: started, 40 partitions"
    assert any(line.startswith("download: 12/40 partitions (1 failed), ") for line in lines)
    assert lines[-1].startswith("download: finished 40/40 partitions, 1 failed in ")
    with pytest.raises(ValueError, match="LAION_DASK_PROGRESS_INTERVAL"):
        LineProgress("x", 1, interval=0)


def test_run_tasks_shows_lines_when_stdout_is_not_a_terminal(capsys) -> None:
    from laion_dask.orchestration.runner import run_tasks

    with cluster.cluster_client(ClusterConfig(**CPU)) as client:
        tasks = [(f"{i:05d}", pow, (i, 2)) for i in range(5)]
        results, failures = run_tasks(client, "square", tasks, strict=False, show_progress=True)
    assert sorted(results) == [0, 1, 4, 9, 16] and failures == {}
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    assert lines[0] == "square: started, 5 partitions"
    assert lines[-1].startswith("square: finished 5/5 partitions in ")


def test_quiet_dask_logging_keeps_distributed_at_warning_or_above() -> None:
    import logging

    cluster.quiet_dask_logging(logging.INFO)
    assert logging.getLogger("distributed").level == logging.WARNING
    assert logging.getLogger("distributed.shuffle").level == logging.ERROR
    cluster.quiet_dask_logging(logging.DEBUG)
    assert logging.getLogger("distributed").level == logging.WARNING
    cluster.quiet_dask_logging(logging.ERROR)
    assert logging.getLogger("distributed").level == logging.ERROR
    cluster.quiet_dask_logging(logging.WARNING)
