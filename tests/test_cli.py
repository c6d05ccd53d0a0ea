"""The command line as a user types it (real local clusters, real files)."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from laion_dask.faces.cli import main
from laion_dask.ground.config import FilterConfig
from laion_dask.orchestration.rundir import RunDir
from laion_dask.stages.filters import dump_thresholds
from tests.helpers.runs import make_scored_run

LOCAL = ["--workers", "1", "--threads", "1", "--no-dashboard", "-q"]


def test_extract_writes_candidates_and_config(corpus, tmp_path, capsys):
    src = corpus / "chatnoir-eu-chatnoir-resiliparse/warcfile.warc.gz"
    out = tmp_path / "run"
    assert main(["extract", str(src), "--out", str(out), *LOCAL]) == 0
    printed = capsys.readouterr().out
    assert "== extract" in printed and "accounted for" in printed
    run = RunDir(str(out))
    assert run.read_config().input.paths == (str(src),)
    cand = pd.concat([run.read_parquet(p) for p in run.parts("candidates")])
    assert len(cand) > 0 and cand["uid"].is_unique


def test_config_errors_name_the_key_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[download]\nmax_bytes = -5\n")
    out = tmp_path / "run"
    rc = main(["extract", "x.warc.gz", "--out", str(out), "--config", str(cfg), *LOCAL])
    assert rc == 2
    assert "download.max_bytes" in capsys.readouterr().err
    assert not out.exists()


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    rc = main(["extract", str(tmp_path / "nope-*.wat.gz"), "--out", str(tmp_path / "r"), *LOCAL])
    assert rc == 2
    assert "nope-" in capsys.readouterr().err


def test_materialize_with_a_thresholds_file(tmp_path, capsys):
    run = make_scored_run(tmp_path / "run")
    path = tmp_path / "thresholds.toml"
    dump_thresholds(FilterConfig(similarity_en=0.2), path)
    assert main(["materialize", run.path, "--thresholds", str(path), *LOCAL]) == 0
    out = capsys.readouterr().out
    assert "kept by language group" in out
    assert (tmp_path / "run" / "dataset" / "funnel.json").is_file()


def test_materialize_prints_and_writes_each_subset(tmp_path, capsys):
    run = make_scored_run(tmp_path / "run")
    path = tmp_path / "thresholds.toml"
    path.write_text(
        "[filters]\nsimilarity_en = 0.2\nmax_punsafe = 0.95\n"
        "[filters.subsets.research-safe]\nmax_punsafe = 0.45\n"
    )
    assert main(["materialize", run.path, "--thresholds", str(path), *LOCAL]) == 0
    out = capsys.readouterr().out
    assert "== materialize/research-safe" in out
    sub_dir = tmp_path / "run" / "dataset" / "research-safe"
    assert f"subset research-safe: {sub_dir}" in out
    assert (sub_dir / "funnel.json").is_file()


def test_train_tag_head(tmp_path, capsys):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 16)).astype("float32")
    label = (emb[:, 0] > 0).astype(int)
    pd.DataFrame({"image_embedding": list(emb), "unsafe": label}).to_parquet(tmp_path / "l.parquet")
    head = tmp_path / "head.safetensors"
    rc = main(
        [
            "train-tag-head",
            str(tmp_path / "l.parquet"),
            "--label",
            "unsafe",
            "--out",
            str(head),
            "--epochs",
            "50",
        ]
    )
    assert rc == 0 and head.is_file()
    assert '"head"' in capsys.readouterr().out


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in (
        "extract",
        "download",
        "score",
        "materialize",
        "run",
        "demo",
        "train-clip",
        "train-tag-head",
    ):
        assert cmd in out


@pytest.mark.timeout(600)  # three local clusters, one after the other
def test_run_a_config_end_to_end(tmp_path, capsys):
    """`laion-dask run CONFIG.toml --out RUN`: every stage from one file, on the demo's hosts."""
    from laion_dask.faces.demo.host import serve_demo_corpus
    from laion_dask.ground.config import PipelineConfig, dump_config
    from laion_dask.products.synthetic.corpus import CorpusSpec
    from laion_dask.products.train import demo_model_dir

    with serve_demo_corpus(tmp_path / "corpus", CorpusSpec(n_pages=10, seed=9)) as (info, _):
        cfg = PipelineConfig().replace("input", paths=tuple(str(p) for p in info.wat_files))
        cfg = cfg.replace("download", allow_private_networks=True)
        cfg = cfg.replace("clip", model=str(demo_model_dir()))
        dump_config(cfg, tmp_path / "config.toml")
        rc = main(["run", str(tmp_path / "config.toml"), "--out", str(tmp_path / "run"), *LOCAL])
        assert rc == 0
        out = capsys.readouterr().out
        for stage in ("== extract", "== download", "== score", "== materialize"):
            assert stage in out
        assert (tmp_path / "run" / "dataset" / "funnel.json").is_file()

        # the run's own config.toml (with score's [run] facts) is reusable as it is: by `run`,
        # which resumes every partition, and as any command's --config
        own = tmp_path / "run" / "config.toml"
        assert "[run.clip_resolved]" in own.read_text()
        assert main(["run", str(own), "--out", str(tmp_path / "run"), *LOCAL]) == 0
        again = capsys.readouterr().out
        resumed = re.findall(r"\((\d+) of (\d+) partitions resumed from checkpoints\)", again)
        assert len(resumed) == 3 and all(a == b for a, b in resumed), again  # every stage
        run = str(tmp_path / "run")
        assert main(["materialize", run, "--config", str(own), *LOCAL]) == 0
    assert "kept by language group" in capsys.readouterr().out


