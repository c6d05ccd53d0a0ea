"""A user's mistakes, typed as a user types them: one line on stderr naming the problem and the
fix, exit code 2, no traceback, and no run directory or config.toml created or rewritten.

Most cases go through the installed console script in a subprocess; the rest call ``main`` with
capsys. Where a check must come before any cluster starts, the command is pointed at a scheduler
address nobody listens on: reaching it would be a different (connection) error.
"""

from __future__ import annotations

import gzip
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from laion_dask.faces.cli import build_parser, main
from laion_dask.ground.config import PipelineConfig
from laion_dask.orchestration.rundir import RunDir
from tests.helpers.runs import make_scored_run

EXE = Path(sys.executable).with_name("laion-dask")
LOCAL = ["--workers", "1", "--threads", "1", "--no-dashboard"]
#: a scheduler nobody listens on: a command that got as far as a cluster would fail on it
NOWHERE = ["--scheduler", "tcp://127.0.0.1:9"]
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300):
    """``laion-dask ARGS`` as a user runs it, output piped (not a terminal)."""
    full_env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s", **(env or {})}
    return subprocess.run(
        [str(EXE), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line(stderr: str, *needles: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("laion-dask"), stderr
    for needle in needles:
        assert needle in lines[0], stderr
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: what a refused command must leave as it was."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def run_with(path: Path, *stages: str) -> RunDir:
    """A run directory whose ``stages`` have one finished partition each (markers only)."""
    run = RunDir(str(path))
    run.write_config(PipelineConfig())
    for stage in stages:
        run.makedirs(stage)
        run.mark_done(stage, 0, {"fingerprint": "x", "rows": 1})
    return run


@pytest.mark.parametrize("command", ["download", "score", "index", "materialize", "report"])
def test_a_run_that_does_not_exist_is_refused_and_not_created(tmp_path, command):
    done = cli(command, "no-such-run", *LOCAL, cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line(done.stderr, "no-such-run does not exist", "laion-dask extract")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    assert main(["score", str(tmp_path / "photos"), *LOCAL]) == 2
    assert_one_line(capsys.readouterr().err, "is not a laion-dask run directory")
    assert list((tmp_path / "photos").iterdir()) == []


@pytest.mark.parametrize(
    ("stages", "command", "first"),
    [
        ((), "download", "laion-dask extract"),
        (("extract", "candidates"), "score", "laion-dask download"),
        (("extract", "candidates"), "materialize", "laion-dask score"),
        (("extract", "candidates", "downloads"), "index", "laion-dask score"),
        (("extract", "candidates", "downloads"), "report", "laion-dask score"),
    ],
)
def test_a_stage_before_its_upstream_says_which_command_to_run(tmp_path, stages, command, first):
    run = run_with(tmp_path / "run", *stages)
    before = snapshot(tmp_path)
    done = cli(command, run.path, *NOWHERE, cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line(done.stderr, f"{first} {run.path}` first" if stages else first)
    assert snapshot(tmp_path) == before


def test_score_checks_a_local_model_path_before_a_cluster(tmp_path):
    run = run_with(tmp_path / "run", "extract", "candidates", "downloads")
    before = snapshot(tmp_path)
    missing = tmp_path / "no-such-model"
    done = cli("score", run.path, "--model", str(missing), *NOWHERE, cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line(done.stderr, str(missing))
    assert snapshot(tmp_path) == before


def test_config_errors_come_before_a_cluster(tmp_path):
    run = run_with(tmp_path / "run", "extract", "candidates")
    bad = tmp_path / "bad.toml"
    bad.write_text("[download]\nmax_bytes = -5\n")
    missing = tmp_path / "no-such-list.txt"
    lists = tmp_path / "lists.toml"
    lists.write_text(f'[consent]\nurl_blocklists = ["{missing}"]\n')
    before = snapshot(tmp_path)
    done = cli("download", run.path, "--config", str(bad), *NOWHERE, cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line(done.stderr, "download.max_bytes")
    done = cli("download", run.path, "--config", str(lists), *NOWHERE, cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line(done.stderr, "consent.url_blocklists", "no-such-list.txt")
    assert snapshot(tmp_path) == before


def test_extract_strict_on_a_file_that_is_not_warc(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not a crawl\n")
    done = cli("extract", "notes.txt", "--out", "run", "--strict", *NOWHERE, cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line(done.stderr, "notes.txt", "not a WARC", "--strict")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"", "is empty"), (b"hello\n", "is not a WARC, WAT or ARC file")],
)
def test_extract_with_nothing_to_read_says_so(tmp_path, capsys, content, why):
    (tmp_path / "in.warc").write_bytes(content)
    out = tmp_path / "run"
    assert main(["extract", str(tmp_path / "in.warc"), "--out", str(out), *NOWHERE]) == 2
    assert_one_line(capsys.readouterr().err, "nothing to extract", f"in.warc {why}")
    assert not out.exists()


def test_an_empty_path_listing_is_one_line(tmp_path, capsys):
    listing = tmp_path / "crawl.paths.gz"
    listing.write_bytes(gzip.compress(b""))
    out = tmp_path / "run"
    assert main(["extract", str(listing), "--out", str(out), *NOWHERE]) == 2
    assert_one_line(capsys.readouterr().err, "input.paths: path listing", "is empty")
    assert not out.exists()


@pytest.fixture
def gone_url():
    """A URL on a loopback server that answers 404: an input only a worker finds unreadable."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_error(404)

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/gone.warc.gz"
    server.shutdown()


def test_extract_exits_1_when_every_input_failed(tmp_path, gone_url):
    """The run is made and reported, and the exit code says it did not work."""
    done = cli("extract", gone_url, "--out", "run", *LOCAL, cwd=tmp_path)
    assert done.returncode == 1
    assert "FAILED" in done.stdout
    assert_one_line(done.stderr, "every input file failed (1 of 1)")


def test_run_exits_1_when_every_input_failed(tmp_path, gone_url):
    config = tmp_path / "c.toml"
    config.write_text(f'[input]\npaths = ["{gone_url}"]\n')
    done = cli("run", str(config), "--out", "run", "--stages", "extract", *LOCAL, cwd=tmp_path)
    assert done.returncode == 1
    assert_one_line(done.stderr, "every partition failed (1 of 1)")


def test_thresholds_that_cannot_be_meant_are_refused(tmp_path):
    run = make_scored_run(tmp_path / "run")
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing yet\n")
    stray = tmp_path / "stray.toml"
    stray.write_text("similarity_en = 0.3\n[filters]\nmax_punsafe = 0.5\n")
    before = snapshot(tmp_path)
    done = cli("materialize", run.path, "--thresholds", str(empty), *NOWHERE, cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line(done.stderr, "sets no threshold", "[filters]")
    done = cli("materialize", run.path, "--thresholds", str(stray), *NOWHERE, cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line(done.stderr, "similarity_en outside the [filters] table")
    done = cli("materialize", run.path, "--thresholds", "nope.toml", *NOWHERE, cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line(done.stderr, "thresholds file not found: nope.toml", "dashboard")
    assert snapshot(tmp_path) == before


def test_a_negative_similarity_threshold_is_warned_about_in_one_line(tmp_path):
    run = make_scored_run(tmp_path / "run")
    path = tmp_path / "t.toml"
    path.write_text("[filters]\nsimilarity_en = -0.3\n")
    done = cli("materialize", run.path, "--thresholds", str(path), "-q", *LOCAL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    line = assert_one_line(done.stderr, "warning", "filters.similarity_en = -0.3")
    assert "did you mean 0.3" in line


def test_a_usage_error_is_one_line(tmp_path):
    done = cli("extract", "x.warc.gz", cwd=tmp_path)  # no --out
    assert done.returncode == 2
    assert_one_line(done.stderr, "--out", "laion-dask extract --help")
    done = cli("search", "run", "--workers", "2", cwd=tmp_path)  # search starts no cluster
    assert done.returncode == 2
    assert_one_line(done.stderr, "--workers")


def test_verbose_adds_the_traceback(tmp_path):
    done = cli("download", "no-such-run", "-v", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("laion-dask: no-such-run does not exist")
    assert list(tmp_path.iterdir()) == []


def test_common_flags_work_on_every_command_that_runs_work():
    parser = build_parser()
    commands = {
        "extract": ["in.warc.gz", "--out", "r"],
        "download": ["r"],
        "score": ["r"],
        "materialize": ["r"],
        "run": ["c.toml", "--out", "r"],
        "index": ["r"],
        "report": ["r"],
    }
    common = ["--scheduler", "tcp://h:8786", "--workers", "2", "--threads", "3", "--no-dashboard"]
    for command, positional in commands.items():
        args = parser.parse_args(["-v", command, *positional, *common, "-q", "-v"])
        assert (args.verbose + args.verbose_command, args.quiet) == (2, True), command
        assert (args.scheduler, args.workers, args.threads, args.no_dashboard) == (
            "tcp://h:8786",
            2,
            3,
            True,
        ), command
        args = parser.parse_args(["-q", command, *positional])
        assert args.quiet and not hasattr(args, "verbose_command"), command
        if command != "run":  # run's CONFIG is its positional argument
            assert parser.parse_args([command, *positional, "--config", "c.toml"]).config


def test_report_is_a_subcommand_with_the_common_flags(tmp_path, capsys):
    run = make_scored_run(tmp_path / "run")
    assert main(["report", run.path, "--format", "md", "-q", *LOCAL]) == 0
    assert capsys.readouterr().out.strip() == run.join("report", "report.md")
    assert Path(run.join("report", "stats.json")).is_file()


def test_progress_off_a_terminal_is_whole_lines(corpus, tmp_path):
    """stdout piped (as in CI or `> log`): one line per stage start and end, no \\r frames."""
    src = corpus / "chatnoir-eu-chatnoir-resiliparse/warcfile.warc.gz"
    (tmp_path / "empty.warc").write_bytes(b"")
    done = cli("extract", str(src), "empty.warc", "--out", "run", *LOCAL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # an empty input is named, once; the run goes on with the others
    assert_one_line(done.stderr, "warning: empty.warc is empty: it adds no pairs")
    assert "\r" not in done.stdout and "\r" not in done.stderr
    # distributed's bar, off a terminal, writes a new line per 0.1 s frame: ~70 for this file
    assert "% Completed" not in done.stdout and len(done.stdout.splitlines()) < 30, done.stdout
    progress = [line for line in done.stdout.splitlines() if line.startswith("extract: ")]
    assert progress[0] == "extract: started, 2 partitions"
    assert progress[-1].startswith("extract: finished 2/2 partitions in ")
    # heartbeats in between, if any, are whole lines too
    assert all(re.match(r"extract: [012]/2 partitions, \d+ s$", line) for line in progress[1:-1])
    quiet = cli("extract", str(src), "--out", "run", "-q", *LOCAL, cwd=tmp_path)
    assert quiet.returncode == 0 and "extract: started" not in quiet.stdout


def test_train_tag_head_mistakes_are_one_line(tmp_path, capsys):
    import pandas as pd

    head = tmp_path / "head.safetensors"
    assert (
        main(["train-tag-head", str(tmp_path / "nope.parquet"), "--label", "y", "--out", str(head)])
        == 2
    )
    assert_one_line(capsys.readouterr().err, "file not found", "nope.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "l.parquet")
    assert (
        main(["train-tag-head", str(tmp_path / "l.parquet"), "--label", "y", "--out", str(head)])
        == 2
    )
    assert_one_line(capsys.readouterr().err, "no label column 'y'")
    assert not head.exists()
