"""Report time vs one Dask read of the columns it needs, on synthetic scored parts.

    .venv/bin/python benchmarks/bench_report.py                    # 10M rows: 50 parts x 200k
    .venv/bin/python benchmarks/bench_report.py --parts 10 --rows 100000
    .venv/bin/python benchmarks/bench_report.py --profile          # cProfile of one part

Prints, on one ``LocalCluster`` from ``laion_dask.orchestration.cluster.make_client`` (``--workers``
processes, one thread each; ``--malloc-mmap-threshold`` sets ``ClusterConfig.
malloc_mmap_threshold`` for both phases alike):

- the read baseline, twice (cold, warm): ``dd.read_parquet(files, columns=COLUMNS)
  .map_partitions(len)`` -- every needed column materialised as pandas (``len`` cannot be
  answered from metadata through ``map_partitions``), nothing else;
- the report's statistics pass (``build_stats``: one task per partition + tree merge, no rows to
  the client), twice, and the ratio of the better of each (target, issue 7: within 1.5x);
- the CPU seconds the worker processes used in each phase (``psutil``: robust to other load on a
  shared machine, where wall times wander), and, inside the workers, the thread CPU of the
  report's read and of ``partition_summary`` per part next to the same in this process (the
  workers' Nanny sets ``MALLOC_TRIM_THRESHOLD_``, which makes large temporaries cost page faults
  there: ``--profile`` runs in this process, so set it yourself to see the workers' cost). The
  report's read (``report._read_part``) decodes with Arrow threads, whose CPU the per-part
  thread time leaves out; the workers' CPU seconds count it.

The run is cached under benchmarks/_work/report-run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers.runs.scored_frame (synthetic scored rows)


def make_run(path: Path, parts: int, rows: int):
    from laion_dask.ground.config import PipelineConfig
    from laion_dask.orchestration.rundir import RunDir
    from tests.helpers.runs import scored_frame

    run = RunDir(str(path))
    done = run.markers("scores") if run.exists(run.config_path) else {}
    run.makedirs("scores")
    run.write_config(PipelineConfig())
    for p, marker in done.items():  # parts of a cache of another size
        if p >= parts or marker.get("rows") != rows:
            run.fs.rm(run.marker_path("scores", p))
            if run.exists(run.part_path("scores", p)):
                run.fs.rm(run.part_path("scores", p))
    for p in range(parts):
        if p in done and done[p].get("rows") == rows:
            continue
        run.write_parquet_atomic(run.part_path("scores", p), scored_frame(rows, p))
        run.mark_done("scores", p, {"rows": rows, "score_status": {}, "seconds": 0.0})
    return run


def profile_one_part(rows: int) -> None:
    """cProfile of ``partition_summary`` on one synthetic part (second call: warm imports)."""
    import cProfile
    import pstats

    from laion_dask.ground.config import FilterConfig
    from laion_dask.products.report import partition_summary
    from tests.helpers.runs import scored_frame

    df, cfg = scored_frame(rows, 0), FilterConfig()
    partition_summary(df, cfg)
    t0 = time.perf_counter()
    partition_summary(df, cfg)
    print(f"partition_summary of {rows:,} rows: {time.perf_counter() - t0:.3f} s")
    prof = cProfile.Profile()
    prof.runcall(partition_summary, df, cfg)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def timed_part(path: str, part: int) -> tuple[float, float, str]:
    """Thread CPU seconds of the report's read and of ``partition_summary`` of one part, and
    the ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` this process runs with."""
    from laion_dask.ground.config import FilterConfig
    from laion_dask.orchestration.rundir import RunDir
    from laion_dask.products import report
    from laion_dask.products.report import partition_summary

    run = RunDir(path)
    t0 = time.thread_time()
    path = run.part_path("scores", part)
    if hasattr(report, "_read_part"):
        df = report._read_part(run, path)
    else:  # an older laion_dask (benchmarking a version against another)
        df = run.read_parquet(path, columns=report.COLUMNS)
    t1 = time.thread_time()
    partition_summary(df, FilterConfig())
    malloc = ", ".join(
        f"{k}={os.environ.get(k)}" for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
    )
    return t1 - t0, time.thread_time() - t1, malloc


def _cpu_seconds() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=50)
    ap.add_argument("--rows", type=int, default=200_000, help="rows per part")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="ClusterConfig.malloc_mmap_threshold for the cluster both phases run on (bytes; "
        "default: unset, Dask's own worker environment)",
    )
    ap.add_argument(
        "--run-dir",
        default=str(REPO / "benchmarks/_work/report-run"),
        help="where the synthetic run is cached (parts of another size are replaced)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="profile partition_summary on one part in this process (top 25 by cumulative time)",
    )
    args = ap.parse_args()
    if args.profile:
        profile_one_part(args.rows)
        return

    import dask
    import dask.dataframe as dd

    from laion_dask.ground.config import ClusterConfig
    from laion_dask.orchestration.cluster import cluster_client
    from laion_dask.products.report import COLUMNS, build_stats

    t0 = time.perf_counter()
    run = make_run(Path(args.run_dir), args.parts, args.rows)
    print(f"run with {args.parts * args.rows:,} rows ready in {time.perf_counter() - t0:.1f} s")
    env = dask.config.get("distributed.nanny.pre-spawn-environ")
    cluster_cfg = ClusterConfig(
        n_workers=args.workers,
        threads_per_worker=1,
        gpu="never",
        dashboard_address=None,
        malloc_mmap_threshold=args.malloc_mmap_threshold,
    )
    print(f"Dask's pre-spawn environment: {env}; {cluster_cfg}")
    with cluster_client(cluster_cfg) as client:  # one cluster for the baseline and the report
        files = run.parts("scores")

        def phase(fn) -> tuple[float, float]:
            c0 = sum(client.run(_cpu_seconds).values())
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            return wall, sum(client.run(_cpu_seconds).values()) - c0

        def read() -> None:
            dd.read_parquet(files, columns=COLUMNS).map_partitions(len).compute()

        stats: dict = {}

        def report() -> None:
            stats.update(build_stats(run, client=client))

        reads = [phase(read) for _ in range(2)]
        reps = [phase(report) for _ in range(2)]
        inside = client.gather(
            [client.submit(timed_part, run.path, p, pure=False) for p in range(min(len(files), 10))]
        )
    here = [timed_part(run.path, p) for p in range(min(len(files), 5))]
    read_wall, read_cpu = min(w for w, _ in reads), min(c for _, c in reads)
    rep_wall, rep_cpu = min(w for w, _ in reps), min(c for _, c in reps)
    print(
        f"dask read of {len(COLUMNS)} columns: {reads[0][0]:.2f} s cold, {reads[1][0]:.2f} s warm"
        f" (worker CPU {reads[0][1]:.2f} s, {reads[1][1]:.2f} s)"
    )
    print(
        f"report statistics (build_stats): {reps[0][0]:.2f} s, {reps[1][0]:.2f} s for "
        f"{stats['rows']:,} rows (worker CPU {reps[0][1]:.2f} s, {reps[1][1]:.2f} s)"
    )
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(
        f"per part, thread CPU: in the workers ({inside[0][2]}) read "
        f"{mean([r for r, _, _ in inside]) * 1e3:.0f} ms + partition_summary "
        f"{mean([s for _, s, _ in inside]) * 1e3:.0f} ms; in this process "
        f"({here[0][2]}) read {mean([r for r, _, _ in here]) * 1e3:.0f} ms"
        f" + partition_summary {mean([s for _, s, _ in here]) * 1e3:.0f} ms"
    )
    ratio = rep_wall / read_wall
    print(
        f"ratio report / read: {ratio:.2f}x wall (best of 2 each), {rep_cpu / read_cpu:.2f}x "
        f"worker CPU   target 1.5x: {'met' if ratio <= 1.5 else 'MISSED'}   "
        f"(workers={args.workers}, cpus={os.cpu_count()}, load average "
        f"{os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
