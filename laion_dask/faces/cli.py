"""``laion-dask``: a thin shell over :mod:`laion_dask.orchestration.pipeline` and friends.

Every command takes a run directory; configuration comes from ``--config FILE`` (TOML, see
docs/configuration.md) and a few common flags, and is written back as the run's resolved
``config.toml``. Everything a command can check is checked before it starts a cluster or writes
a file: the config, the inputs, the thresholds, the model, and whether the stage it needs has
run (read from the run directory's markers). So a user's mistake is one line on stderr naming the
problem and its fix, exit code 2, and nothing created; ``-v`` adds the traceback.

Exit codes: 0 done; 1 the work ran and failed (every input failed, a ``--strict`` partition
failed, an unexpected error); 2 nothing was done (a usage, configuration or run-state error);
130 interrupted.

The command functions import the pipeline and products when they run: importing them all up
front takes ~7 s (Dask, pandas, pyarrow, torch's neighbours), which ``--help`` and a usage error
should not pay.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from laion_dask.faces.serving import log_level
from laion_dask.ground.config import (
    ConfigError,
    PipelineConfig,
    config_warnings,
    load_config,
)

log = logging.getLogger("laion_dask")

PROG = "laion-dask"


class UsageError(Exception):
    """A command cannot do what was asked as things stand; the message says what to do instead.

    Raised before any cluster starts or any file is written; printed as one line, exit 2.
    """


# --- what every command shares -------------------------------------------------------------------


def _run_dir(path: str) -> Any:
    """The existing run at ``path``, else UsageError saying how to start one."""
    from laion_dask.orchestration.rundir import RunDir

    run = RunDir(path)
    if not run.exists(run.config_path):
        what = "is not a laion-dask run directory" if run.exists(path) else "does not exist"
        raise UsageError(
            f"{path} {what} (no config.toml); start a run with "
            f"`{PROG} extract INPUT... --out {path}`"
        )
    return run


#: stage folder -> the command that makes it
_MADE_BY = {"candidates": "extract INPUT... --out {run}", "downloads": "download {run}"}


def _require(run: Any, folder: str, command: str) -> None:
    """UsageError unless ``folder`` has finished partitions: ``command`` needs that stage."""
    if run.has_markers(folder):
        return
    make = _MADE_BY.get(folder, "score {run}").format(run=run.path)
    raise UsageError(f"{command}: {run.path} has no {folder} yet; run `{PROG} {make}` first")


def _open_run(args: argparse.Namespace, needs: str, command: str) -> tuple[Any, PipelineConfig]:
    """The run ``command`` works on, once the stage it ``needs`` has run, and its config."""
    run = _run_dir(args.run)
    _require(run, needs, command)
    return run, _base_config(args, run)


def _base_config(args: argparse.Namespace, run: Any | None) -> PipelineConfig:
    """--config file, else the run's own config.toml, else defaults; then CLI overrides."""
    if getattr(args, "config", None):
        cfg = load_config(args.config)
    elif run is not None and run.exists(run.config_path):
        cfg = run.read_config()
    else:
        cfg = PipelineConfig()
    cluster = cfg.cluster.with_flags(
        scheduler=getattr(args, "scheduler", None),
        workers=getattr(args, "workers", None),
        threads=getattr(args, "threads", None),
        no_dashboard=getattr(args, "no_dashboard", False),
    )
    strict = cfg.strict or getattr(args, "strict", False)
    cfg = dataclasses.replace(cfg, cluster=cluster, strict=strict)
    if getattr(args, "allow_private_networks", False):
        cfg = cfg.replace("download", allow_private_networks=True)
    if getattr(args, "model", None):
        cfg = cfg.replace("clip", model=args.model)
    for line in config_warnings(cfg):
        _warn(line)
    return cfg


def _given(args: argparse.Namespace, *keys: str) -> dict[str, Any]:
    """The flags among ``keys`` that the command line gave (or that have defaults), by name:
    they override a config section's values, or go to a function's keywords of that name."""
    return {key: getattr(args, key) for key in keys if getattr(args, key) is not None}


