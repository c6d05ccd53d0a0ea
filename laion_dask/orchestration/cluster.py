"""Where the graph runs: a LocalCUDACluster on GPU machines, a LocalCluster otherwise, or an
existing scheduler. GPU workers declare the ``GPU`` resource; scoring tasks ask for it
(:func:`scoring_resources`), so CPU stages never queue behind the model.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import multiprocessing.forkserver
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import dask
import psutil
from distributed import Client, LocalCluster
from distributed.utils import get_mp_context

from laion_dask.ground.config import ClusterConfig

__all__ = [
    "make_client",
    "start_worker_server",
    "cluster_client",
    "close_client",
    "gpu_available",
    "dask_cuda_available",
    "scoring_resources",
    "quiet_dask_logging",
]

log = logging.getLogger(__name__)


def gpu_available() -> bool:
    """True when torch sees at least one CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0


def _nvidia_driver_loaded() -> bool:
    """Whether an NVIDIA driver shows itself (Linux, or WSL's GPU device): a cheap gate before
    :func:`gpu_available` imports torch only to word a warning."""
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/dxg"))


def dask_cuda_available() -> bool:
    """True when the ``gpu`` extra (dask-cuda) is installed."""
    return importlib.util.find_spec("dask_cuda") is not None


def make_client(cfg: ClusterConfig, *, child_processes: bool = False) -> Client:
    """A client for ``cfg``.

    ``scheduler_address`` connects to a running scheduler. Otherwise, with ``gpu`` ``auto`` or
    ``require``, CUDA visible and dask-cuda installed: a ``LocalCUDACluster`` with one worker per
    GPU, each declaring ``resources={"GPU": 1}``; else a ``LocalCluster``. ``gpu = "require"``
    without both raises ``RuntimeError``. ``child_processes`` starts local workers non-daemonic
    (``distributed.worker.daemon = False``) so that tasks may start processes of their own, as
    ``clip.loader_processes`` does; a remote cluster's workers are configured where they start.
    ``malloc_mmap_threshold`` adds ``MALLOC_MMAP_THRESHOLD_`` to the environment the Nanny gives
    local worker processes (``distributed.nanny.pre-spawn-environ``, next to Dask's own
    ``MALLOC_TRIM_THRESHOLD_``); see :class:`~laion_dask.ground.config.ClusterConfig` for the memory
    trade-off. Unset (the default), Dask's environment is left as it is. (The Nanny also
    writes its pre-spawn variables into this process's ``os.environ`` before it starts a
    worker, so local clusters started later by the same process inherit the value.)

    A local CPU cluster of processes forks its workers from a fork server that has imported
    :data:`WORKER_PRELOAD` once (:func:`_forkserver_settings`), instead of spawning
    interpreters that each import them again on their first task; with
    ``malloc_mmap_threshold`` set, workers are spawned, since glibc reads the variable only as a
    process starts and a fork server's children share the server's start.
    """
    if cfg.scheduler_address is not None:
        return Client(cfg.scheduler_address)
    use_gpu = _use_gpu(cfg)
    if cfg.gpu == "require" and not use_gpu:
        raise RuntimeError(
            "cluster.gpu = 'require' but "
            + ("torch sees no CUDA device" if not gpu_available() else "dask-cuda is not installed")
            + " (pip install 'laion-dask[gpu]', or set cluster.gpu = 'auto')"
        )
    settings: dict[str, Any] = {}
    if child_processes:
        settings["distributed.worker.daemon"] = False
    if cfg.malloc_mmap_threshold is not None:
        env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
        env["MALLOC_MMAP_THRESHOLD_"] = int(cfg.malloc_mmap_threshold)
        settings["distributed.nanny.pre-spawn-environ"] = env
    elif _forks_workers(cfg, use_gpu):
        settings |= _forkserver_settings()
    kw: dict[str, Any] = {
        "memory_limit": cfg.memory_limit,
        "dashboard_address": cfg.dashboard_address,
    }
    if cfg.threads_per_worker is not None:
        kw["threads_per_worker"] = cfg.threads_per_worker
    if cfg.dashboard_address is None:
        # no dashboard, but the scheduler still serves /health on dashboard_address, which
        # defaults to 8787: another cluster there makes distributed print a 4-line warning
        kw["scheduler_kwargs"] = {"dashboard_address": ":0"}
    with dask.config.set(settings):
        if use_gpu:
            import torch
            from dask_cuda import LocalCUDACluster

            n_gpus = torch.cuda.device_count()
            n = min(cfg.n_workers or n_gpus, n_gpus)
            if "threads_per_worker" not in kw:
                cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
                kw["threads_per_worker"] = max(1, (cpus or 1) // n)
            visible = ",".join(str(i) for i in range(n))
            log.info("starting LocalCUDACluster with %d GPU worker(s)", n)
            cluster = LocalCUDACluster(CUDA_VISIBLE_DEVICES=visible, resources={"GPU": 1}, **kw)
        else:
            if cfg.gpu == "auto" and _nvidia_driver_loaded() and gpu_available():
                log.warning("CUDA is visible but dask-cuda is not installed: using a LocalCluster")
            cluster = LocalCluster(n_workers=cfg.n_workers, processes=cfg.processes, **kw)
    if settings.get(_MP_METHOD) == "forkserver":
        _FORKSERVER_CLUSTERS.add(cluster)
    return Client(cluster)


def _use_gpu(cfg: ClusterConfig) -> bool:
    # dask-cuda first: gpu_available imports torch (~1.4 s CPU), which a CPU machine's command
    # paid on every cluster start before
    return cfg.gpu != "never" and dask_cuda_available() and gpu_available()


def _forks_workers(cfg: ClusterConfig, use_gpu: bool) -> bool:
    """Whether make_client forks ``cfg``'s workers from a fork server (see its docstring)."""
    local = cfg.scheduler_address is None and cfg.processes and not use_gpu
    # no fork server on Windows: workers are spawned there, as distributed does by default
    forks = "forkserver" in multiprocessing.get_all_start_methods()
    return local and forks and cfg.malloc_mmap_threshold is None


def start_worker_server(cfg: ClusterConfig, preload: Sequence[str] = ()) -> None:
    """Start now the fork server that :func:`make_client` will fork ``cfg``'s workers from.

    It imports :data:`WORKER_PRELOAD` and the modules ``preload`` names (e.g.
    :mod:`laion_dask.orchestration.preload_language`) in a process of its own while the caller
    goes on: a command imports the stage runners meanwhile (~1.7 s CPU), where the server's
    import used to begin only once the cluster started. Nothing happens for a remote scheduler,
    spawned or GPU workers, or a server already running. The server holds the environment the
    Nanny gives a worker before it starts (its children inherit the server's, not this
    process's later one).
    """
    if not _forks_workers(cfg, _use_gpu(cfg)):
        return
    _forkserver_settings(preload)
    os.environ.update(_pre_spawn_environ())
    multiprocessing.forkserver.ensure_running()
    atexit.register(_stop_forkserver)  # a command that fails before its cluster starts


def _pre_spawn_environ() -> dict[str, str]:
    """What ``distributed.Nanny`` writes into this process's environment before it starts a
    worker process: ``distributed.nanny.pre-spawn-environ`` (a variable already set wins), and
    ``PYTHONHASHSEED`` fixed so that every worker hashes alike (distributed 2026.11's rule)."""
    config = dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}
    env = {k: os.environ.get(k, str(v)) for k, v in config.items() if v is not None}
    if env.get("PYTHONHASHSEED") in (None, "0"):
        env["PYTHONHASHSEED"] = "6640"
    return env


