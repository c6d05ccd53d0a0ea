"""Strong scaling of the demo pipeline: the same crawl on 1 and on 2 single-thread workers.

The demo corpus (``--pages`` pages, ``--files`` WAT files, images served on 127.0.0.1..3) runs
through extract -> download -> score -> materialize on a ``LocalCluster`` of worker processes,
first with one worker, then with two (one thread each), each into a fresh run directory. Workers
load the CLIP model before the clock starts (a once-per-worker cost, not a per-stage one).

Per stage: seconds on 1 and on 2 workers, speed-up ``T1 / T2`` and parallel efficiency
``T1 / (2 * T2)`` (1.0 = perfect). The outputs of both runs are checked equal (sorted by key).

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_scaling.py            # 80 pages, 8 files
    nice -n 10 .venv/bin/python benchmarks/bench_scaling.py --pages 30 # a quick run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
from _results import save

from laion_dask.faces.demo.host import serve_demo_corpus
from laion_dask.faces.demo.run import demo_config
from laion_dask.ground import schema
from laion_dask.ground.config import ClusterConfig, PipelineConfig
from laion_dask.orchestration.cluster import close_client, make_client
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.run import run_pipeline
from laion_dask.products.synthetic.corpus import CorpusSpec
from laion_dask.products.train import demo_model_dir

STAGES = ("extract", "download", "score", "materialize")


def _warm(clip_cfg: object) -> int:
    """Load the CLIP model on a worker (cached per process) so no stage pays for it."""
    from laion_dask.stages.clip import encoder_from_config

    encoder_from_config(clip_cfg)
    return os.getpid()


def _differing_columns(a: RunDir, b: RunDir) -> dict[str, list[str]]:
    """Per stage, the columns whose values differ between two runs (rows sorted by key)."""
    out = {}
    keys = {"candidates": schema.UID, "downloads": schema.KEY, "scores": schema.KEY}
    for stage, key in keys.items():
        x, y = (
            pd.concat([r.read_parquet(p) for p in r.parts(stage)], ignore_index=True)
            .sort_values(key)
            .reset_index(drop=True)
            for r in (a, b)
        )
        if x.shape != y.shape or list(x.columns) != list(y.columns):
            out[stage] = ["<shape or columns>"]
            continue
        cols = [c for c in x.columns if not x[c].equals(y[c])]
        if cols:
            out[stage] = cols
    return out


def run_once(cfg: PipelineConfig, workers: int, out: Path) -> dict[str, float]:
    """Seconds per stage (and ``total``) of one run on ``workers`` single-thread workers."""
    cluster = ClusterConfig(
        n_workers=workers, threads_per_worker=1, gpu="never", dashboard_address="127.0.0.1:0"
    )
    client = make_client(cluster)
    try:
        client.wait_for_workers(workers)
        pids = client.run(_warm, cfg.clip)
        assert len(pids) == workers
        t0 = time.perf_counter()
        reports = run_pipeline(RunDir(str(out)), cfg, client=client)
        total = time.perf_counter() - t0
    finally:
        close_client(client)
    for r in reports:
        r.check()
        if getattr(r, "failed", None):
            raise RuntimeError(f"{r.stage}: failed partitions {r.failed}")
    times = {r.stage: r.seconds for r in reports}
    times["total"] = total
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=80, help="demo pages (default 80)")
    ap.add_argument("--files", type=int, default=8, help="WAT files = extract partitions")
    ap.add_argument("--rows-per-task", type=int, default=40, help="download.rows_per_task")
    ap.add_argument("--work", help="folder for corpus and runs (default: a temporary one)")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scaling-"))
    spec = CorpusSpec(n_pages=args.pages, n_files=args.files, seed=4)
    with serve_demo_corpus(work / "corpus", spec) as (info, _host):
        cfg = demo_config([str(p) for p in info.wat_files], str(demo_model_dir()))
        cfg = cfg.replace("download", rows_per_task=args.rows_per_task)
        results = {}
        for n in (1, 2):
            results[n] = run_once(cfg, n, work / f"run-{n}w")
            print(f"  {n} worker(s): {results[n]['total']:.1f} s", flush=True)
    differ = _differing_columns(RunDir(str(work / "run-1w")), RunDir(str(work / "run-2w")))

    n_links = sum(1 for _ in pd.read_parquet(info.ground_truth, columns=["url"]).itertuples())
    print(
        f"\nstrong scaling, demo pipeline: {args.pages} pages, {args.files} WAT files, "
        f"{n_links} image links, rows_per_task {args.rows_per_task}"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'stage':<12} {'1 worker':>9} {'2 workers':>10} {'speed-up':>9} {'efficiency':>11}")
    for stage in (*STAGES, "total"):
        t1, t2 = results[1][stage], results[2][stage]
        print(f"{stage:<12} {t1:>8.2f}s {t2:>9.2f}s {t1 / t2:>8.2f}x {t1 / (2 * t2):>10.0%}")
    print(f"columns that differ between the two runs: {differ or 'none'}")
    save(
        "scaling",
        summary=(
            f"The demo pipeline ({args.pages} pages, {args.files} WAT files, {n_links} image "
            "links) on 1 and on 2 single-thread workers: seconds per stage, speed-up T1/T2."
        ),
        figures={
            stage: {
                "1 worker s": round(results[1][stage], 2),
                "2 workers s": round(results[2][stage], 2),
                "speed-up": round(results[1][stage] / results[2][stage], 2),
            }
            for stage in (*STAGES, "total")
        }
        | {"columns that differ": ", ".join(f"{k}: {v}" for k, v in differ.items()) or "none"},
    )


if __name__ == "__main__":
    main()