def _warn(line: str) -> None:
    print(f"{PROG}: warning: {line}", file=sys.stderr)


@contextlib.contextmanager
def _client(cfg: PipelineConfig) -> Iterator[Any]:
    from laion_dask.orchestration.cluster import cluster_client, quiet_dask_logging

    quiet_dask_logging(logging.getLogger("laion_dask").getEffectiveLevel())
    with cluster_client(cfg.cluster, child_processes=cfg.clip.loader_processes > 0) as client:
        link = getattr(client, "dashboard_link", None)
        if link and cfg.cluster.dashboard_address is not None:
            print(f"Dask dashboard: {link}", file=sys.stderr)
        yield client


def _start_workers(cfg: PipelineConfig, *preload: str) -> None:
    """Once the checks passed: the local cluster's worker server starts importing the stages
    (and the ``preload`` modules) while this process imports the pipeline (issue 17: the two
    imports used to run one after the other, ~1.7 s of every command's wall time)."""
    from laion_dask.orchestration.cluster import start_worker_server

    start_worker_server(cfg.cluster, preload)


def _print_report(report: Any) -> None:
    """A stage's or materialize's report: counts, partitions resumed, partitions failed."""
    counts = report.counts
    print(f"\n== {report.stage}: {report.rows_in} rows in, {sum(counts.values())} accounted for")
    for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"   {k:<24} {v:>10}")
    if getattr(report, "resumed", 0):  # materialize resumes nothing
        print(f"   ({report.resumed} of {report.partitions} partitions resumed from checkpoints)")
    for part, err in report.failed.items():
        print(f"   FAILED {part}: {err}")


def _outcome(report: Any, cfg: PipelineConfig, what: str) -> int:
    """Exit code of a stage that ran: 1 when every partition failed (or any, with --strict)."""
    failed = len(getattr(report, "failed", None) or {})
    if failed and failed >= getattr(report, "partitions", 0):
        print(
            f"{PROG}: {report.stage}: every {what} failed ({failed} of {report.partitions}); "
            "see the FAILED lines above",
            file=sys.stderr,
        )
        return 1
    return 1 if failed and cfg.strict else 0


def _refuse_changed_config(
    args: argparse.Namespace, run: Any, cfg: PipelineConfig, *stages: str
) -> None:
    """Before any cluster starts or config.toml is rewritten: a changed stage needs --force."""
    from laion_dask.orchestration.pipeline import ConfigChanged, check_config_changes

    if not getattr(args, "force", False):
        for name, changes in check_config_changes(run, cfg, stages).items():
            raise ConfigChanged(name, changes)


# --- checks made before anything starts ----------------------------------------------------------


def _check_inputs(paths: Sequence[str], strict: bool) -> None:
    """Read the first bytes of each local input: empty and unreadable files are named now.

    An empty file is a warning (it adds no pairs); a file that is not WARC/ARC is a warning that
    it will be reported as failed, or with ``strict`` an error. When no input can add a pair,
    nothing is started. Remote inputs are read by the workers only.
    """
    from laion_dask.stages.extract import sniff_format
    from laion_dask.stages.sources import local_path, open_input

    local = [p for p in paths if local_path(p) is not None]
    notes: dict[str, str] = {}  # path -> why it adds no pairs
    for path in local:
        try:
            with open_input(path) as fh:
                kind, _ = sniff_format(fh.read(65536))
        except OSError as err:
            raise UsageError(f"cannot read input {path}: {err}") from err
        if kind == "empty":
            notes[path] = "is empty"
        elif kind in ("unknown", "corrupt_gzip"):
            what = "is corrupt gzip" if kind == "corrupt_gzip" else "is not a WARC, WAT or ARC file"
            if strict:
                raise UsageError(
                    f"input {path} {what}; remove it from the inputs, or drop --strict to "
                    "count it as a failed file and go on"
                )
            notes[path] = what
    if notes and len(notes) == len(paths):
        listed = "; ".join(f"{p} {why}" for p, why in list(notes.items())[:3])
        more = f"; and {len(notes) - 3} more" if len(notes) > 3 else ""
        raise UsageError(f"nothing to extract: {listed}{more}")
    for path, why in notes.items():
        consequence = "it adds no pairs" if why == "is empty" else "it will be reported as failed"
        _warn(f"{path} {why}: {consequence}")