def test_a_missing_consent_list_stops_the_run_before_any_work(corpus, tmp_path, capsys):
    src = corpus / "chatnoir-eu-chatnoir-resiliparse/warcfile.warc.gz"
    cfg = tmp_path / "config.toml"
    missing = tmp_path / "no-such-list.txt"
    cfg.write_text(f'[input]\npaths = ["{src}"]\n[consent]\nurl_blocklists = ["{missing}"]\n')
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), *LOCAL]) == 2
    err = capsys.readouterr().err
    assert "consent.url_blocklists" in err and "no-such-list.txt" in err
    assert not (out / "extract").exists()


def test_docs_cli_md_is_the_help_of_every_command():
    """docs/cli.md is generated from --help: a flag added without regenerating it fails here."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_cli_docs", root / "scripts/gen_cli_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    page = gen.render()
    for name in gen.commands():  # every subcommand, its usage line included
        assert f"## laion-dask {name}\n" in page and f"usage: laion-dask {name}" in page, name
    current = (root / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == page, "docs/cli.md is out of date: run python scripts/gen_cli_docs.py"


def test_every_argument_of_every_command_has_help():
    """What --help (and so docs/cli.md) shows for each flag and positional is never blank."""
    import argparse

    from laion_dask.faces.cli import _PASSTHROUGH, build_parser

    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        if name in _PASSTHROUGH:  # parsed by their own modules: below
            continue
        for action in command._actions:
            assert action.help, f"laion-dask {name}: {action.option_strings or action.dest}"


def test_every_argument_of_the_pass_through_commands_has_help(monkeypatch):
    """dashboard, demo and train-clip parse their own flags: their --help has no blanks either."""
    from laion_dask.faces.cli import _PASSTHROUGH

    seen: list[argparse.ArgumentParser] = []

    def capture(self, *args, **kwargs):  # the parser the command builds, before it parses
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    for name, (func, _text) in _PASSTHROUGH.items():
        seen.clear()
        with pytest.raises(SystemExit):
            func(argparse.Namespace(rest=["--help"]))
        parsers = list(seen)
        while parsers:
            parser = parsers.pop()
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    parsers.extend(action.choices.values())
                    continue
                assert action.help, f"laion-dask {name}: {action.option_strings or action.dest}"


def test_search_serve_hands_every_serving_and_logging_flag_to_the_page(monkeypatch):
    """`search RUN --serve` forwards --port/--address/--show/-q/-v, before or after the command."""
    from laion_dask.faces import search_page

    seen = []
    monkeypatch.setattr(search_page, "main", lambda argv: seen.append(argv) or 0)
    argv = ["-v", "search", "RUN", "--serve", "--port", "0", "--address", "0.0.0.0", "-q"]
    assert main(argv) == 0
    assert main(["search", "RUN", "--serve", "--show"]) == 0
    assert seen[0] == ["RUN", "--port", "0", "--address", "0.0.0.0", "--no-show", "-q", "-v"]
    assert seen[1] == ["RUN", "--port", "5007", "--address", "127.0.0.1"]


def test_cluster_flags_that_cannot_be_meant_are_refused_like_the_dashboards(tmp_path, capsys):
    """`--workers 0` was dropped silently by the CLI while the dashboard refused it: one rule."""
    run = make_scored_run(tmp_path / "run", parts=1, rows=20)
    assert main(["report", run.path, "--workers", "0", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["laion-dask: cluster.n_workers: must be a positive integer or unset, got 0"]
