"""The threshold dashboard: built without a server, then served by Panel and driven by Chromium."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import runpy
import time
from pathlib import Path

import panel as pn
import pytest

from laion_dask.faces import dashboard
from laion_dask.ground.config import ClusterConfig, PipelineConfig
from laion_dask.products import explore
from laion_dask.stages.filters import load_thresholds
from tests.helpers.browser import (
    SET_WIDGET_JS,
    browser_skip_reason,
    chromium_page,
    panel_server,
)
from tests.helpers.runs import make_scored_run

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
KEPT = re.compile(r"Kept: (\d+) of (\d+) rows")


@pytest.fixture(scope="module")
def scored_view(tmp_path_factory):
    run = make_scored_run(tmp_path_factory.mktemp("dash-run"), parts=3, rows=40)
    return explore.open_run(run.path)


@pytest.fixture(scope="module")
def demo_view(tmp_path_factory, client):
    """A small demo run (with ground truth) built on the LocalCluster."""
    from laion_dask.faces.demo.run import run_demo
    from laion_dask.products.synthetic.corpus import CorpusSpec

    out = tmp_path_factory.mktemp("dash-demo") / "run"
    run_demo(out, spec=CorpusSpec(n_pages=30, seed=7), client=client, dashboard=False)
    return explore.open_run(str(out), client=client)


def _kept_text(markdown: str) -> tuple[int, int]:
    m = KEPT.search(markdown)
    assert m, markdown
    return int(m.group(1)), int(m.group(2))


def test_build_dashboard_renders_and_funnel_follows_sliders(scored_view):
    layout = dashboard.build_dashboard(scored_view)
    assert isinstance(layout, pn.viewable.Viewable)
    layout.get_root()  # the whole Bokeh model tree builds
    board = layout.dashboard
    assert board.config() == scored_view.thresholds
    base = scored_view.kept_at(scored_view.thresholds)
    assert _kept_text(board.funnel_markdown()) == (base.total_kept, len(scored_view))

    board.similarity["en"].value = 0.2
    board.max_punsafe.value = 0.5
    cfg = dataclasses.replace(scored_view.thresholds, similarity_en=0.2, max_punsafe=0.5)
    assert board.config() == cfg
    assert _kept_text(board.funnel_markdown())[0] == scored_view.kept_at(cfg).total_kept
    assert board.funnel().dropped == scored_view.kept_at(cfg).dropped
    # 1.0 on a probability slider means "tag only"
    board.max_punsafe.value = 1.0
    assert board.config().max_punsafe is None
    # no ground truth in this run: no precision/recall tab
    tabs = [obj for obj in layout.objects if isinstance(obj, pn.Tabs)]
    assert tabs and "Precision / recall" not in tabs[0]._names


def test_live_plots_follow_the_widgets(scored_view):
    """Bars and threshold lines are Bokeh models updated in place: their values are the funnel's."""
    board = dashboard.ThresholdDashboard(scored_view)
    board.layout.get_root()
    board.similarity["multi"].value = 0.25
    board.max_punsafe.value = 0.6
    board.min_text_chars.value = 12
    funnel = scored_view.kept_at(board.config())
    kept = dict(zip(board.kept_source.data["label"], board.kept_source.data["count"], strict=True))
    assert kept == funnel.kept
    dropped = board.dropped_source.data
    assert list(dropped["label"]) == list(scored_view.reasons)  # fixed bars: only counts move
    got = {r: n for r, n in zip(dropped["label"], dropped["count"], strict=True) if n}
    assert got == funnel.dropped
    assert board.spans[("similarity", "multi")].location == pytest.approx(0.25)
    assert board.spans[("punsafe", "all")].location == pytest.approx(0.6)
    assert board.spans[("punsafe", "all")].visible
    assert board.spans[("text_length", "all")].location == 12
    board.max_punsafe.value = 1.0  # tag only: no line
    assert not board.spans[("punsafe", "all")].visible


def _rendered_html(layout) -> str:
    """The text of every HTML pane as its Bokeh model holds it now."""
    texts = []
    for pane in layout.select(pn.pane.HTML):
        for model, _ in pane._models.values():
            texts.append(str(model.text))
    return "\n".join(texts)