def _expand_inputs(cfg: PipelineConfig) -> list[str]:
    """The input files the config names (globs, listings and crawl ids expanded)."""
    from laion_dask.stages.sources import expand_inputs

    try:
        return expand_inputs(cfg.input.paths, cfg.input)
    except (OSError, ValueError) as err:  # an unreadable or empty listing, a glob with no match
        if isinstance(err, FileNotFoundError | ConfigError):
            raise
        raise UsageError(f"input.paths: {err}") from err


def _check_model(cfg: PipelineConfig) -> None:
    """The configured CLIP (local path or hub name) loads, before a cluster starts."""
    from laion_dask.stages.clip import ModelUnavailableError, check_model_available

    try:
        check_model_available(cfg.clip)
    except ModelUnavailableError as err:
        raise UsageError(str(err)) from err


def _check_consent_lists(cfg: PipelineConfig) -> None:
    from laion_dask.stages.consent import load_lists

    load_lists(cfg.consent)  # a missing list or a bad entry: ConfigError naming the key


def _load_thresholds(path: str) -> Any:
    """The thresholds file, as materialize reads it (what cannot be meant is refused)."""
    from laion_dask.stages.filters import load_thresholds

    if not Path(path).is_file():
        raise UsageError(
            f"thresholds file not found: {path}; export one from `{PROG} dashboard RUN`, or "
            "write a [filters] table (see docs/configuration.md)"
        )
    thresholds = load_thresholds(path)
    for line in config_warnings(thresholds):
        _warn(line)
    return thresholds


# --- commands ------------------------------------------------------------------------------------


def cmd_extract(args: argparse.Namespace) -> int:
    from laion_dask.orchestration.rundir import RunDir

    run = RunDir(args.out)
    cfg = _base_config(args, run)  # re-running into a run resumes with its own config
    changes = _given(args, "limit", "sample", "seed")
    cfg = cfg.replace("input", paths=tuple(args.inputs) or cfg.input.paths, **changes)
    if not cfg.input.paths:
        raise ConfigError("input.paths: give at least one INPUT (file, glob, URL or crawl id)")
    paths = _expand_inputs(cfg)
    _check_inputs(paths, cfg.strict)
    _refuse_changed_config(args, run, cfg, "extract")
    # the language model too: read once by the server, shared by the workers it forks
    _start_workers(cfg, "laion_dask.orchestration.preload_language")
    from laion_dask.orchestration.pipeline import run_extract  # after the checks: ~5 s to import

    run.write_config(cfg)
    with _client(cfg) as client:
        report = run_extract(
            run, cfg, paths, client=client, show_progress=not args.quiet, force=args.force
        )
    _print_report(report)
    print(f"\ncandidates: {run.join('candidates')}")
    if not report.failed and report.rows_in == 0:
        _warn(f"no image-text pairs found in {len(paths)} input file(s)")
    return _outcome(report, cfg, "input file")


def _run_stage(
    args: argparse.Namespace,
    stage: str,
    needs: str,
    outputs: tuple[str, ...],
    checks: Sequence[Callable[[PipelineConfig], None]],
    **kwargs: Any,
) -> int:
    """Shared body of ``download`` and ``score``: checks, config, client, stage, report."""
    run, cfg = _open_run(args, needs, stage)
    _refuse_changed_config(args, run, cfg, stage)
    for check in checks:
        check(cfg)
    _start_workers(cfg)
    from laion_dask.orchestration import pipeline  # after the checks: ~5 s to import

    run.write_config(cfg)
    runner = getattr(pipeline, f"run_{stage}")
    with _client(cfg) as client:
        report = runner(
            run, cfg, client=client, show_progress=not args.quiet, force=args.force, **kwargs
        )
    _print_report(report)
    print("\n" + "   ".join(f"{name}: {run.join(name)}" for name in outputs))
    return _outcome(report, cfg, "partition")


