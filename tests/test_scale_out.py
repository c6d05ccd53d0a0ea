"""Scale out and survive faults, with real processes on 127.0.0.1.

A ``dask scheduler`` and two ``dask worker`` processes (each with its nanny, one thread, no
dashboard) are started by the module fixture; the demo corpus is served by the demo's image host
with a gate in front of its ``/img/`` paths, so a test can hold downloads mid-task and kill a
worker, or the whole run, while they wait. Outputs are compared by content with a reference run
of the same config on the in-process LocalCluster (the ``client`` fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

from laion_dask.faces.demo import host as demo_host
from laion_dask.faces.demo.run import demo_config
from laion_dask.ground import schema
from laion_dask.ground.config import PipelineConfig, dump_config
from laion_dask.orchestration.pipeline import ConfigChanged, run_extract
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.run import run_pipeline
from laion_dask.products.synthetic.corpus import CorpusSpec

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
#: generous: a deadline for something to happen, never a measured duration
PATIENCE = 120.0


def wait_until(cond: Callable[[], Any], what: str, timeout: float = PATIENCE) -> Any:
    """Poll ``cond`` until it is truthy; fail naming ``what`` if it never is."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- a gate in front of the demo host ---------------------------------------------------------


class Gate:
    """Lets ``after`` more image requests through once held, then blocks the rest until released."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._passes: int | None = None  # None = open
        self.blocked = 0

    def hold(self, after: int = 0) -> None:
        with self._cond:
            self._passes = after

    def release(self) -> None:
        with self._cond:
            self._passes = None
            self._cond.notify_all()

    def enter(self, path: str) -> None:
        if not path.startswith("/img/"):
            return
        with self._cond:
            if self._passes is None:
                return
            if self._passes > 0:
                self._passes -= 1
                return
            self.blocked += 1
            try:
                self._cond.wait_for(lambda: self._passes is None)
            finally:
                self.blocked -= 1


GATE = Gate()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The demo corpus (10 pages, 4 WAT files) served on 127.0.0.1..3 behind :data:`GATE`."""
    original = demo_host._Handler.do_GET

    def gated_get(self: Any) -> None:
        GATE.enter(self.path)
        original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo_host._Handler, "do_GET", gated_get)
        root = tmp_path_factory.mktemp("corpus")
        with demo_host.serve_demo_corpus(root, CorpusSpec(n_pages=10, seed=11)) as (info, _):
            yield info
    GATE.release()


@pytest.fixture(scope="module")
def cfg(corpus) -> PipelineConfig:
    """The demo's config with small download tasks (many partitions) and patient timeouts."""
    from laion_dask.products.train import demo_model_dir

    cfg = demo_config([str(p) for p in corpus.wat_files], str(demo_model_dir()), dashboard=False)
    # 5 rows per task: a dozen partitions per stage; timeouts far above any gate hold
    return cfg.replace(
        "download", rows_per_task=5, connect_timeout=30.0, read_timeout=60.0, deadline=120.0
    )


# --- the cluster: real processes ----------------------------------------------------------------


@dataclass
class ProcessCluster:
    address: str
    client: Any
    folder: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def workers(self) -> dict[str, int]:
        """Worker address -> PID of the worker process (not its nanny); only those that answer."""
        pids = self.client.run(os.getpid, on_error="return")
        return {addr: pid for addr, pid in pids.items() if isinstance(pid, int)}

    def wait_for(self, n: int = 2, without: int | None = None) -> dict[str, int]:
        """Wait until ``n`` workers are up (none of them the process ``without``)."""
        return wait_until(
            lambda: (
                (w := self.workers())
                and len(w) == n
                and without not in w.values()
                and all(psutil.pid_exists(p) for p in w.values())
                and w
            ),
            f"{n} workers",
        )

    def kill_worker(self, addr: str) -> int:
        pid = self.workers()[addr]
        os.kill(pid, signal.SIGKILL)
        return pid


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ProcessCluster]:
    from distributed import Client

    folder = tmp_path_factory.mktemp("cluster")
    sched_file = folder / "scheduler.json"
    procs = [
        _spawn(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0"]
            + ["--no-dashboard", "--scheduler-file", str(sched_file)],
            folder / "scheduler.log",
        )
    ]
    try:
        wait_until(lambda: sched_file.is_file() and sched_file.stat().st_size > 0, "scheduler")
        for i in range(2):
            procs.append(
                _spawn(
                    [str(BIN / "dask"), "worker", "--scheduler-file", str(sched_file)]
                    + ["--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard"]
                    + ["--memory-limit", "4GB", "--name", f"w{i}"]
                    + ["--local-directory", str(folder / f"w{i}")],
                    folder / f"worker{i}.log",
                )
            )
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        with Client(address) as client:
            c = ProcessCluster(address, client, folder, procs)
            c.wait_for(2)
            yield c
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- outputs, compared by content ---------------------------------------------------------------