def test_keep_top_moves_every_group_slider(scored_view):
    board = dashboard.ThresholdDashboard(scored_view)
    board.layout.get_root()
    board.keep_top.value = 30.0
    t_en = scored_view.threshold_for_fraction("en", 0.3)
    assert f"en · kept: similarity ≥ {t_en:.3f}" in _rendered_html(board.layout)
    for g in scored_view.groups:
        t = scored_view.threshold_for_fraction(g, 0.3)
        assert board.similarity[g].value == t
        assert scored_view.fraction_kept(g, t) == pytest.approx(0.3, abs=0.1)
    assert "keep top 30 %" in board.status.object
    expected = scored_view.kept_at(scored_view.with_similarity(**board.set_keep_top(30)))
    assert board.funnel().kept == expected.kept


def test_samples_grid_shows_both_sides(scored_view):
    board = dashboard.ThresholdDashboard(scored_view)
    assert board.sample_group.value == "en"  # a new board shows en's similarity cut-off
    grid = board.samples_pane.object
    assert "kept: similarity ≥" in grid and "dropped: below" in grid
    assert grid.count("data:image/png;base64") > 0


@pytest.mark.parametrize("cutoff", ["punsafe", "pwatermark"])
def test_samples_follow_the_punsafe_and_pwatermark_cutoffs(scored_view, cutoff):
    board = dashboard.ThresholdDashboard(scored_view)
    board.layout.get_root()
    slider = board.max_punsafe if cutoff == "punsafe" else board.max_pwatermark
    board.sample_cutoff.value = cutoff
    slider.value = 0.4  # a drag, not a release: no value_throttled
    shown = _rendered_html(board.layout)
    assert f"all · kept: {cutoff} ≤ 0.40" in shown and "dropped: above" in shown
    # the scores printed under the thumbnails are the cut-off's column, on the right side
    kept = scored_view.samples_near(0.4, "all", "below", dashboard.N_SAMPLES, column=cutoff)
    assert f"{cutoff} {float(kept[cutoff].iloc[0]):.3f}" in shown
    assert (kept[cutoff].to_numpy("float64") <= 0.4).all()
    slider.value = 1.0
    assert "(filter off: tag only)" in _rendered_html(board.layout)


def test_write_button_writes_thresholds_toml(tmp_path):
    view = explore.open_run(make_scored_run(tmp_path / "run", parts=2, rows=20).path)
    board = dashboard.ThresholdDashboard(view)
    board.similarity["multi"].value = 0.31
    board.min_side.value = 64
    board._on_write()
    path = Path(view.run.join("thresholds.toml"))
    assert str(path) in board.status.object
    saved = load_thresholds(path)
    assert saved == board.config()
    assert saved.similarity_multi == pytest.approx(0.31) and saved.min_side == 64
    # the next session starts where this one saved, every widget included
    again = dashboard.ThresholdDashboard(view)
    assert again.config() == saved and again.base_source == str(path)
    assert again.similarity["multi"].value == pytest.approx(0.31) and again.min_side.value == 64


def test_a_session_starts_at_the_thresholds_last_saved_or_applied(tmp_path):
    """Newest of RUN/thresholds.toml and RUN/dataset/thresholds.toml, else config's [filters]."""
    view = explore.open_run(make_scored_run(tmp_path / "run", parts=2, rows=20).path)
    assert dashboard.start_thresholds(view) == (
        view.thresholds,
        f"{view.run.config_path} [filters]",
    )
    saved = view.with_similarity(en=0.33)
    saved_path = view.save_thresholds(saved)
    assert dashboard.start_thresholds(view) == (saved, saved_path)
    # a later `laion-dask materialize --thresholds other.toml` applied something else: it wins
    applied = view.with_similarity(en=0.21, multi=0.2)
    (tmp_path / "run" / "dataset").mkdir()
    applied_path = view.save_thresholds(applied, tmp_path / "run" / "dataset" / "thresholds.toml")
    os.utime(saved_path, (time.time() - 60, time.time() - 60))
    assert dashboard.start_thresholds(view) == (applied, applied_path)
    board = dashboard.ThresholdDashboard(view)
    assert board.config() == applied
    assert board.similarity["en"].value == pytest.approx(0.21)
    # then the user saves again in the dashboard: the newer save wins
    os.utime(saved_path, None)
    os.utime(applied_path, (time.time() - 60, time.time() - 60))
    assert dashboard.start_thresholds(view) == (saved, saved_path)


