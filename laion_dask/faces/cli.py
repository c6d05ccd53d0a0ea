"""``laion-dask``: a thin shell over :mod:`laion_dask.orchestration.pipeline` and friends.

Every command takes a run directory; configuration comes from ``--config FILE`` (TOML, see
README) and a few common flags, is validated before any work starts, and is written back as the
run's resolved ``config.toml``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from laion_dask.ground.config import ConfigError, PipelineConfig, load_config

log = logging.getLogger("laion_dask")


def _base_config(args: argparse.Namespace, run_path: str | None) -> PipelineConfig:
    """--config file, else the run's own config.toml, else defaults; then CLI overrides."""
    from laion_dask.orchestration.rundir import RunDir

    if getattr(args, "config", None):
        cfg = load_config(args.config)
    elif run_path and RunDir(run_path).exists(RunDir(run_path).config_path):
        cfg = RunDir(run_path).read_config()
    else:
        cfg = PipelineConfig()
    cluster: dict[str, Any] = {}
    scheduler = getattr(args, "scheduler", None) or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if scheduler:
        cluster["scheduler_address"] = scheduler
    if getattr(args, "workers", None):
        cluster["n_workers"] = args.workers
    if getattr(args, "threads", None):
        cluster["threads_per_worker"] = args.threads
    if getattr(args, "no_dashboard", False):
        cluster["dashboard_address"] = None
    if cluster:
        cfg = cfg.replace("cluster", **cluster)
    if getattr(args, "strict", False):
        import dataclasses

        cfg = dataclasses.replace(cfg, strict=True)
    if getattr(args, "allow_private_networks", False):
        cfg = cfg.replace("download", allow_private_networks=True)
    if getattr(args, "model", None):
        cfg = cfg.replace("clip", model=args.model)
    return cfg


@contextlib.contextmanager
def _client(cfg: PipelineConfig) -> Iterator[Any]:
    from laion_dask.orchestration.cluster import cluster_client

    with cluster_client(cfg.cluster, child_processes=cfg.clip.loader_processes > 0) as client:
        link = getattr(client, "dashboard_link", None)
        if link and cfg.cluster.dashboard_address is not None:
            print(f"Dask dashboard: {link}", file=sys.stderr)
        yield client


def _print_report(report: Any) -> None:
    name = getattr(report, "stage", "stage")
    counts = getattr(report, "counts", {})
    rows_in = getattr(report, "rows_in", 0)
    print(f"\n== {name}: {rows_in} rows in, {sum(counts.values())} accounted for")
    for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"   {k:<24} {v:>10}")
    if getattr(report, "resumed", 0):
        print(f"   ({report.resumed} of {report.partitions} partitions resumed from checkpoints)")
    for part, err in getattr(report, "failed", {}).items():
        print(f"   FAILED {part}: {err}")


def _refuse_changed_config(
    args: argparse.Namespace, run: Any, cfg: PipelineConfig, *stages: str
) -> None:
    """Before any cluster starts or config.toml is rewritten: a changed stage needs --force."""
    from laion_dask.orchestration.pipeline import ConfigChanged, check_config_changes

    if not getattr(args, "force", False):
        for name, changes in check_config_changes(run, cfg, stages).items():
            raise ConfigChanged(name, changes)