def _frame(run: RunDir, stage: str, by: str) -> pd.DataFrame:
    df = pd.concat([run.read_parquet(p) for p in run.parts(stage)], ignore_index=True)
    return df.sort_values(by).reset_index(drop=True)


def _tar_members(paths: list[Path]) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            assert len(names) == len(set(names)), f"duplicate members in {path}"
            out[path.name] = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    return out


def outputs(run: RunDir) -> dict[str, Any]:
    """Everything a run produced, in a form equal for equal runs (no timings, sorted rows)."""
    root = Path(run.path)
    dataset = {
        str(p.relative_to(root / "dataset")): pd.read_parquet(p)
        .sort_values(schema.KEY)
        .reset_index(drop=True)
        for p in sorted((root / "dataset").rglob("*.parquet"))
    }
    return {
        "candidates": _frame(run, "candidates", schema.UID),
        "downloads": _frame(run, "downloads", schema.KEY),
        "scores": _frame(run, "scores", schema.KEY),
        "shards": _tar_members(sorted((root / "images").glob("*.tar"))),
        "embeddings": {
            p.name: p.read_bytes() for p in sorted((root / "embeddings").rglob("*.npy"))
        },
        "dataset": dataset,
        "dataset_shards": _tar_members(sorted((root / "dataset").rglob("*.tar"))),
    }


def assert_same_outputs(got: dict[str, Any], want: dict[str, Any]) -> None:
    for name in ("candidates", "downloads", "scores"):
        pd.testing.assert_frame_equal(got[name], want[name], obj=name)
    assert got["downloads"][schema.UID].is_unique
    assert got["scores"][schema.KEY].is_unique
    assert got["shards"] == want["shards"]
    assert got["embeddings"] == want["embeddings"]
    assert got["dataset"].keys() == want["dataset"].keys()
    for name, df in want["dataset"].items():
        pd.testing.assert_frame_equal(got["dataset"][name], df, obj=f"dataset/{name}")
    assert got["dataset_shards"] == want["dataset_shards"]


def assert_counts_add_up(reports: list[Any]) -> None:
    assert [r.stage for r in reports][:3] == ["extract", "download", "score"]
    for r in reports:
        r.check()
        assert not getattr(r, "failed", {}), r.failed


@dataclass
class Reference:
    run: RunDir
    outputs: dict[str, Any]

    @property
    def n_shards(self) -> int:
        return len(self.run.markers("downloads"))

    def seed(self, dest: Path, *stages: str) -> RunDir:
        """A new run directory holding this run's finished ``stages`` (to resume from)."""
        for stage in stages:
            shutil.copytree(Path(self.run.path) / stage, dest / stage)
        return RunDir(str(dest))


@pytest.fixture(scope="module")
def reference(cfg, tmp_path_factory, client) -> Reference:
    """The same config on the in-process LocalCluster (2 workers x 1 thread)."""
    run = RunDir(str(tmp_path_factory.mktemp("ref") / "run"))
    reports = run_pipeline(run, cfg, client=client)
    assert_counts_add_up(reports)
    ref = Reference(run, outputs(run))
    assert ref.outputs["downloads"][schema.STATUS].eq("success").sum() > 10
    assert ref.n_shards >= 8  # many small partitions to fail in
    return ref