#: modules a fork server imports before it forks local workers: the stage runners' module and,
#: through it, distributed, pandas, pyarrow and the stages. A spawned worker imported them on its
#: first task (~1.4 s CPU each on 2 cores); forked workers share the server's import.
WORKER_PRELOAD = ("distributed", "laion_dask.orchestration.pipeline")

_MP_METHOD = "distributed.worker.multiprocessing-method"

#: local clusters whose workers come from this process's fork server: the last one to close
#: stops the server, so that it and the workers it reaped are waited for (their CPU time counts
#: in this process's children, as a user's ``time`` sees it) and no idle server outlives them
_FORKSERVER_CLUSTERS: weakref.WeakSet[Any] = weakref.WeakSet()


def _forkserver_settings(preload: Sequence[str] = ()) -> dict[str, Any]:
    """Dask settings that fork local workers from a fork server preloading WORKER_PRELOAD.

    distributed names the fork server's preloads on its first use of the method (its own
    packages, once per process); ours replace them right after, before the server starts. A
    server already running keeps what it loaded.
    """
    settings = {_MP_METHOD: "forkserver"}
    with dask.config.set(settings):
        context = get_mp_context()
    context.set_forkserver_preload([*WORKER_PRELOAD, *preload])
    return settings


def _stop_forkserver(timeout: float = 10.0) -> None:
    """Stop this process's fork server once no cluster of ours uses it (see the set above).

    Python's ``ForkServer._stop`` closes the server's liveness pipe and waits for the server,
    which exits once every process it forked has; it has no public twin. The workers of a
    closed cluster exit within moments; processes forked by someone else's cluster may live on,
    so the server is stopped only once it has no child left, and left alone after ``timeout``
    seconds (it then exits by itself with this process).
    """
    if len(_FORKSERVER_CLUSTERS):
        return
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    pid, stop = getattr(server, "_forkserver_pid", None), getattr(server, "_stop", None)
    if pid is None or stop is None:
        return
    deadline = time.monotonic() + timeout
    try:
        while psutil.Process(pid).children():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
    except psutil.NoSuchProcess:
        pass  # gone already: _stop only reaps it
    stop()


