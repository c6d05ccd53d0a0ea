"""Report statistics vs one Dask read of the columns it needs, on synthetic scored parts.

    .venv/bin/python benchmarks/bench_report.py                    # 10M rows: 50 parts x 200k
    .venv/bin/python benchmarks/bench_report.py --parts 10 --rows 100000
    .venv/bin/python benchmarks/bench_report.py --profile          # cProfile of one part

On one ``LocalCluster`` (``--workers`` processes, one thread each), measured alternately so that
other load on a shared machine hits both alike:

- the read baseline: ``dd.read_parquet(files, columns=COLUMNS).map_partitions(len)`` -- every
  needed column materialised as pandas, nothing else;
- the report's statistics pass (``build_stats``: one task per partition + a tree merge, no rows
  to the client);

each ``--repeats`` times, and the ratio of the best of each. Bound (issue 16): within 3x. The
CPU seconds the worker processes used in each phase are printed too (``psutil``: robust to
load on a shared machine). ``--malloc-mmap-threshold`` sets ``ClusterConfig.
malloc_mmap_threshold`` for both phases alike (Dask's Nanny pins glibc's mmap threshold at
128 KiB, so in a worker every large temporary array is fresh pages). Writes
``benchmarks/results/report.json``. The synthetic run is cached under
benchmarks/_work/report-run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _results import save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers.runs.scored_frame (synthetic scored rows)

BOUND = 3.0


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
    """cProfile of ``partition_summary`` on one synthetic part read as the report reads it."""
    import cProfile
    import pstats
    import tempfile

    from laion_dask.ground.config import FilterConfig
    from laion_dask.products.report import partition_summary, read_part

    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp) / "run", 1, rows)
        df = read_part(run, run.part_path("scores", 0))
    cfg = FilterConfig()
    partition_summary(df, cfg)  # warm imports
    t0 = time.perf_counter()
    partition_summary(df, cfg)
    print(f"partition_summary of {rows:,} rows: {time.perf_counter() - t0:.3f} s")
    prof = cProfile.Profile()
    prof.runcall(partition_summary, df, cfg)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def _cpu_seconds() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=50)
    ap.add_argument("--rows", type=int, default=200_000, help="rows per part")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="ClusterConfig.malloc_mmap_threshold of the cluster both phases run on (bytes; "
        "default: unset, Dask's own worker environment)",
    )
    ap.add_argument(
        "--run-dir",
        default=str(REPO / "benchmarks/_work/report-run"),
        help="where the synthetic run is cached (parts of another size are replaced)",
    )
    ap.add_argument("--profile", action="store_true", help="profile one part in this process")
    args = ap.parse_args()
    if args.profile:
        profile_one_part(args.rows)
        return

    import dask.dataframe as dd

    from laion_dask.ground.config import ClusterConfig
    from laion_dask.orchestration.cluster import cluster_client
    from laion_dask.products.report import COLUMNS, build_stats

    t0 = time.perf_counter()
    run = make_run(Path(args.run_dir), args.parts, args.rows)
    rows = args.parts * args.rows
    print(f"run with {rows:,} rows ready in {time.perf_counter() - t0:.1f} s")
    cluster_cfg = ClusterConfig(
        n_workers=args.workers,
        threads_per_worker=1,
        gpu="never",
        dashboard_address=None,
        malloc_mmap_threshold=args.malloc_mmap_threshold,
    )
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

        reads, reps = [], []
        for _ in range(args.repeats):  # alternated: load from others hits both alike
            reads.append(phase(read))
            reps.append(phase(report))
    read_wall, read_cpu = min(w for w, _ in reads), min(c for _, c in reads)
    rep_wall, rep_cpu = min(w for w, _ in reps), min(c for _, c in reps)
    ratio = rep_wall / read_wall
    load = os.getloadavg()[0]
    print(f"dask read of {len(COLUMNS)} columns: " + ", ".join(f"{w:.2f} s" for w, _ in reads))
    print("report statistics (build_stats): " + ", ".join(f"{w:.2f} s" for w, _ in reps))
    print(
        f"ratio report / read: {ratio:.2f}x wall (best of {args.repeats} each), "
        f"{rep_cpu / read_cpu:.2f}x worker CPU   bound {BOUND:g}x: "
        f"{'met' if ratio <= BOUND else 'MISSED'}   (workers={args.workers}, "
        f"cpus={os.cpu_count()}, load average {load:.1f})"
    )
    assert stats["rows"] == rows
    save(
        "report",
        summary=(
            f"The report's statistics pass (build_stats) on {rows:,} synthetic scored rows "
            f"against one Dask read of the same {len(COLUMNS)} columns, {args.workers} worker "
            f"processes; bound: within {BOUND:g}x."
        ),
        figures={
            "rows": rows,
            "read seconds": round(read_wall, 2),
            "statistics seconds": round(rep_wall, 2),
            "ratio (wall)": round(ratio, 2),
            "ratio (worker CPU)": round(rep_cpu / read_cpu, 2),
            "bound": BOUND,
            "cluster.malloc_mmap_threshold": args.malloc_mmap_threshold,
            "met": ratio <= BOUND,
        },
    )


if __name__ == "__main__":
    main()