def _cli(cfg: PipelineConfig, folder: Path, out: Path) -> list[str]:
    config = folder / "config.toml"
    dump_config(cfg, config)
    return [str(BIN / "laion-dask"), "run", str(config), "--out", str(out)]


# --- the tests ----------------------------------------------------------------------------------


def test_a_run_on_a_remote_scheduler_equals_the_local_cluster_run(
    cluster, cfg, reference, tmp_path
):
    """`laion-dask run CONFIG --scheduler tcp://...`: the same bytes as the LocalCluster run."""
    from distributed import get_task_stream

    out = tmp_path / "run"
    cmd = _cli(cfg, tmp_path, out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with get_task_stream(client=cluster.client) as stream:
        done = subprocess.run(
            [*cmd, "--scheduler", cluster.address, "-q"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    assert done.returncode == 0, done.stderr
    for stage in ("== extract", "== download", "== score", "== materialize"):
        assert stage in done.stdout
    assert_same_outputs(outputs(RunDir(str(out))), reference.outputs)
    # every stage's tasks ran on the two worker processes
    ran = {(str(t["key"]).split("-")[0], t["worker"]) for t in stream.data}
    workers = set(cluster.workers())
    assert {"extract", "candidates", "download", "score", "materialize"} <= {s for s, _ in ran}
    assert {w for _, w in ran} == workers


@contextlib.contextmanager
def _in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(fn, *args, **kwargs)
        try:
            yield fut
        finally:
            GATE.release()


def test_a_worker_killed_mid_download_changes_nothing(cluster, cfg, reference, tmp_path):
    before = cluster.wait_for(2)
    run = reference.seed(tmp_path / "run", "extract", "candidates")
    GATE.hold(after=12)  # a few partitions finish, then every download task waits mid-request
    with _in_thread(run_pipeline, run, cfg, client=cluster.client) as fut:
        wait_until(lambda: GATE.blocked >= 1, "a download task waiting on the host")
        busy = wait_until(
            lambda: [
                a
                for a, keys in cluster.client.processing().items()
                if any(str(k).startswith("download-") for k in keys)
            ],
            "a worker running a download task",
        )
        killed = cluster.kill_worker(busy[0])
        assert killed in before.values()
        finished_at_kill = len(run.markers("downloads"))
        GATE.release()
        reports = fut.result(timeout=300)
    assert finished_at_kill < reference.n_shards
    assert_counts_add_up(reports)
    assert_same_outputs(outputs(run), reference.outputs)
    cluster.wait_for(2, without=killed)  # the nanny restarted it


def test_a_worker_killed_mid_scoring_changes_nothing(cluster, cfg, reference, tmp_path):
    before = cluster.wait_for(2)
    run = reference.seed(tmp_path / "run", "extract", "candidates", "downloads", "images")
    n_parts = len(run.markers("downloads"))
    with _in_thread(
        run_pipeline, run, cfg, client=cluster.client, stages=("score", "materialize")
    ) as fut:
        busy = wait_until(
            lambda: [
                a
                for a, keys in cluster.client.processing().items()
                if any(str(k).startswith("score-") for k in keys)
            ],
            "a worker running a scoring task",
            timeout=PATIENCE,
        )
        killed = cluster.kill_worker(busy[0])
        assert killed in before.values()
        finished_at_kill = len(run.markers("scores"))
        reports = fut.result(timeout=300)
    assert finished_at_kill < n_parts  # killed while scoring was still going on
    score = reports[0]
    score.check()
    assert score.stage == "score" and not score.failed and score.partitions == n_parts
    reports[1].check()
    assert_same_outputs(outputs(run), reference.outputs)
    cluster.wait_for(2, without=killed)


def test_a_killed_run_resumes_only_its_missing_partitions(cluster, cfg, reference, tmp_path):
    cluster.wait_for(2)
    out = tmp_path / "run"
    run = reference.seed(out, "extract", "candidates")
    cmd = [*_cli(cfg, tmp_path, out), "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    GATE.hold(after=12)
    with (tmp_path / "first.log").open("wb") as log:
        first = subprocess.Popen(
            [*cmd, "--scheduler", cluster.address], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_until(
            lambda: GATE.blocked >= 1 and run.markers("downloads"),
            "finished download partitions and a waiting one",
        )
    finally:
        first.kill()
        first.wait()
    # the whole run is gone: its client and the tasks it left on the workers
    cluster.client.restart()
    GATE.release()
    snapshot = {s: run.markers(s) for s in ("extract", "candidates", "downloads", "scores")}
    n_total = reference.n_shards
    assert 1 <= len(snapshot["downloads"]) < n_total and not snapshot["scores"]

    # DASK_SCHEDULER_ADDRESS does what --scheduler does
    env["DASK_SCHEDULER_ADDRESS"] = cluster.address
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    # what had finished was kept byte for byte (markers hold each task's own timing)...
    for stage, markers in snapshot.items():
        now = run.markers(stage)
        assert {i: now[i] for i in markers} == markers, stage
    # ... and reported as resumed; only the rest was computed
    n_down = len(snapshot["downloads"])
    assert f"({n_down} of {n_total} partitions resumed from checkpoints)" in again.stdout
    assert "(4 of 4 partitions resumed from checkpoints)" in again.stdout  # extract
    assert len(run.markers("downloads")) == n_total
    assert_same_outputs(outputs(run), reference.outputs)


def test_a_changed_config_is_refused_unless_forced(cluster, cfg, reference, tmp_path, capsys):
    from laion_dask.faces.cli import main
    from laion_dask.ground.config import ConfigError

    run = reference.seed(tmp_path / "run", "extract", "candidates", "downloads", "images")
    stages = ("extract", "download")
    # speed knobs change no output: tuning them for a cluster resumes the run
    faster = cfg.replace("download", concurrency=8, per_host_concurrency=2, decode_threads=1)
    resumed = run_pipeline(run, faster, client=cluster.client, stages=stages)
    assert [r.resumed for r in resumed] == [4, reference.n_shards]
    assert run.markers("downloads") == reference.run.markers("downloads")

    changed = cfg.replace("rules", min_text_chars=12)
    with pytest.raises(ConfigChanged, match=r"^rules\.min_text_chars: 5 -> 12: extract ") as err:
        run_pipeline(run, changed, client=cluster.client, stages=stages)
    assert isinstance(err.value, ConfigError)  # the CLI prints it and exits 2
    bigger = cfg.replace("download", image_size=384)
    with pytest.raises(ConfigChanged, match=r"^download\.image_size: 256 -> 384: download "):
        run_pipeline(run, bigger, client=cluster.client, stages=stages)
    assert run.markers("downloads") == reference.run.markers("downloads")  # nothing ran

    forced = run_extract(run, changed, client=cluster.client, force=True)
    assert forced.resumed == 0
    before = reference.outputs["candidates"][schema.DROP_REASON].eq("text_too_short").sum()
    assert forced.counts["text_too_short"] > before
    # the forced config is now the recorded one: the same config resumes
    assert run_extract(run, changed, client=cluster.client).resumed == 4

    # the command line refuses the same way, before any work, naming the key (exit 2)
    config = tmp_path / "bigger.toml"
    dump_config(changed.replace("download", image_size=384), config)
    argv = ["run", str(config), "--out", run.path, "--scheduler", cluster.address, "-q"]
    assert main(argv) == 2
    assert "download.image_size: 256 -> 384" in capsys.readouterr().err
    assert run.markers("downloads") == reference.run.markers("downloads")


def test_each_hosts_rows_are_downloaded_by_one_task(reference):
    """Every host's fetched rows, from every input file, are in the chunks of one plan bucket."""
    run = reference.run
    downloads = reference.outputs["downloads"]
    markers = run.markers("downloads")
    chain_of = {f"{i:05d}.tar": m["chain"] for i, m in markers.items()}
    fetched = downloads[downloads[schema.STATUS].notna()]
    where = pd.DataFrame(
        {
            "host": fetched[schema.URL].str.extract(r"//([^/:]+)", expand=False),
            "chain": fetched[schema.SHARD].map(chain_of),
            "file": fetched[schema.SOURCE_FILE],
        }
    )
    assert where["host"].nunique() >= 2
    # hosts have rows in several input files, and more than one task's worth of rows...
    assert where.groupby("host")["file"].nunique().max() >= 2
    assert where.groupby("host").size().max() > 5
    # ... yet each host is in exactly one chain of buckets, i.e. one task's sequential stream
    assert where.groupby("host")["chain"].nunique().eq(1).all()
    # a chain's chunks are shards with consecutive ids, bucket by bucket, chunk 0, 1, ...
    by_chain: dict[int, list[tuple[int, int, int]]] = {}
    for i, m in sorted(markers.items()):
        by_chain.setdefault(m["chain"], []).append((i, m["bucket"], m["chunk"]))
    for chain, shards in by_chain.items():
        ids = [i for i, _, _ in shards]
        assert ids == list(range(ids[0], ids[0] + len(ids))), chain
        assert shards[0][1] == chain
        for bucket in {b for _, b, _ in shards}:
            chunks = [c for _, b, c in shards if b == bucket]
            assert chunks == list(range(len(chunks))), (chain, bucket)
    assert max(m["rows"] for m in markers.values()) <= 5
    assert max(len(s) for s in by_chain.values()) >= 2  # a host bigger than a task


# --- memory -------------------------------------------------------------------------------------


#: extraction's documented bound (README, "Memory"), over a worker's idle RSS: a task holds one
#: chunk of ``extract.CHUNK_ROWS`` pairs (streamed to the part row group by row group), the
#: language model and the reader's buffers, whatever the size of the file
EXTRACT_BOUND_MB = 400


def _big_wat(path: Path, target_mb: int) -> Path:
    """~target_mb of WAT: a generated 8 MB file (benchmarks/bench_extract.py) repeated.

    Each copy is whole gzip members, so the result is a valid WAT of the full size; repeated
    records are fine for extraction (duplicates are the candidates stage's business).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_extract import generate
    finally:
        sys.path.pop(0)
    unit = path.with_name("unit.wat.gz")
    generate(unit, 8_000_000, seed=7)
    data = unit.read_bytes()
    with path.open("wb") as fh:
        for _ in range(max(1, target_mb * 1_000_000 // len(data))):
            fh.write(data)
    return path


@pytest.mark.parametrize("target_mb", [40, 160])
def test_extraction_of_a_big_wat_stays_inside_the_memory_bound(cluster, tmp_path, target_mb):
    wat = _big_wat(tmp_path / "big.warc.wat.gz", target_mb)
    size_mb = wat.stat().st_size / 1e6
    assert size_mb > 0.75 * target_mb
    pids = cluster.wait_for(2)
    idle = {pid: psutil.Process(pid).memory_info().rss for pid in pids.values()}
    peak = dict(idle)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in peak:
                with contextlib.suppress(psutil.NoSuchProcess):
                    peak[pid] = max(peak[pid], psutil.Process(pid).memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run = RunDir(str(tmp_path / "run"))
        # the extraction task and its candidates pass (run-wide dedup is a disk-backed P2P
        # shuffle, bounded by distributed's own buffers, measured elsewhere)
        cfg = PipelineConfig().replace("rules", deduplicate=False)
        report = run_extract(run, cfg, [str(wat)], client=cluster.client)
    finally:
        stop.set()
        sampler.join()
    wat.unlink()
    report.check()
    assert not report.failed and report.rows_in > 2_500 * size_mb
    grew_mb = max(peak[p] - idle[p] for p in peak) / 1e6
    print(f"WAT {size_mb:.0f} MB, {report.rows_in} pairs: worker RSS grew {grew_mb:.0f} MB")
    assert grew_mb < EXTRACT_BOUND_MB