def cmd_extract(args: argparse.Namespace) -> int:
    from laion_dask.orchestration.pipeline import run_extract
    from laion_dask.orchestration.rundir import RunDir
    from laion_dask.stages.sources import expand_inputs

    cfg = _base_config(args, None)
    changes: dict[str, Any] = {"paths": tuple(args.inputs) or cfg.input.paths}
    for key in ("limit", "sample", "seed"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    cfg = cfg.replace("input", **changes)
    if not cfg.input.paths:
        raise ConfigError("input.paths: give at least one INPUT (file, glob, URL or crawl id)")
    paths = expand_inputs(cfg.input.paths, cfg.input)  # errors before any cluster starts
    run = RunDir(args.out)
    _refuse_changed_config(args, run, cfg, "extract")
    run.write_config(cfg)
    with _client(cfg) as client:
        report = run_extract(
            run, cfg, paths, client=client, show_progress=not args.quiet, force=args.force
        )
    _print_report(report)
    print(f"\ncandidates: {run.join('candidates')}")
    return 1 if report.failed and cfg.strict else 0


def _run_stage(
    args: argparse.Namespace, stage: str, outputs: tuple[str, ...], **kwargs: Any
) -> int:
    """Shared body of ``download`` and ``score``: config, client, stage runner, report."""
    from laion_dask.orchestration import pipeline
    from laion_dask.orchestration.rundir import RunDir

    cfg = _base_config(args, args.run)
    run = RunDir(args.run)
    _refuse_changed_config(args, run, cfg, stage)
    run.write_config(cfg)
    runner = getattr(pipeline, f"run_{stage}")
    with _client(cfg) as client:
        report = runner(
            run, cfg, client=client, show_progress=not args.quiet, force=args.force, **kwargs
        )
    _print_report(report)
    print("\n" + "   ".join(f"{name}: {run.join(name)}" for name in outputs))
    return 1 if report.failed and cfg.strict else 0


def cmd_download(args: argparse.Namespace) -> int:
    return _run_stage(args, "download", ("images", "downloads"), retry_failed=args.retry_failed)


def cmd_score(args: argparse.Namespace) -> int:
    return _run_stage(args, "score", ("scores", "embeddings"))


def cmd_materialize(args: argparse.Namespace) -> int:
    from laion_dask.orchestration.rundir import RunDir
    from laion_dask.products.materialize import materialize

    cfg = _base_config(args, args.run)
    run = RunDir(args.run)
    with _client(cfg) as client:
        report = materialize(run, args.thresholds, client=client)
    _print_report(report)
    print(f"   kept by language group: {json.dumps(report.kept)}")
    for sub in report.subsets.values():
        _print_report(sub)
        print(f"   kept by language group: {json.dumps(sub.kept)}")
    print(f"\ndataset: {report.out_dir}")
    for name, sub in report.subsets.items():
        print(f"subset {name}: {sub.out_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from laion_dask.orchestration.rundir import RunDir
    from laion_dask.products.run import run_pipeline
    from laion_dask.stages.sources import expand_inputs

    cfg = _base_config(args, None)
    if not cfg.input.paths:
        raise ConfigError("input.paths: the config names no inputs")
    expand_inputs(cfg.input.paths, cfg.input)
    run = RunDir(args.out)
    stages = args.stages.split(",") if args.stages else None
    _refuse_changed_config(args, run, cfg, *(stages or ("extract", "download", "score")))
    with _client(cfg) as client:
        kwargs = {"stages": stages} if stages else {}
        reports = run_pipeline(
            run, cfg, client=client, show_progress=not args.quiet, force=args.force, **kwargs
        )
    for r in reports:
        _print_report(r)
    return 0


def cmd_train_clip(args: argparse.Namespace) -> int:
    from laion_dask.products import train

    return int(train.main(["train-clip", *args.rest]) or 0)


def cmd_train_tag_head(args: argparse.Namespace) -> int:
    from laion_dask.stages.tags import train_tag_head

    metrics = train_tag_head(
        args.parquet,
        args.label,
        args.out,
        tag=args.tag,
        embedding_col=args.embedding_col,
        embeddings_dir=args.embeddings,
        hidden=tuple(int(h) for h in args.hidden.split(",") if h) if args.hidden else (),
        epochs=args.epochs,
    )
    print(json.dumps({"head": args.out, **metrics}, indent=1))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from laion_dask.orchestration.rundir import RunDir
    from laion_dask.products.knn import build_index, find_near_duplicates

    cfg = _base_config(args, args.run)  # [index] from --config or the run's config.toml
    changes = {"memory_budget": args.memory_budget} if args.memory_budget else {}
    if args.flat_max_vectors is not None:
        changes["flat_max_vectors"] = args.flat_max_vectors
    if args.target_recall is not None:
        changes["target_recall"] = args.target_recall
    index_cfg = cfg.replace("index", **changes).index  # ConfigError before any cluster starts
    run = RunDir(args.run)
    with _client(cfg) as client:
        for modality in ("image", "text") if args.text else ("image",):
            info = build_index(run, index_cfg, modality=modality, client=client)
            probe = f", nprobe {info.nprobe}" if info.nprobe else ""
            print(
                f"{modality}: {info.factory} ({info.kind}) over {info.n} vectors of width "
                f"{info.dim}, recall@{info.recall_k} {info.recall:.3f}{probe}, "
                f"{info.index_bytes / 1e6:.1f} MB, {info.build_seconds:.1f} s"
            )
        if args.near_duplicates is not None:
            rep = find_near_duplicates(run, args.near_duplicates, client=client)
            print(
                f"near-duplicates (cosine >= {rep.threshold}): {rep.groups} groups, "
                f"{rep.near_duplicates} of {rep.images} images flagged"
            )
    print(f"\nindex: {run.join('index')}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    if args.serve:
        from laion_dask.faces.search_page import main as page_main

        return int(page_main([args.run, "--port", str(args.port), "--no-show"]) or 0)
    from laion_dask.products.knn import RESULT_DEDUP_COSINE, search

    if (args.query is None) == (args.image is None):
        print("laion-dask search: give a QUERY text or --image PATH", file=sys.stderr)
        return 2
    try:
        results = search(
            args.run,
            text=args.query,
            image=args.image,
            k=args.k,
            modality=args.modality,
            language_group=args.language_group,
            max_punsafe=args.max_punsafe,
            max_pwatermark=args.max_pwatermark,
            dedup=None if args.no_dedup else RESULT_DEDUP_COSINE,
            thumbnails=False,
        )
    except ValueError as err:
        print(f"laion-dask search: {err}", file=sys.stderr)
        return 2
    cols = ["rank", "similarity", "key", "url", "text", "language_group", "collapsed"]
    for row in results[cols].to_dict("records"):
        if args.json:
            print(json.dumps(row, default=str))
        else:
            text = str(row["text"])[:60]
            print(f"{row['rank']:>3} {row['similarity']:.3f} {row['key']} {row['url']}  {text}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from laion_dask.faces.demo.run import main as demo_main

    return int(demo_main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="laion-dask",
        description="Rebuild a LAION-5B-style image-text dataset from Common Crawl with Dask.",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, *, config: bool = True) -> None:
        if config:
            sp.add_argument(
                "--config", help="pipeline config TOML (default: the run's config.toml)"
            )
        sp.add_argument(
            "--scheduler",
            help="tcp://HOST:8786 of a running Dask scheduler "
            "(default: $DASK_SCHEDULER_ADDRESS, else a local cluster)",
        )
        sp.add_argument("--workers", type=int, help="local cluster: number of worker processes")
        sp.add_argument("--threads", type=int, help="local cluster: threads per worker")
        sp.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
        sp.add_argument("--strict", action="store_true", help="stop at the first failed partition")
        sp.add_argument(
            "--force",
            action="store_true",
            help="recompute finished partitions whose config changed (default: refuse)",
        )
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    sp = sub.add_parser(
        "extract", help="WAT/WARC files -> RUN/candidates (pairs + language + rules)"
    )
    sp.add_argument(
        "inputs", nargs="*", help="files, globs, fsspec URLs or crawl ids (CC-MAIN-2024-22)"
    )
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--limit", type=int, help="at most N input files")
    sp.add_argument("--sample", type=float, help="a random FRACTION of the input files")
    sp.add_argument("--seed", type=int, help="seed for --sample")
    common(sp)
    sp.set_defaults(func=cmd_extract)

    sp = sub.add_parser("download", help="RUN/candidates -> RUN/images shards + RUN/downloads")
    sp.add_argument("run")
    sp.add_argument("--retry-failed", action="store_true", help="re-fetch transient failures only")
    sp.add_argument(
        "--allow-private-networks",
        action="store_true",
        help="allow loopback/private targets (offline demo and tests only)",
    )
    common(sp)
    sp.set_defaults(func=cmd_download)

    sp = sub.add_parser("score", help="RUN/images -> RUN/scores + RUN/embeddings (CLIP)")
    sp.add_argument("run")
    sp.add_argument("--model", help="hub name or local path of the CLIP model")
    common(sp)
    sp.set_defaults(func=cmd_score)

    sp = sub.add_parser("materialize", help="apply thresholds -> RUN/dataset")
    sp.add_argument("run")
    sp.add_argument("--thresholds", help="thresholds.toml (default: the run config's [filters])")
    common(sp)
    sp.set_defaults(func=cmd_materialize)

    sp = sub.add_parser("run", help="the whole pipeline from a config file")
    sp.add_argument("config", help="pipeline config TOML with [input] paths")
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--stages", help="comma list, default extract,download,score,materialize")
    sp.add_argument("--allow-private-networks", action="store_true")
    common(sp, config=False)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("index", help="faiss kNN index over RUN/embeddings -> RUN/index")
    sp.add_argument("run")
    sp.add_argument("--text", action="store_true", help="also index the caption embeddings")
    sp.add_argument("--memory-budget", help="bytes the index may take, e.g. 4GB (default 4GB)")
    sp.add_argument("--flat-max-vectors", type=int, help="exact Flat index up to N vectors")
    sp.add_argument("--target-recall", type=float, help="recall@10 nprobe must reach (0.95)")
    sp.add_argument(
        "--near-duplicates",
        type=float,
        nargs="?",
        const=0.94,
        metavar="COSINE",
        help="also group near-duplicate images -> RUN/neardup (default cosine 0.94)",
    )
    common(sp)
    sp.set_defaults(func=cmd_index)

    sp = sub.add_parser("search", help="search a run's index by text or image")
    sp.add_argument("run")
    sp.add_argument("query", nargs="?", help="text query, encoded with the run's CLIP")
    sp.add_argument("--image", help="an image file to search by instead")
    sp.add_argument("-k", type=int, default=10, help="results (default 10)")
    sp.add_argument("--modality", default="image", choices=["image", "text"])
    sp.add_argument("--language-group", choices=["en", "multi", "nolang"])
    sp.add_argument("--max-punsafe", type=float)
    sp.add_argument("--max-pwatermark", type=float)
    sp.add_argument("--no-dedup", action="store_true", help="keep near-duplicate results")
    sp.add_argument("--json", action="store_true", help="one JSON object per result")
    sp.add_argument("--serve", action="store_true", help="serve the search page instead")
    sp.add_argument("--port", type=int, default=5007, help="--serve: port (0 = a free one)")
    sp.set_defaults(func=cmd_search)

    sp = sub.add_parser("train-tag-head", help="train a punsafe/pwatermark probe on embeddings")
    sp.add_argument("parquet", help="labelled rows: LABEL column + embedding column or key")
    sp.add_argument("--label", required=True, help="0/1 label column")
    sp.add_argument("--out", required=True, help="head file to write (.safetensors)")
    sp.add_argument("--tag", default="punsafe", choices=["punsafe", "pwatermark"])
    sp.add_argument("--embedding-col", default="image_embedding")
    sp.add_argument("--embeddings", help="clip-retrieval folder to join by key instead")
    sp.add_argument("--hidden", help="hidden layer sizes, e.g. 256,64 (default: linear)")
    sp.add_argument("--epochs", type=int, default=200)
    sp.set_defaults(func=cmd_train_tag_head)

    # these parse their own flags (argparse.REMAINDER would drop leading options); listed for --help
    for name, text in _PASSTHROUGH_HELP.items():
        sp = sub.add_parser(name, add_help=False, help=text)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _quiet_dask_chatter(level: int) -> None:
    """distributed logs cluster start-up at INFO and every P2P shuffle at WARNING: -v / -vv."""
    import distributed  # noqa: F401  - it sets its loggers' levels on import; override after

    if level > logging.DEBUG:
        logging.getLogger("distributed.shuffle").setLevel(logging.ERROR)
    logging.getLogger("distributed").setLevel(max(level, logging.WARNING))


def cmd_dashboard(args: argparse.Namespace) -> int:
    from laion_dask.faces.dashboard import main as dashboard_main

    return int(dashboard_main(args.rest) or 0)


def cmd_report(args: argparse.Namespace) -> int:
    from laion_dask.products.report import main as report_main

    return int(report_main(args.rest) or 0)


_PASSTHROUGH = {
    "demo": cmd_demo,
    "train-clip": cmd_train_clip,
    "report": cmd_report,
    "dashboard": cmd_dashboard,
}
_PASSTHROUGH_HELP = {
    "train-clip": "train a small CLIP on webdataset shards (SHARDS... --out DIR)",
    "report": "stats.json + report.html of a run (RUN [--format md])",
    "demo": "the whole pipeline offline on a generated crawl ([--out demo-run])",
    "dashboard": "Panel dashboard to tune thresholds on stored scores (RUN [--port N])",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # progress belongs to Dask: no per-worker weight-loading bars (inherited by local workers)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    if argv and argv[0] in _PASSTHROUGH:
        # these own their flags (argparse.REMAINDER drops leading options)
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        _quiet_dask_chatter(logging.WARNING)
        return int(_PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:])) or 0)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_dask_chatter(level)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"laion-dask: configuration error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"laion-dask: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