def cmd_download(args: argparse.Namespace) -> int:
    return _run_stage(
        args,
        "download",
        "candidates",
        ("images", "downloads"),
        (_check_consent_lists,),
        retry_failed=args.retry_failed,
    )


def cmd_score(args: argparse.Namespace) -> int:
    return _run_stage(args, "score", "downloads", ("scores", "embeddings"), (_check_model,))


def cmd_materialize(args: argparse.Namespace) -> int:
    run, cfg = _open_run(args, "scores", "materialize")
    thresholds = _load_thresholds(args.thresholds) if args.thresholds else None
    from laion_dask.products.materialize import materialize

    with _client(cfg) as client:
        report = materialize(run, thresholds, client=client)
    for part in (report, *report.subsets.values()):
        _print_report(part)
        print(f"   kept by language group: {json.dumps(part.kept)}")
    print(f"\ndataset: {report.out_dir}")
    for name, sub in report.subsets.items():
        print(f"subset {name}: {sub.out_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from laion_dask.orchestration.rundir import RunDir
    from laion_dask.products.run import STAGE_ORDER, run_pipeline

    stages = tuple(s.strip() for s in args.stages.split(",")) if args.stages else STAGE_ORDER
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        known = ", ".join(STAGE_ORDER)
        raise UsageError(f"--stages: unknown stage {unknown[0]!r} (known: {known})")
    cfg = _base_config(args, None)  # CONFIG is the positional file
    run = RunDir(args.out)
    if "extract" in stages:
        if not cfg.input.paths:
            raise ConfigError(
                f"input.paths: {args.config} names no inputs; add an [input] table with "
                'paths = ["crawl/*.warc.gz"]'
            )
        _check_inputs(_expand_inputs(cfg), cfg.strict)
    else:  # the first stage asked for needs its upstream in RUN already
        first = stages[0]
        _run_dir(args.out)
        _require(run, {"download": "candidates", "score": "downloads"}.get(first, "scores"), first)
    _refuse_changed_config(args, run, cfg, *(s for s in stages if s != "materialize"))
    if "download" in stages:
        _check_consent_lists(cfg)
    if "score" in stages:
        _check_model(cfg)  # last: loading a tokenizer is the slowest check
    language = ("laion_dask.orchestration.preload_language",) if "extract" in stages else ()
    _start_workers(cfg, *language)
    with _client(cfg) as client:
        reports = run_pipeline(
            run, cfg, client=client, show_progress=not args.quiet, force=args.force, stages=stages
        )
    for r in reports:
        _print_report(r)
    return max((_outcome(r, cfg, "partition") for r in reports), default=0)


def cmd_index(args: argparse.Namespace) -> int:
    run, cfg = _open_run(args, "scores", "index")  # [index]: --config or the run's config.toml
    if not run.exists(run.join("embeddings")):
        raise UsageError(
            f"index: {run.path} has scores but no embeddings (clip.write_embeddings = false); "
            f"re-run `{PROG} score {run.path} --force` with clip.write_embeddings = true"
        )
    changes = _given(args, "memory_budget", "flat_max_vectors", "target_recall")
    index_cfg = cfg.replace("index", **changes).index
    from laion_dask.products.knn import build_index, find_near_duplicates

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


def cmd_report(args: argparse.Namespace) -> int:
    run, cfg = _open_run(args, "scores", "report")
    from laion_dask.products.report import build_stats, write_report

    with _client(cfg) as client:
        stats = build_stats(run, client=client)
        paths = write_report(run, stats, formats=(args.format,), out=args.out, client=client)
    print(paths[args.format])
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    if args.serve:
        from laion_dask.faces.search_page import main as page_main

        # the page's own parser takes the serving and logging flags; hand over every one given
        argv = [args.run, "--port", str(args.port), "--address", args.address]
        argv += [] if args.show else ["--no-show"]
        argv += (["-q"] if args.quiet else []) + ["-v"] * args.verbose
        return int(page_main(argv) or 0)
    from laion_dask.products.knn import RESULT_DEDUP_COSINE, search

    if (args.query is None) == (args.image is None):
        raise UsageError("search: give a QUERY text or --image PATH (one of the two)")
    _run_dir(args.run)
    try:
        results = search(
            args.run,
            text=args.query,
            dedup=None if args.no_dedup else RESULT_DEDUP_COSINE,
            thumbnails=False,
            **_given(
                args, "image", "k", "modality", "language_group", "max_punsafe", "max_pwatermark"
            ),
        )
    except ValueError as err:  # a query the index cannot answer (an unreadable image, ...)
        raise UsageError(f"search: {err}") from err
    cols = ["rank", "similarity", "key", "url", "text", "language_group", "collapsed"]
    for row in results[cols].to_dict("records"):
        if args.json:
            print(json.dumps(row, default=str))
        else:
            text = str(row["text"])[:60]
            print(f"{row['rank']:>3} {row['similarity']:.3f} {row['key']} {row['url']}  {text}")
    return 0


def cmd_train_tag_head(args: argparse.Namespace) -> int:
    from laion_dask.products.train import train_tag_head

    try:
        hidden = tuple(int(h) for h in args.hidden.split(",") if h) if args.hidden else ()
    except ValueError:
        raise UsageError(f"--hidden: expected sizes such as 256,64, got {args.hidden!r}") from None
    try:
        metrics = train_tag_head(
            args.parquet,
            args.label,
            args.out,
            embeddings_dir=args.embeddings,
            hidden=hidden,
            **_given(args, "tag", "embedding_col", "epochs"),
        )
    except ValueError as err:  # the labelled file lacks a column, or its labels are not 0/1
        raise UsageError(f"train-tag-head: {err}") from err
    print(json.dumps({"head": args.out, **metrics}, indent=1))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    run, cfg = _open_run(args, "scores", "evaluate")
    for path in args.thresholds:
        _load_thresholds(path)  # refused as materialize refuses it
    from laion_dask.products import evaluate as ev

    budget = ev.EvaluateConfig(
        steps=args.steps, batch_size=args.batch_size, seeds=args.seeds, seed=args.seed
    )
    try:  # every candidate selected and checked before a cluster starts or a file is written
        plan = ev.plan_evaluation(
            run, args.thresholds, args.fraction, heldout=args.heldout, cfg=budget
        )
    except ev.EvaluateError as err:
        raise UsageError(f"evaluate: {err}") from err
    with _client(cfg) as client:
        results = ev.run_evaluation(plan, client=client, show_progress=not args.quiet)
    print(ev.format_results(results))
    print(f"\nresults: {run.join('evaluate', 'results.json')}")
    return 0


def cmd_train_clip(args: argparse.Namespace) -> int:
    from laion_dask.products import train

    return int(train.main(["train-clip", *args.rest]) or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    from laion_dask.faces.demo.run import main as demo_main

    return int(demo_main(args.rest) or 0)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from laion_dask.faces.dashboard import main as dashboard_main

    return int(dashboard_main(args.rest) or 0)


# --- the parser ----------------------------------------------------------------------------------


def _shared_flags() -> list[argparse.ArgumentParser]:
    """The flags several commands take, as parent parsers: output, cluster, config, stage and
    private-networks flags."""
    out, cluster, config, stage, private = [
        argparse.ArgumentParser(add_help=False) for _ in range(5)
    ]
    # -v / -q are accepted before and after the command (the command's own count adds up)
    g = out.add_argument_group("output")
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        dest="verbose_command",
        help="more logging (-vv: debug); errors also print their traceback",
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bar or progress lines",
    )
    g = cluster.add_argument_group("cluster")
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="tcp://HOST:8786 of a running Dask scheduler "
        "(default: $DASK_SCHEDULER_ADDRESS, else the config's [cluster], else a local cluster)",
    )
    g.add_argument("--workers", type=int, metavar="N", help="local cluster: worker processes")
    g.add_argument("--threads", type=int, metavar="N", help="local cluster: threads per worker")
    g.add_argument(
        "--no-dashboard", action="store_true", help="do not start Dask's diagnostics dashboard"
    )
    config.add_argument(
        "--config",
        metavar="TOML",
        help="pipeline config (default: the run's config.toml; a run's own config.toml is "
        "accepted as is)",
    )
    g = stage.add_argument_group("stage")
    g.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first failed partition (default: count it, report it by name, go on)",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="recompute finished partitions whose config changed (default: refuse)",
    )
    private.add_argument(
        "--allow-private-networks",
        action="store_true",
        help="allow loopback/private download targets (offline demo and tests only)",
    )
    return [out, cluster, config, stage, private]