def quiet_dask_logging(level: int) -> None:
    """Set distributed's loggers for a command line at ``level`` (``logging.WARNING`` ...).

    distributed logs cluster start-up at INFO and every P2P shuffle at WARNING, which would
    bury a command's own output: its loggers are held at WARNING or above, and the shuffle
    logger at ERROR unless ``level`` is DEBUG. distributed sets its loggers' levels when it is
    imported, which this module has already done, so these settings stick.
    """
    if level > logging.DEBUG:
        logging.getLogger("distributed.shuffle").setLevel(logging.ERROR)
    logging.getLogger("distributed").setLevel(max(level, logging.WARNING))


def scoring_resources(client: Client) -> dict[str, int] | None:
    """``{"GPU": 1}`` when any worker declares a GPU resource, else None.

    Pass it as ``client.compute(scored, resources=...)``: ``dask.annotate(resources=...)`` is
    ignored by dask-expr DataFrame collections (dask 2026.8 warns and drops it).
    """
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if any((w.get("resources") or {}).get("GPU") for w in workers.values()):
        return {"GPU": 1}
    return None


def close_client(client: Client) -> None:
    """Close ``client`` and the local cluster :func:`make_client` started for it.

    A client connected to a remote scheduler has no ``cluster``: the scheduler keeps running.
    """
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()
        if cluster in _FORKSERVER_CLUSTERS:
            _FORKSERVER_CLUSTERS.discard(cluster)
            _stop_forkserver()


@contextlib.contextmanager
def cluster_client(cfg: ClusterConfig, *, child_processes: bool = False) -> Iterator[Client]:
    """``make_client(cfg)`` for the duration of a ``with`` block, then :func:`close_client`."""
    client = make_client(cfg, child_processes=child_processes)
    try:
        yield client
    finally:
        close_client(client)
