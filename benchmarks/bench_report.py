"""Report statistics time vs one Dask read of the columns it needs, on synthetic scored parts.

    .venv/bin/python benchmarks/bench_report.py                    # 10M rows: 50 parts x 200k
    .venv/bin/python benchmarks/bench_report.py --parts 10 --rows 100000
    .venv/bin/python benchmarks/bench_report.py --profile          # cProfile of one part

Prints the read baseline (twice: cold and warm), the report's statistics pass (``build_stats``,
one task per partition + tree merge, no rows to the client) and the ratio. Target (issue 7):
within 1.5x of the read. The run is cached under benchmarks/_work/report-run.
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
    from laion_dask.config import PipelineConfig
    from laion_dask.rundir import RunDir
    from tests.helpers.runs import scored_frame

    run = RunDir(str(path))
    done = run.markers("scores") if run.exists(run.config_path) else {}
    if len(done) == parts and all(m.get("rows") == rows for m in done.values()):
        return run
    run.makedirs("scores")
    run.write_config(PipelineConfig())
    for p in range(parts):
        run.write_parquet_atomic(run.part_path("scores", p), scored_frame(rows, p))
        run.mark_done("scores", p, {"rows": rows, "score_status": {}, "seconds": 0.0})
    return run


def profile_one_part(rows: int) -> None:
    """cProfile of ``partition_summary`` on one synthetic part (second call: warm imports)."""
    import cProfile
    import pstats

    from laion_dask.config import FilterConfig
    from laion_dask.report import partition_summary
    from tests.helpers.runs import scored_frame

    df, cfg = scored_frame(rows, 0), FilterConfig()
    partition_summary(df, cfg)
    t0 = time.perf_counter()
    partition_summary(df, cfg)
    print(f"partition_summary of {rows:,} rows: {time.perf_counter() - t0:.3f} s")
    prof = cProfile.Profile()
    prof.runcall(partition_summary, df, cfg)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=50)
    ap.add_argument("--rows", type=int, default=200_000, help="rows per part")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="profile partition_summary on one part in this process (top 25 by cumulative time)",
    )
    args = ap.parse_args()
    if args.profile:
        profile_one_part(args.rows)
        return

    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    from laion_dask.report import COLUMNS, build_stats

    t0 = time.perf_counter()
    run = make_run(REPO / "benchmarks/_work/report-run", args.parts, args.rows)
    print(f"run with {args.parts * args.rows:,} rows ready in {time.perf_counter() - t0:.1f} s")
    with (
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        files = run.parts("scores")
        reads = []
        for _ in range(2):
            t0 = time.perf_counter()
            dd.read_parquet(files, columns=COLUMNS).map_partitions(len).compute()
            reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stats = build_stats(run, client=client)
        rep = time.perf_counter() - t0
    best = min(reads)
    print(f"dask read of {len(COLUMNS)} columns: {reads[0]:.2f} s cold, {reads[1]:.2f} s warm")
    print(f"report statistics (build_stats): {rep:.2f} s for {stats['rows']:,} rows")
    print(
        f"ratio report / read: {rep / best:.2f}x   target 1.5x: "
        f"{'met' if rep / best <= 1.5 else 'MISSED'}   (workers={args.workers}, "
        f"cpus={os.cpu_count()})"
    )


if __name__ == "__main__":
    main()
