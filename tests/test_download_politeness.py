"""Politeness at scale: per-host limits hold for the whole cluster, not per input file.

Five loopback hosts (127.0.0.1..5, one ``ThreadingHTTPServer`` each, shared books) serve images
slowly and record, per ``Host``, how many image requests they were answering at once and when
each one started and ended. Every host has rows in every input file, and the last one is big
(more rows than 8 download tasks take: its own chain of buckets). A run on a real
``distributed`` cluster of two worker processes with ``per_host_concurrency = 1`` must never
have two requests in flight to one host, while the cluster as a whole does run downloads in
parallel (two hosts at once). Before the download plan (per-file host chunks), the same run put
one host in several tasks at once and this test failed (max 2 in flight to one host).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import PipelineConfig
from laion_dask.orchestration.pipeline import run_download, run_extract
from laion_dask.orchestration.rundir import RunDir
from tests.helpers.cluster import LOOPBACK_CLUSTER
from tests.helpers.extract import make_wat, wat_payload
from tests.helpers.imagehost import noise_image
from tests.test_pipeline_download import _downloads

N_FILES = 4
#: images of each host in each input file; the last host is big: 40 rows, more than
#: 8 x rows_per_task (4), so the plan gives it buckets of its own, chained in one task
PER_FILE = (3, 3, 3, 3, 10)
N_HOSTS = len(PER_FILE)
#: how long a host takes to answer an image: long enough that tasks holding the same host
#: overlap on a 2-worker cluster (a wait inside the server, never a measured bound)
HOLD_S = 0.1


@dataclass
class Books:
    """What the hosts saw, per host (the ``Host`` header without its port)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    active: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_active: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    spans: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    all_active: int = 0
    max_all_active: int = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        return None

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        books: Books = self.server.books  # type: ignore[attr-defined]
        images: dict[str, bytes] = self.server.images  # type: ignore[attr-defined]
        body = images.get(self.path)
        if body is None:  # robots.txt, tdmrep.json: none, as on most hosts
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        host = self.headers.get("Host", "").rsplit(":", 1)[0]
        with books.lock:
            books.active[host] += 1
            books.all_active += 1
            books.max_active[host] = max(books.max_active[host], books.active[host])
            books.max_all_active = max(books.max_all_active, books.all_active)
        start = time.monotonic()
        time.sleep(HOLD_S)
        # leave the books before the answer goes out: the client's next request to this host
        # can only start once it has the answer, so a count of 2 is a real overlap
        with books.lock:
            books.active[host] -= 1
            books.all_active -= 1
            books.spans[host].append((start, time.monotonic()))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclass
class Hosts:
    urls: list[str]  # base URL per host
    books: Books
    images: dict[str, bytes]


@contextmanager
def serve_hosts(n: int) -> Iterator[Hosts]:
    books, images = Books(), {}
    with ExitStack() as stack:
        urls = []
        for i in range(n):
            server = ThreadingHTTPServer((f"127.0.0.{i + 1}", 0), _Handler)
            server.daemon_threads = True
            server.books, server.images = books, images  # type: ignore[attr-defined]
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            stack.callback(thread.join)
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            urls.append(f"http://127.0.0.{i + 1}:{server.server_address[1]}")
        yield Hosts(urls, books, images)


def _inputs(hosts: Hosts, folder: Path, per_file: tuple[int, ...] = PER_FILE) -> list[str]:
    """Input files in which every host has ``per_file`` images (plus rows the rules drop)."""
    paths = []
    for f in range(N_FILES):
        links = []
        for h, base in enumerate(hosts.urls):
            for i in range(per_file[h]):
                path = f"/img/f{f}-h{h}-{i}.jpg"
                hosts.images[path] = noise_image(200, 150, "JPEG", seed=1000 * f + 10 * h + i)
                links.append({"path": "IMG@/src", "url": base + path, "alt": f"photo {f} {h} {i}"})
        links.append({"path": "IMG@/src", "url": "data:image/png;base64,AAAA", "alt": "inline"})
        out = folder / f"crawl-{f}.warc.wat.gz"
        out.write_bytes(make_wat([wat_payload(f"http://pages.test/{f}.html", links)]))
        paths.append(str(out))
    return paths


