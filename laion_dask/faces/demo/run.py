"""``laion-dask demo``: the whole pipeline offline, on a generated crawl and a committed small CLIP.

Generate (or reuse) the demo corpus, serve its images from loopback hosts, run extract ->
download -> score -> materialize on a ``LocalCluster``, then print the funnel, the quality of the
similarity threshold against the corpus's ground truth, and where everything is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from laion_dask.ground import schema
from laion_dask.ground.config import ClusterConfig, PipelineConfig
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.synthetic.corpus import CorpusSpec

log = logging.getLogger(__name__)

__all__ = ["DemoResult", "demo_config", "threshold_quality", "run_demo", "main"]


@dataclass
class DemoResult:
    """What the demo produced: the run, its reports and the threshold's measured quality."""

    run: RunDir
    reports: list[Any]
    quality: dict[str, Any]
    seconds: float
    funnel: pd.DataFrame = field(default_factory=pd.DataFrame)
    report_files: dict[str, str] = field(default_factory=dict)


def _write_report(run: RunDir, client: Any) -> dict[str, str]:
    """stats.json + report.html + report.md of the run (laion_dask.products.report)."""
    from laion_dask.products.report import build_stats, write_report

    stats = build_stats(run, client=client)
    return write_report(run, stats, formats=("html", "md"), client=client)


def demo_config(
    wat_files: Sequence[str],
    model_dir: str,
    *,
    workers: int = 2,
    threads: int = 1,
    dashboard: bool = True,
) -> PipelineConfig:
    """The pipeline config of the demo: LAION defaults plus what an offline loopback run needs."""
    cfg = PipelineConfig()
    cfg = cfg.replace("input", paths=tuple(str(p) for p in wat_files))
    # the demo's own image hosts live on 127.0.0.x: the one place private networks are allowed
    cfg = cfg.replace(
        "download",
        allow_private_networks=True,
        rows_per_task=1000,
        connect_timeout=5.0,
        read_timeout=5.0,
        deadline=15.0,
    )
    cfg = cfg.replace("clip", model=str(model_dir), batch_size=64, loader_threads=1)
    cluster = ClusterConfig(
        n_workers=workers,
        threads_per_worker=threads,
        gpu="never",
        dashboard_address="127.0.0.1:8787" if dashboard else "127.0.0.1:0",
    )
    return dataclasses.replace(cfg, cluster=cluster)


def _scores(run: RunDir) -> pd.DataFrame:
    return pd.concat([run.read_parquet(p) for p in run.parts("scores")], ignore_index=True)


#: one similarity cut for every language group, swept to show what tuning it trades
SWEEP = (0.1, 0.2, 0.28, 0.35, 0.45, 0.5)


def threshold_quality(run: RunDir, ground_truth: str | Path) -> dict[str, Any]:
    """Precision/recall of the run's similarity thresholds and ROC AUC, against ground truth.

    Over the pairs that reached scoring (passed the rules, downloaded, decoded): a pair is
    relevant when its caption truly describes its image (``matches``). ``sweep`` gives the
    same at each cut of ``SWEEP``.
    """
    from laion_dask.products.train import roc_auc
    from laion_dask.stages.filters import similarity_threshold

    cfg = run.read_config().filters
    df = _scores(run)
    df = df[df[schema.SCORE_STATUS].eq("success").fillna(False)]
    gt = pd.read_parquet(ground_truth, columns=["url", "text", "matches"])
    gt = gt.dropna(subset=["text"]).drop_duplicates(["url", "text"])
    merged = df.merge(gt, left_on=[schema.URL, schema.TEXT], right_on=["url", "text"], how="inner")
    out: dict[str, Any] = {"scored_pairs": len(df), "with_ground_truth": len(merged)}
    if merged.empty:
        return out
    sim = merged[schema.SIMILARITY].astype("float64").to_numpy()
    truth = merged["matches"].astype(bool).to_numpy()

    def at(cut: Any) -> dict[str, Any]:
        kept = sim >= cut
        tp = int((kept & truth).sum())
        return {
            "precision": tp / max(int(kept.sum()), 1),
            "recall": tp / max(int(truth.sum()), 1),
            "kept": int(kept.sum()),
        }

    out.update(
        at(similarity_threshold(merged[schema.LANGUAGE_GROUP], cfg)),
        true_pairs=int(truth.sum()),
        thresholds={g: cfg.similarity_for(g) for g in schema.LANGUAGE_GROUPS},
        sweep=[{"threshold": t, **at(t)} for t in SWEEP],
    )
    if truth.any() and (~truth).any():
        out["roc_auc"] = roc_auc(sim, truth)
        out["mean_similarity_true"] = float(sim[truth].mean())
        out["mean_similarity_false"] = float(sim[~truth].mean())
    return out