#: commands that parse their own flags (``argparse.REMAINDER`` would drop leading options)
_PASSTHROUGH: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "dashboard": (
        cmd_dashboard,
        "Panel dashboard: tune thresholds on stored scores, then materialize (RUN [--port N])",
    ),
    "demo": (cmd_demo, "the whole pipeline offline on a generated crawl ([--out demo-run])"),
    "train-clip": (cmd_train_clip, "train a small CLIP on webdataset shards (SHARDS... --out DIR)"),
}

_EPILOG = (
    "Exit codes: 0 done; 1 the work ran and failed; 2 nothing was done (a usage, configuration "
    "or run-state error, printed as one line; -v adds the traceback). Off a terminal, progress "
    "is one line per stage start and end plus one every $LAION_DASK_PROGRESS_INTERVAL seconds "
    "(default 10)."
)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (its default prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Rebuild a LAION-5B-style image-text dataset from Common Crawl with Dask.",
        epilog=_EPILOG,
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or progress lines")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    out, cluster, config, stage, private = _shared_flags()
    work = [config, out, cluster]

    def add(
        name: str,
        func: Callable[[argparse.Namespace], int],
        text: str,
        parents: list[argparse.ArgumentParser],
        run: str | None = None,
    ) -> Any:
        """A command; ``run`` describes its RUN argument, the run directory it works on."""
        sp = sub.add_parser(name, help=text, description=text, parents=parents)
        sp.set_defaults(func=func)
        if run is not None:
            sp.add_argument("run", metavar="RUN", help=f"run directory ({run})")
        return sp

    text = "WAT/WARC/ARC files -> RUN/candidates (pairs + language + rules)"
    sp = add("extract", cmd_extract, text, [*work, stage])
    sp.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="files, globs, directories, fsspec URLs or crawl ids such as CC-MAIN-2024-22 "
        "(default: the config's input.paths)",
    )
    sp.add_argument("--out", required=True, metavar="RUN", help="run directory to write")
    sp.add_argument("--limit", type=int, metavar="N", help="at most N input files")
    sp.add_argument("--sample", type=float, metavar="FRACTION", help="a random share of inputs")
    sp.add_argument("--seed", type=int, help="seed for --sample (default 0)")

    text = "RUN/candidates -> RUN/images shards + RUN/downloads (after extract)"
    sp = add("download", cmd_download, text, [*work, stage, private], run="made by extract")
    sp.add_argument("--retry-failed", action="store_true", help="re-fetch transient failures only")

    text = "RUN/images -> RUN/scores + RUN/embeddings with CLIP (after download)"
    sp = add("score", cmd_score, text, [*work, stage], run="downloaded")
    sp.add_argument("--model", help="hub name or local path of the CLIP model (clip.model)")

    text = "apply thresholds -> RUN/dataset (after score)"
    sp = add("materialize", cmd_materialize, text, work, run="scored")
    sp.add_argument(
        "--thresholds",
        metavar="TOML",
        help="a [filters] table, e.g. exported by the dashboard or RUN/dataset/thresholds.toml "
        "(default: the run config's [filters])",
    )

    sp = add(
        "run", cmd_run, "the whole pipeline from one config file", [out, cluster, stage, private]
    )
    sp.add_argument("config", metavar="CONFIG", help="pipeline config TOML with [input] paths")
    sp.add_argument("--out", required=True, metavar="RUN", help="run directory")
    sp.add_argument(
        "--stages",
        metavar="LIST",
        help="comma list of extract,download,score,materialize (default: all four)",
    )

    text = "faiss kNN index over RUN/embeddings -> RUN/index (after score)"
    sp = add("index", cmd_index, text, work, run="scored, with embeddings")
    sp.add_argument("--text", action="store_true", help="also index the caption embeddings")
    sp.add_argument(
        "--memory-budget", metavar="BYTES", help="bytes the index may take, e.g. 4GB (default 4GB)"
    )
    sp.add_argument(
        "--flat-max-vectors", type=int, metavar="N", help="exact Flat index up to N vectors"
    )
    sp.add_argument(
        "--target-recall", type=float, metavar="R", help="recall@10 nprobe must reach (0.95)"
    )
    sp.add_argument(
        "--near-duplicates",
        type=float,
        nargs="?",
        const=0.94,
        metavar="COSINE",
        help="also group near-duplicate images -> RUN/neardup (default cosine 0.94)",
    )

    text = "stats.json + report.html (or .md) of a run (after score)"
    sp = add("report", cmd_report, text, work, run="scored")
    sp.add_argument(
        "--format", choices=("html", "md", "json"), default="html", help="default: html"
    )
    sp.add_argument("--out", metavar="DIR", help="output folder (default: RUN/report)")

    text = "search a run's index by text or image (after index)"
    sp = add("search", cmd_search, text, [out], run="indexed")
    sp.add_argument("query", nargs="?", help="text query, encoded with the run's CLIP")
    sp.add_argument("--image", metavar="PATH", help="an image file to search by instead")
    sp.add_argument("-k", type=int, default=10, help="results (default 10)")
    sp.add_argument(
        "--modality", default="image", choices=["image", "text"], help="index to search"
    )
    sp.add_argument(
        "--language-group", choices=["en", "multi", "nolang"], help="only this language group"
    )
    sp.add_argument("--max-punsafe", type=float, metavar="P", help="drop results above P")
    sp.add_argument("--max-pwatermark", type=float, metavar="P", help="drop results above P")
    sp.add_argument("--no-dedup", action="store_true", help="keep near-duplicate results")
    sp.add_argument("--json", action="store_true", help="one JSON object per result")
    sp.add_argument("--serve", action="store_true", help="serve the search page instead")
    sp.add_argument("--port", type=int, default=5007, help="--serve: port (0 = a free one)")
    sp.add_argument(
        "--address", default="127.0.0.1", help="--serve: interface to listen on (127.0.0.1)"
    )
    sp.add_argument("--show", action="store_true", help="--serve: open a browser on the page")

    text = "train the small CLIP on each candidate filter at equal compute -> RUN/evaluate"
    sp = add("evaluate", cmd_evaluate, text, work, run="scored")
    sp.add_argument(
        "--thresholds", nargs="+", default=[], metavar="TOML", help="candidate thresholds files"
    )
    sp.add_argument(
        "--fraction",
        nargs="+",
        type=float,
        default=[],
        metavar="X",
        help="candidates keeping the top X (0-1] by similarity of the rows the other rules keep",
    )
    sp.add_argument("--steps", type=int, default=100, help="training steps per candidate (100)")
    sp.add_argument("--batch-size", type=int, default=64, help="pairs per step (64)")
    sp.add_argument("--seeds", type=int, default=2, help="trainings per candidate (2)")
    sp.add_argument("--seed", type=int, default=0, help="first seed, and the demo's draw (0)")
    sp.add_argument(
        "--heldout",
        metavar="DIR",
        help="labelled images DIR/CLASS/IMAGE (+ IMAGE.txt captions); default on a demo run: "
        "freshly drawn pictures",
    )

    text = "train a punsafe/pwatermark probe on embeddings"
    sp = add("train-tag-head", cmd_train_tag_head, text, [out])
    sp.add_argument("parquet", help="labelled rows: LABEL column + embedding column or key")
    sp.add_argument("--label", required=True, help="0/1 label column")
    sp.add_argument("--out", required=True, help="head file to write (.safetensors)")
    sp.add_argument("--tag", default="punsafe", choices=["punsafe", "pwatermark"], help="tag")
    sp.add_argument(
        "--embedding-col", default="image_embedding", help="column holding the embedding"
    )
    sp.add_argument("--embeddings", help="clip-retrieval folder to join by key instead")
    sp.add_argument("--hidden", help="hidden layer sizes, e.g. 256,64 (default: linear)")
    sp.add_argument("--epochs", type=int, default=200, help="training epochs (default 200)")

    for name, (_func, text) in _PASSTHROUGH.items():
        # listed for --help; main() hands their arguments over before argparse sees them
        sp = sub.add_parser(name, add_help=False, help=text)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # progress belongs to Dask: no per-worker weight-loading bars (inherited by local workers)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # leading -v / -q, then a pass-through command gets the rest as it is
    lead = 0
    while lead < len(argv) and argv[lead] in ("-v", "-vv", "--verbose", "-q", "--quiet"):
        lead += 1
    if lead < len(argv) and argv[lead] in _PASSTHROUGH:
        verbose = sum(2 if a == "-vv" else 1 for a in argv[:lead] if a.startswith(("-v", "--v")))
        quiet = [a for a in argv[:lead] if a in ("-q", "--quiet")]
        # the dashboard's and the demo's own parsers take -v/-q; train-clip's takes neither
        own = argv[lead + 1 :]
        rest = own if argv[lead] == "train-clip" else [*quiet, *["-v"] * verbose, *own]
        _set_logging(verbose)
        from laion_dask.orchestration.cluster import quiet_dask_logging

        quiet_dask_logging(log_level(verbose))  # the demo and the dashboard start clusters
        func = _PASSTHROUGH[argv[lead]][0]
        return _guarded(lambda: func(argparse.Namespace(rest=rest)), verbose)
    args = build_parser().parse_args(argv)
    args.verbose = args.verbose + getattr(args, "verbose_command", 0)
    args.quiet = bool(args.quiet)
    _set_logging(args.verbose)
    return _guarded(lambda: args.func(args), args.verbose)


def _set_logging(verbose: int) -> None:
    level = log_level(verbose)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _guarded(call: Callable[[], int | None], verbose: int) -> int:
    """Run a command; a user's mistake is one line and exit 2, a failure one line and exit 1."""
    try:
        return int(call() or 0)
    except (UsageError, ConfigError, FileNotFoundError, NotADirectoryError) as err:
        error, code, text = err, 2, str(err)
        if isinstance(err, OSError) and " " not in text.strip():  # pyarrow's bare path
            text = f"file not found: {text or err.filename}"
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not 60
        # imported here: a stage that raised it has loaded Dask already, a usage error has not
        from laion_dask.orchestration.runner import StageError

        error, code = err, 1
        if isinstance(err, StageError):
            text = f"{err} (without --strict a failed partition is counted, the run goes on)"
        else:
            text = f"unexpected {type(err).__name__}: {err} (run with -v for the traceback)"
    if verbose:
        traceback.print_exception(error)
    first, *_ = text.strip().splitlines() or [""]
    print(f"{PROG}: {first}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