def _cfg(**download: object) -> PipelineConfig:
    base = {
        "allow_private_networks": True,
        "retries": 0,
        "rows_per_task": 4,
        "per_host_concurrency": 1,
        "concurrency": 8,
        "connect_timeout": 10.0,
        "read_timeout": 10.0,
        "deadline": 60.0,
    }
    return PipelineConfig().replace("download", **(base | download))


@pytest.fixture(scope="module")
def process_client():
    """Two ``dask worker`` processes (one thread each) on loopback: a real cluster."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, **(LOOPBACK_CLUSTER | {"processes": True})
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _assert_same_downloads(one: RunDir, two: RunDir) -> None:
    """Same downloads table and the same markers (timings aside) in two runs."""
    pd.testing.assert_frame_equal(_downloads(one), _downloads(two))
    assert one.markers("downloads").keys() == two.markers("downloads").keys()
    strip = ("seconds", "stats")
    for (i, ma), (_, mb) in zip(
        one.iter_markers("downloads"), two.iter_markers("downloads"), strict=True
    ):
        assert {k: v for k, v in ma.items() if k not in strip} == {
            k: v for k, v in mb.items() if k not in strip
        }, i


def test_per_host_concurrency_holds_across_the_cluster(process_client, tmp_path):
    with serve_hosts(N_HOSTS) as hosts:
        run = RunDir(str(tmp_path / "run"))
        cfg = _cfg()
        run_extract(run, cfg, _inputs(hosts, tmp_path), client=process_client)
        report = run_download(run, cfg, client=process_client)
        books = hosts.books
    report.check()
    assert not report.failed
    # the bound: never two requests at once to one host, from the whole cluster
    addresses = [u.split("//")[1].split(":")[0] for u in hosts.urls]
    assert set(books.max_active) == set(addresses)
    assert max(books.max_active.values()) == 1, dict(books.max_active)
    for h, host in enumerate(addresses):
        spans = sorted(books.spans[host])
        assert len(spans) == N_FILES * PER_FILE[h], host
        assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:], strict=False)), host
    # while the cluster did download in parallel (two hosts at a time): the bound is the
    # plan's doing, not a cluster that ran one task at a time
    assert books.max_all_active >= 2

    dl = _downloads(run)
    assert report.counts["success"] == N_FILES * sum(PER_FILE)
    assert report.counts["not_attempted"] == N_FILES  # the data: URIs, in downloads all the same
    markers = {f"{i:05d}.tar": m for i, m in run.markers("downloads").items()}
    fetched = dl[dl[schema.STATUS].notna()]
    where = pd.DataFrame(
        {
            "host": fetched[schema.URL].str.extract(r"//([^/:]+)", expand=False),
            "file": fetched[schema.SOURCE_FILE],
            "shard": fetched[schema.SHARD],
            "bucket": fetched[schema.SHARD].map(lambda s: markers[s]["bucket"]),
            "chain": fetched[schema.SHARD].map(lambda s: markers[s]["chain"]),
        }
    ).groupby("host")
    # each host's rows came from every input file, more than one task's worth of them...
    assert where["file"].nunique().eq(N_FILES).all()
    assert where["shard"].nunique().min() >= 2
    # ... and went to one chain: one bucket, or for the big host buckets of its own
    assert where["chain"].nunique().eq(1).all()
    assert where["bucket"].nunique()[addresses[-1]] >= 2
    assert where["bucket"].nunique()[addresses[:-1]].eq(1).all()
    big_buckets = set(fetched.loc[fetched[schema.URL].str.contains(addresses[-1]), schema.SHARD])
    assert not set(dl.loc[~dl[schema.URL].str.contains(addresses[-1]), schema.SHARD]) & big_buckets


def test_the_plan_does_not_depend_on_the_cluster(process_client, tmp_path):
    """Same candidates -> same buckets, shard ids and shard contents on 1 or 2 workers."""
    from distributed import Client, LocalCluster

    with serve_hosts(N_HOSTS) as hosts:
        paths = _inputs(hosts, tmp_path)
        cfg = _cfg(rows_per_task=5)
        runs = {}
        with (
            LocalCluster(n_workers=1, threads_per_worker=1, **LOOPBACK_CLUSTER) as one,
            Client(one) as one_client,
        ):
            for name, c in (("one", one_client), ("two", process_client)):
                run = RunDir(str(tmp_path / name))
                run_extract(run, cfg, paths, client=c)
                run_download(run, cfg, client=c).check()
                runs[name] = run
    _assert_same_downloads(runs["one"], runs["two"])


def test_per_host_interval_spaces_requests_across_the_cluster(process_client, tmp_path):
    """``per_host_interval``: two requests to one host start at least that far apart, from the
    whole cluster and across the chunks (calls) of a host's chain."""
    interval = 0.15
    with serve_hosts(N_HOSTS) as hosts:
        run = RunDir(str(tmp_path / "run"))
        cfg = _cfg(per_host_concurrency=2, per_host_interval=interval)
        run_extract(run, cfg, _inputs(hosts, tmp_path), client=process_client)
        report = run_download(run, cfg, client=process_client)
        books = hosts.books
    report.check()
    assert report.counts["success"] == N_FILES * sum(PER_FILE)
    for h, url in enumerate(hosts.urls):
        host = url.split("//")[1].split(":")[0]
        starts = sorted(start for start, _ in books.spans[host])
        assert len(starts) == N_FILES * PER_FILE[h]
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        # the client books starts `interval` apart; the server sees them within loopback jitter
        assert min(gaps) > interval - 0.05, (host, min(gaps))