def run_demo(
    out: str | Path = "demo-run",
    *,
    spec: CorpusSpec | None = None,
    model_dir: str | Path | None = None,
    workers: int = 2,
    threads: int = 1,
    client: Any | None = None,
    show_progress: bool = False,
    dashboard: bool = True,
) -> DemoResult:
    """Run the offline demo into ``out`` (the run directory; the corpus goes to ``out/corpus``)."""
    from laion_dask.faces.demo.host import serve_demo_corpus
    from laion_dask.orchestration.cluster import close_client, make_client
    from laion_dask.products.run import run_pipeline
    from laion_dask.products.stats import funnel
    from laion_dask.products.train import demo_model_dir

    t0 = time.perf_counter()
    out = Path(out).resolve()
    run = RunDir(str(out))
    model = Path(model_dir) if model_dir is not None else demo_model_dir()
    with serve_demo_corpus(out / "corpus", spec) as (info, _host):
        cfg = demo_config(
            [str(p) for p in info.wat_files],
            str(model),
            workers=workers,
            threads=threads,
            dashboard=dashboard,
        )
        own = client is None
        if own:
            client = make_client(cfg.cluster, child_processes=cfg.clip.loader_processes > 0)
            if dashboard and show_progress:
                print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        try:
            reports = run_pipeline(run, cfg, client=client, show_progress=show_progress)
            report_files = _write_report(run, client)
        finally:
            if own and client is not None:
                close_client(client)
        quality = threshold_quality(run, info.ground_truth)
    (out / "demo_quality.json").write_text(json.dumps(quality, indent=1, default=float))
    return DemoResult(
        run=run,
        reports=reports,
        quality=quality,
        seconds=time.perf_counter() - t0,
        funnel=funnel(run),
        report_files=report_files,
    )


def _print_summary(result: DemoResult) -> None:
    from laion_dask.products.stats import format_funnel

    q = result.quality
    run = result.run
    print("\n=== laion-dask demo: funnel (rows in = kept + dropped per reason, per stage) ===")
    print(format_funnel(result.funnel))
    if "precision" in q:
        print("\n=== similarity threshold vs the corpus's ground truth ===")
        thr = ", ".join(f"{g} >= {v}" for g, v in q["thresholds"].items())
        print(f"thresholds: {thr}")
        print(
            f"precision {q['precision']:.3f}   recall {q['recall']:.3f}   "
            f"(kept {q['kept']} of {q['with_ground_truth']} scored pairs, "
            f"{q['true_pairs']} truly matching)"
        )
        print("one cut for every language group:")
        for key in ("threshold", "precision", "recall"):
            print(f"  {key:<10}" + "".join(f"{p[key]:>7.2f}" for p in q["sweep"]))
        if "roc_auc" in q:
            print(
                f"ROC AUC {q['roc_auc']:.4f}   mean similarity true {q['mean_similarity_true']:.3f}"
                f" / false {q['mean_similarity_false']:.3f}"
            )
    print("\n=== outputs ===")
    for name in ("corpus", "candidates", "downloads", "images", "scores", "embeddings", "dataset"):
        print(f"  {name:<11} {run.join(name)}")
    print(f"  config      {run.config_path}")
    for path in result.report_files.values():
        print(f"  {'report/' + Path(path).name:<11} {path}")
    # quoted: the lines are meant to be pasted into a shell as they are
    exe, where = shlex.quote(_command()), shlex.quote(run.path)
    applied = shlex.quote(run.join("dataset", "thresholds.toml"))  # what materialize applied
    print("\n=== next ===")
    print(f"  tune the thresholds live:  {exe} dashboard {where}")
    print("  re-cut without rescoring, from a copy of the thresholds just applied:")
    print(f"    cp {applied} thresholds.toml")
    print(f"    {exe} materialize {where} --thresholds thresholds.toml")
    print(f"  read it:  laion_dask.products.materialize.read_dataset('{run.path}', 'en')")
    print(
        "  notebooks:  .venv/bin/pip install -e '.[notebook]' && .venv/bin/jupyter lab notebooks/"
    )
    print(f"\ndone in {result.seconds:.0f} s")


def _command() -> str:
    """How to call ``laion-dask`` from any directory: the console script next to this Python
    (a venv's bin/), else the bare name for a PATH lookup."""
    exe = Path(sys.executable).with_name("laion-dask")
    return str(exe) if exe.is_file() else "laion-dask"


def main(argv: Sequence[str] | None = None) -> int:
    """``laion-dask demo [--out demo-run] [--pages N] [--seed S] [--workers N]``."""
    p = argparse.ArgumentParser(
        prog="laion-dask demo",
        description="The whole pipeline offline, on a generated crawl and a committed small CLIP.",
    )
    p.add_argument("--out", default="demo-run", help="run directory (default: demo-run)")
    p.add_argument("--pages", type=int, default=CorpusSpec.n_pages, help="pages in the crawl")
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    p.add_argument("--workers", type=int, default=2, help="local Dask worker processes")
    p.add_argument("--threads", type=int, default=1, help="threads per worker")
    p.add_argument("--model", help="CLIP model dir or hub name (default: the committed demo CLIP)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or progress lines")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    args = p.parse_args(argv)
    if args.verbose:  # the package's records reach the root's handlers whatever its level
        level = logging.DEBUG if args.verbose > 1 else logging.INFO
        logging.getLogger("laion_dask").setLevel(level)
    spec = CorpusSpec(n_pages=args.pages, seed=args.seed)
    result = run_demo(
        args.out,
        spec=spec,
        model_dir=args.model,
        workers=args.workers,
        threads=args.threads,
        show_progress=not args.quiet,
    )
    _print_summary(result)
    bad = [s for s, ok in _checks(result).items() if not ok]
    if bad:
        print(f"COUNTS DO NOT ADD UP in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def _checks(result: DemoResult) -> dict[str, bool]:
    from laion_dask.products.stats import check_funnel

    return check_funnel(result.funnel)