def test_a_broken_thresholds_file_is_named_not_raised(tmp_path, capsys):
    view = explore.open_run(make_scored_run(tmp_path / "run", parts=2, rows=20).path)
    path = Path(view.run.join("thresholds.toml"))
    path.write_text("[filters]\nsimilarity_typo = 0.3\n")
    # the command refuses before serving, in one line naming the file's problem
    assert dashboard.main([view.run.path, "--no-show"]) == 2
    err = capsys.readouterr().err.strip()
    assert "similarity_typo" in err and len(err.splitlines()) == 1
    # a session (the file broke after the server started) falls back and says so
    board = dashboard.ThresholdDashboard(view)
    assert board.config() == view.thresholds
    assert "ignored a thresholds file" in board.status.object


def test_materialize_button_uses_client_and_matches_kept_at(tmp_path, client):
    run = make_scored_run(tmp_path / "run", parts=2, rows=30)
    view = explore.open_run(run.path)
    board = dashboard.ThresholdDashboard(view, client=client)
    board.similarity["en"].value = 0.3
    seen = []
    board.progress.param.watch(lambda e: seen.append((e.new, board.progress.max)), "value")
    asyncio.run(board._on_materialize())
    assert board.status.object.startswith("materialized"), board.status.object
    assert not board.materialize_button.disabled and not board.progress.active
    # one step per partition, as each finished, up to all of them
    assert seen == [(1, 2), (2, 2)]
    assert board.progress.visible and board.progress.value == board.progress.max == 2
    assert board.progress_text.object.startswith("2 / 2 partitions")
    # the final funnel, as materialize counted it
    assert board.result.object.startswith("#### Materialized: 60 rows in")
    assert "| en | " + str(funnel_kept(view, board)["en"]) + " |" in board.result.object
    funnel = view.kept_at(board.config())
    written = json.loads((tmp_path / "run" / "dataset" / "funnel.json").read_text())
    assert written["kept"] == funnel.kept and written["dropped"] == funnel.dropped
    assert f"{funnel.rows_in} rows in" in board.status.object
    assert load_thresholds(tmp_path / "run" / "thresholds.toml") == board.config()


def funnel_kept(view, board) -> dict[str, int]:
    return view.kept_at(board.config()).kept


def test_materialize_failure_is_shown_not_raised(tmp_path, scored_view, client):
    board = dashboard.ThresholdDashboard(scored_view, client=client)
    board.run_materialize = _boom  # a failing materialize must reach the status text
    asyncio.run(board._on_materialize())
    assert "materialize failed" in board.status.object and "disk full" in board.status.object
    assert not board.materialize_button.disabled


def _boom(progress=None):
    raise OSError("disk full")


def test_materialize_honours_the_run_cluster_config(tmp_path, client):
    """No client given: the run's ``[cluster]`` scheduler address is where materialize runs."""
    run = make_scored_run(tmp_path / "run", parts=2, rows=20)
    address = client.scheduler.address
    run.write_config(PipelineConfig(cluster=ClusterConfig(scheduler_address=address)))
    board = dashboard.ThresholdDashboard(explore.open_run(run.path))
    assert board.cluster_config().scheduler_address == address
    asyncio.run(board._on_materialize())
    assert board.status.object.startswith("materialized"), board.status.object
    own = board._client
    assert own is not client and own.scheduler.address == address
    assert board.progress.value == 2
    board.close()
    assert board._client is None and own.status == "closed"
    # the scheduler it connected to keeps running (a remote one is not ours to close)
    assert client.submit(sum, [1, 2]).result() == 3
    # a cluster given explicitly wins over the run's
    other = ClusterConfig(scheduler_address="tcp://127.0.0.1:1")
    assert dashboard.ThresholdDashboard(board.view, cluster=other).cluster_config() == other


def test_materialize_starts_and_closes_a_local_cluster_from_config(tmp_path):
    """No scheduler address: make_client starts a local (process) cluster; close() ends it."""
    run = make_scored_run(tmp_path / "run", parts=2, rows=20)
    local = ClusterConfig(
        n_workers=1, threads_per_worker=1, processes=True, gpu="never", dashboard_address=None
    )
    board = dashboard.ThresholdDashboard(explore.open_run(run.path), cluster=local)
    asyncio.run(board._on_materialize())
    assert board.status.object.startswith("materialized"), board.status.object
    cluster = board._client.cluster
    assert cluster is not None and len(cluster.workers) == 1
    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")  # loopback only
    board.close()
    assert board._client is None and cluster.status.name == "closed"