def test_host_pacer_books_starts_apart():
    from laion_dask.stages.download import _HostPacer

    pacer = _HostPacer()
    waits = [pacer.reserve("a", 10.0) for _ in range(3)]
    assert waits[0] == 0.0
    assert 9.9 < waits[1] <= 10.0 and 19.9 < waits[2] <= 20.0
    assert pacer.reserve("b", 10.0) == 0.0  # hosts are independent
    assert pacer.reserve("a", 0.0) == pytest.approx(20.0, abs=0.1)  # booked starts stand


def test_a_chain_split_across_workers_keeps_the_host_bound_and_the_shards(process_client, tmp_path):
    """A host holding most of the run is downloaded by both workers at once (its chain split in
    two tasks, ``per_host_concurrency`` shared between them), never more than
    ``per_host_concurrency`` in flight to it, and the shards equal a one-worker run's. Before
    the split, one task downloaded the whole host while the other worker idled."""
    from distributed import Client, LocalCluster, get_task_stream

    with serve_hosts(N_HOSTS) as hosts:
        # 40 of the run's 60 rows on the last host: more than its share of a 2-worker cluster
        paths = _inputs(hosts, tmp_path, per_file=(1, 1, 1, 1, 10))
        cfg = _cfg(per_host_concurrency=2)
        runs = {}
        with (
            LocalCluster(n_workers=1, threads_per_worker=1, **LOOPBACK_CLUSTER) as one,
            Client(one) as one_client,
        ):
            run = RunDir(str(tmp_path / "one"))
            run_extract(run, cfg, paths, client=one_client)
            run_download(run, cfg, client=one_client).check()
            runs["one"] = run
        books = hosts.books
        books.max_active.clear()
        run = RunDir(str(tmp_path / "two"))
        run_extract(run, cfg, paths, client=process_client)
        with get_task_stream(client=process_client) as stream:
            run_download(run, cfg, client=process_client).check()
        runs["two"] = run
    assert max(books.max_active.values()) == 2, dict(books.max_active)
    big = hosts.urls[-1].split("//")[1].split(":")[0]
    assert books.max_active[big] == 2  # two tasks of one request each, at once
    parts = [t for t in stream.data if "-part" in t["key"]]
    assert len(parts) == 2 and parts[0]["worker"] != parts[1]["worker"], parts
    spans = [next(s for s in t["startstops"] if s["action"] == "compute") for t in parts]
    assert max(s["start"] for s in spans) < min(s["stop"] for s in spans), spans  # at once
    _assert_same_downloads(runs["one"], runs["two"])