def test_main_reports_a_run_without_scores(tmp_path, capsys):
    assert dashboard.main([str(tmp_path), "--no-show"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path}: no finished scores" in err and len(err.splitlines()) == 1


def test_main_takes_the_common_cluster_and_logging_flags(scored_view, capsys, monkeypatch):
    """``--scheduler`` / ``--workers`` / ``--threads`` reach materialize; bad ones exit 2 first."""
    parser_args = dashboard._parser().parse_args(
        [scored_view.run.path, "--scheduler", "tcp://10.0.0.1:8786", "--workers", "3", "-q"]
    )
    cluster = dashboard._cluster_flags(scored_view, parser_args)
    assert cluster.scheduler_address == "tcp://10.0.0.1:8786" and cluster.n_workers == 3
    assert parser_args.quiet and parser_args.verbose == 0
    assert dashboard._parser().parse_args([scored_view.run.path, "-vv"]).verbose == 2
    # no flag and no environment: each session reads the run's own [cluster]
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    plain = dashboard._parser().parse_args([scored_view.run.path])
    assert dashboard._cluster_flags(scored_view, plain) is None
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.2:8786")
    assert dashboard._cluster_flags(scored_view, plain).scheduler_address == "tcp://10.0.0.2:8786"
    # a malformed address is a one-line error before anything is served
    assert dashboard.main([scored_view.run.path, "--scheduler", "10.0.0.1", "--no-show"]) == 2
    err = capsys.readouterr().err.strip()
    assert "scheduler_address" in err and len(err.splitlines()) == 1


def test_panel_serve_script_reads_args_or_env(scored_view, monkeypatch):
    script = str(REPO / "dashboards" / "thresholds.py")
    monkeypatch.setattr("sys.argv", [script, scored_view.run.path])
    runpy.run_path(script, run_name="__main__")
    monkeypatch.setattr("sys.argv", [script])
    monkeypatch.delenv("LAION_DASK_RUN", raising=False)
    with pytest.raises(SystemExit, match="LAION_DASK_RUN"):
        runpy.run_path(script, run_name="__main__")


def test_demo_run_has_precision_recall(demo_view):
    board = dashboard.ThresholdDashboard(demo_view)
    tabs = [obj for obj in board.layout.objects if isinstance(obj, pn.Tabs)]
    assert "Precision / recall" in tabs[0]._names
    table = board._precision_recall()
    pr = demo_view.precision_recall(board.config())
    assert table.loc["all", "precision"] == pytest.approx(pr["precision"], abs=1e-3)
    assert table.loc["all", "recall"] == pytest.approx(pr["recall"], abs=1e-3)


def _wait_kept(page, expected: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        text = page.get_by_text(KEPT).first.inner_text()
        kept = _kept_text(text)[0]
        if kept == expected or time.monotonic() > deadline:
            return kept
        time.sleep(0.2)


@pytest.mark.slow
def test_served_dashboard_in_chromium(demo_view, client):
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)
    view = demo_view
    boards = []
    # materialize goes where a run's [cluster] points: here the test's loopback scheduler
    cluster = ClusterConfig(scheduler_address=client.scheduler.address)
    n_parts = len(view.run.parts("scores"))

    def app():
        layout = dashboard.build_dashboard(view, cluster=cluster)
        boards.append(layout.dashboard)
        return layout

    toml = Path(view.run.join("thresholds.toml"))
    toml.unlink(missing_ok=True)
    try:
        with panel_server(app) as url, chromium_page() as (page, errors):
            page.goto(url)
            page.get_by_text(KEPT).first.wait_for(timeout=60_000)
            board = boards[-1]
            start = view.kept_at(view.thresholds)
            shown = _kept_text(page.get_by_text(KEPT).first.inner_text())
            assert shown == (start.total_kept, len(view))
            assert page.get_by_text("dropped: reason").count() == 1

            # the en slider's Bokeh model set as a drag sets it: keep the top half of en
            en = view.threshold_for_fraction("en", 0.5)
            assert page.evaluate(SET_WIDGET_JS, {"title": "similarity en", "value": en})
            expected = view.kept_at(view.with_similarity(en=en)).total_kept
            assert expected != start.total_kept
            assert _wait_kept(page, expected) == expected

            # the multi slider by keyboard: focus its handle, 20 steps of 0.001 to the right
            multi = board.similarity["multi"].value
            page.locator(".noUi-handle").nth(1).focus()
            for _ in range(20):
                page.keyboard.press("ArrowRight")
            deadline = time.monotonic() + 30
            target = multi + 0.02
            while (
                abs(board.similarity["multi"].value - target) > 1e-6 and time.monotonic() < deadline
            ):
                time.sleep(0.2)
            assert board.similarity["multi"].value == pytest.approx(target, abs=1e-6)
            cfg = view.with_similarity(en=en, multi=board.similarity["multi"].value)
            expected = view.kept_at(cfg).total_kept
            assert _wait_kept(page, expected) == expected

            # "keep top 30 %" moves every group's slider
            box = page.get_by_label(re.compile("keep top X %"))
            box.fill("30")
            box.press("Enter")
            top = {g: view.threshold_for_fraction(g, 0.3) for g in view.groups}
            expected = view.kept_at(view.with_similarity(**top)).total_kept
            assert _wait_kept(page, expected) == expected
            assert {g: s.value for g, s in board.similarity.items()} == top
            page.get_by_text(f"en · kept: similarity ≥ {top['en']:.3f}").wait_for(timeout=30_000)

            # samples at the punsafe cut-off follow its slider while it is dragged (no release)
            page.get_by_role("button", name="punsafe", exact=True).click()
            page.get_by_text("all · kept: punsafe ≤").first.wait_for(timeout=30_000)
            drag = {"title": "max punsafe (1 = tag only)", "value": 0.4, "release": False}
            assert page.evaluate(SET_WIDGET_JS, drag)
            page.get_by_text("all · kept: punsafe ≤ 0.40").wait_for(timeout=30_000)
            assert board.max_punsafe.value == pytest.approx(0.4)
            assert board.max_punsafe.value_throttled != pytest.approx(0.4)  # still "dragging"
            # a fast drag: ten positions at once; the grid is throttled, the last one shows
            before = len(board.samples_seconds)
            values = [round(0.30 + 0.01 * i, 2) for i in range(10)]
            drag_js = f"(arg) => arg.values.map(v => ({SET_WIDGET_JS})({{...arg, value: v}}))"
            assert all(page.evaluate(drag_js, {**drag, "values": values}))
            page.get_by_text("all · kept: punsafe ≤ 0.39").wait_for(timeout=30_000)
            assert board.max_punsafe.value == pytest.approx(0.39)
            assert 1 <= len(board.samples_seconds) - before < len(values)
            drag["value"] = 1.0  # back to tag only, released
            drag["release"] = True
            assert page.evaluate(SET_WIDGET_JS, drag)
            page.get_by_text("(filter off: tag only)").wait_for(timeout=30_000)

            page.get_by_role("button", name="write thresholds.toml").click()
            deadline = time.monotonic() + 30
            while not toml.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert toml.exists(), "the write button did not write RUN/thresholds.toml"
            saved = load_thresholds(toml)
            assert saved == board.config()
            assert saved.similarity_en == pytest.approx(top["en"])
            page.get_by_text("wrote").first.wait_for(timeout=30_000)

            # materialize: a progress bar that moves one step per finished partition
            steps = []
            board.progress.param.watch(lambda e: steps.append(e.new), "value")
            page.get_by_role("button", name="materialize").click()
            page.get_by_text(re.compile("materialized .* rows in")).wait_for(timeout=120_000)
            written = json.loads(Path(view.run.join("dataset", "funnel.json")).read_text())
            assert written["kept"] == view.kept_at(saved).kept
            assert steps[-n_parts:] == list(range(1, n_parts + 1))
            bar = page.locator("progress").first
            assert bar.get_attribute("max") == str(n_parts)
            assert bar.get_attribute("value") == str(n_parts)
            page.get_by_text(f"{n_parts} / {n_parts} partitions").wait_for(timeout=30_000)
            # the final funnel as materialize counted it
            page.get_by_text(f"Materialized: {written['rows_in']} rows in").wait_for(timeout=30_000)
            assert (
                board._client is not None
                and board._client.scheduler.address == cluster.scheduler_address
            )

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert errors == [], errors
    finally:
        for board in boards:
            board.close()
    assert all(b._client is None for b in boards)  # the clients the dashboard made are closed
    assert client.submit(sum, [1, 2]).result() == 3  # and the scheduler they used still runs
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
