"""``laion-dask evaluate``: candidate filters selected from stored scores, trained at equal compute
on a real (tiny) budget, measured on a held-out set that never overlaps their training rows.

Runs are built by hand (``make_scored_run``: real shards, real scores parts); trainings are real
``train_clip`` calls on a real ``distributed`` cluster, with a budget of a few steps: these tests
hold the plumbing and the statistics, not the model's quality (the benchmark on the demo does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from laion_dask.faces.cli import main
from laion_dask.ground import schema
from laion_dask.ground.config import DownloadConfig, FilterConfig
from laion_dask.ground.shards import iter_shard
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products import evaluate as ev
from laion_dask.products.explore import open_run
from laion_dask.products.synthetic.draw import Scene, caption, draw_scene, encode_image
from laion_dask.stages.filters import dump_thresholds
from laion_dask.stages.imaging import process_image
from tests.helpers.browser import (
    browser_skip_reason,
    chromium_page,
    drawn_colours,
    free_port,
    served,
)
from tests.helpers.demo import FAKE_BASE_URLS
from tests.helpers.runs import make_scored_run

EXE = Path(sys.executable).with_name("laion-dask")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LOCAL = ["--workers", "1", "--threads", "1", "--no-dashboard", "-q"]
#: a budget that exercises every step in seconds: the numbers mean nothing at this size
TINY = ev.EvaluateConfig(steps=2, batch_size=8, seeds=2, bootstrap=200, recall_k=(1, 5))
SCENES = (
    Scene("red", "circle", "striped", "blue"),
    Scene("blue", "square", "plain", "yellow"),
    Scene("green", "star", "beach", None),
)


# --- fixtures ---------------------------------------------------------------------------------
def tmp_run(run: RunDir, tmp_path: Path) -> RunDir:
    """A copy of ``run`` that a test may write into."""
    shutil.copytree(run.path, tmp_path / "run")
    return RunDir(str(tmp_path / "run"))


def write_heldout(root: Path, per_class: int = 4, seed: int = 7) -> Path:
    """A labelled folder: one class folder per scene, drawn pictures, captions for most."""
    rng = random.Random(seed)
    for scene in SCENES:
        folder = root / f"{scene.colour}_{scene.shape}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = draw_scene(scene, (rng.randint(96, 160), rng.randint(96, 160)), rng)
            (folder / f"{i}.jpg").write_bytes(encode_image(img, "JPEG"))
            if i:  # the first picture of a class has no caption: zero-shot only
                (folder / f"{i}.txt").write_text(caption(scene))
    return root


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A scored run, two thresholds files and a held-out folder."""
    root = tmp_path_factory.mktemp("evaluate")
    run = make_scored_run(root / "run", parts=2, rows=60)
    strict = root / "strict.toml"
    dump_thresholds(FilterConfig(similarity_en=0.3, similarity_multi=0.3, max_punsafe=0.7), strict)
    loose = root / "loose.toml"
    loose.write_text("[filters]\nsimilarity_en = 0.2\nmin_side = 100\n")
    return run, [strict, loose], write_heldout(root / "heldout")


@pytest.fixture(scope="module")
def evaluated(scored, client):
    """The scored run evaluated once with the tiny budget (shared by the read-only tests)."""
    run, tomls, heldout = scored
    results = ev.evaluate(run, tomls, [0.5], heldout=heldout, cfg=TINY, client=client)
    return run, results


# --- selection --------------------------------------------------------------------------------
def test_each_candidate_selects_what_kept_at_counts(scored):
    run, tomls, heldout = scored
    plan = ev.plan_evaluation(run, tomls, [0.3], heldout=heldout, cfg=TINY)
    view = open_run(run.path)
    names = [c.name for c in plan.candidates]
    assert names == [ev.BASELINE, "strict", "loose", "top-30pct"]
    for cand in plan.candidates:
        funnel = view.kept_at(cand.thresholds)
        kept = view.rows.iloc[cand.positions][schema.LANGUAGE_GROUP].astype("string")
        assert cand.rows == funnel.total_kept, cand.name
        assert kept.value_counts().to_dict() == {g: n for g, n in funnel.kept.items() if n}
        # and the rows themselves: the ones the engine names no reason for
        assert np.array_equal(
            cand.positions, np.flatnonzero(view.reasons_at(cand.thresholds).isna())
        )
        assert len(cand.keys) == len(cand.texts) == cand.rows
    # a thresholds file is read as materialize reads it (FilterConfig's defaults under it)
    loose = plan.candidates[2].thresholds
    assert loose == FilterConfig(similarity_en=0.2, min_side=100)
    # the baseline is the run's filters with no similarity cut: its rows include every other's
    base = set(plan.candidates[0].positions.tolist())
    assert base >= set(plan.candidates[3].positions.tolist())
    assert plan.candidates[0].thresholds.similarity_en == -1.0


def test_top_fraction_keeps_the_highest_similarity_rows_the_other_rules_keep(scored):
    run, _, heldout = scored
    plan = ev.plan_evaluation(run, [], [0.3, 1.0], heldout=heldout, cfg=TINY)
    view = open_run(run.path)
    base, top30, top100 = plan.candidates
    sim = view.rows[schema.SIMILARITY].to_numpy("float32")
    pool = base.positions
    assert top30.rows == round(0.3 * len(pool))  # random similarities: no ties at the cut
    assert set(top30.positions) <= set(pool)
    rest = np.setdiff1d(pool, top30.positions)
    assert sim[top30.positions].min() >= sim[rest].max()
    assert top30.thresholds.similarity_en == float(sim[top30.positions].min())
    assert np.array_equal(top100.positions, pool)
    # the thresholds that keep them are a plain [filters] table materialize can take
    assert top30.thresholds.similarity_multi == top30.thresholds.similarity_nolang


def test_a_candidate_without_rows_is_refused_before_any_training(scored, tmp_path):
    run, _, heldout = scored
    none = tmp_path / "none.toml"
    none.write_text(
        "[filters]\nsimilarity_en = 1.0\nsimilarity_multi = 1.0\nsimilarity_nolang = 1.0\n"
    )
    with pytest.raises(ev.EvaluateError, match=r"candidate none .* keeps 0 of \d+ rows"):
        ev.plan_evaluation(run, [none], heldout=heldout, cfg=TINY)
    with pytest.raises(ev.EvaluateError, match="fraction must be in"):
        ev.plan_evaluation(run, [], [1.5], heldout=heldout, cfg=TINY)
    assert not Path(run.join("evaluate")).exists()


# --- the held-out set -------------------------------------------------------------------------
def _stored_images(run: RunDir, cand: ev.Candidate) -> list[bytes]:
    from laion_dask.ground.shards import read_images

    return [b for b in read_images(run.join("images"), cand.keys, cand.shards) if b is not None]


def test_the_heldout_set_never_overlaps_any_candidates_training_rows(scored):
    run, tomls, heldout = scored
    plan = ev.plan_evaluation(run, tomls, [0.5], heldout=heldout, cfg=TINY)
    held = np.stack([ev.thumbnail_vector(b) for b in plan.heldout.images])
    for cand in plan.candidates:
        train = np.stack([ev.thumbnail_vector(b) for b in _stored_images(run, cand)])
        assert ev.nearest_rms(held, train).min() > ev.SAME_PICTURE_RMS, cand.name
    assert plan.overlap["overlap"] == 0
    assert plan.overlap["heldout_images_checked"] == len(SCENES) * 4


def test_a_training_image_in_the_heldout_folder_is_refused(scored, tmp_path):
    run, _, heldout = scored
    plan = ev.plan_evaluation(run, [], [0.5], heldout=heldout, cfg=TINY)
    # a picture the top half trains on, re-encoded and resized as a user's copy would be
    stolen = _stored_images(run, plan.candidates[1])[3]
    leak = tmp_path / "leak"
    write_heldout(leak)
    with Image.open(io.BytesIO(stolen)) as im:
        copy = im.convert("RGB").resize((im.width * 2, im.height * 2))
    buf = io.BytesIO()
    copy.save(buf, format="PNG")
    (leak / "red_circle" / "copied.png").write_bytes(buf.getvalue())
    with pytest.raises(ev.EvaluateError, match=r"overlaps the training rows: 1 image.*copied\.png"):
        ev.plan_evaluation(run, [], [0.5], heldout=leak, cfg=TINY)


def test_a_heldout_file_that_is_a_crawled_original_is_refused(tmp_path):
    # the same bytes the download fetched (its sha256 is in the scores parts), whatever the
    # resize made of them in the shards
    run = make_scored_run(tmp_path / "run", parts=1, rows=30)
    heldout = write_heldout(tmp_path / "heldout")
    original = (heldout / "blue_square" / "2.jpg").read_bytes()
    path = run.part_path("scores", 0)
    df = run.read_parquet(path)
    row = int(np.flatnonzero(df[schema.SCORE_STATUS].eq("success").fillna(False))[0])
    df.loc[row, schema.SHA256] = hashlib.sha256(original).hexdigest()
    run.write_parquet_atomic(path, df)
    with pytest.raises(ev.EvaluateError, match=r"blue_square/2\.jpg is row"):
        ev.plan_evaluation(run, [], heldout=heldout, cfg=TINY)


def test_the_demo_heldout_draw_is_new_pictures_of_the_demo_vocabulary(tmp_path):
    from laion_dask.products.synthetic.corpus import CorpusSpec, generate_corpus

    info = generate_corpus(tmp_path, CorpusSpec(n_pages=30, seed=3), base_urls=FAKE_BASE_URLS)
    held = ev.demo_heldout(60, seed=0)
    again = ev.demo_heldout(60, seed=0)
    assert held.images == again.images and held.labels == again.labels  # same seed, same set
    assert len(held.classes) > 20 and all(c in held.prompts() for c in held.labels)
    # the corpus's pictures as the run would store them (resized by the download stage)
    files = [p.read_bytes() for p in sorted(info.images_dir.rglob("*")) if p.is_file()]
    stored = [process_image(b, DownloadConfig()).image for b in files]
    vectors = [ev.thumbnail_vector(b) for b in stored if b is not None]
    assert len(vectors) > 30
    queries = np.stack([ev.thumbnail_vector(b) for b in held.images])
    assert ev.nearest_rms(queries, np.stack(vectors)).min() > ev.SAME_PICTURE_RMS


def test_a_heldout_folder_needs_two_classes(tmp_path):
    one = tmp_path / "one" / "cats"
    one.mkdir(parents=True)
    (one / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(ev.EvaluateError, match="at least 2 class folders.*unreadable|failed"):
        ev.read_heldout(tmp_path / "one")
    with pytest.raises(ev.EvaluateError, match="not found"):
        ev.read_heldout(tmp_path / "missing")


# --- statistics -------------------------------------------------------------------------------
def test_intervals_separate_a_better_candidate_and_not_an_equal_one(scored):
    """summarize() over outcomes made up to have a known answer: the bootstrap must find it."""
    run, _, heldout = scored
    cfg = dataclasses.replace(TINY, primary="zero_shot_top1")
    plan = ev.plan_evaluation(run, [], [0.5, 0.3], heldout=heldout, cfg=cfg)
    n = len(plan.heldout.images)
    rng = np.random.default_rng(1)
    base_hits = rng.random((2, n)) < 0.4
    captioned = [c is not None for c in plan.heldout.captions]  # measure() gives -1 elsewhere

    def outcome(name, seed, hits):
        return {
            "name": name,
            "seed": seed,
            "samples": 10,
            "skipped": {},
            "first_loss": 1.0,
            "final_loss": 0.5,
            "train_seconds": 1.0,
            "seconds": 1.0,
            "zero_shot": hits.astype(int).tolist(),
            "i2t_rank": [0 if c else -1 for c in captioned],
            "t2i_rank": [3 if c else -1 for c in captioned],
            "recall_k": [1, 5],
        }

    outcomes = []
    for s, seed in enumerate(TINY.seed_list()):
        outcomes.append(outcome(ev.BASELINE, seed, base_hits[s]))
        outcomes.append(outcome("top-50pct", seed, np.ones(n, bool)))  # always right
        outcomes.append(outcome("top-30pct", seed, base_hits[s]))  # the baseline's twin
    res = ev.summarize(plan, outcomes)
    by = {e["name"]: e["measures"] for e in res["candidates"]}
    better = by["top-50pct"]["zero_shot_top1"]
    assert better["mean"] == 1.0 and better["vs_baseline"]["excludes_zero"]
    assert better["vs_baseline"]["ci_low"] > 0.2
    twin = by["top-30pct"]["zero_shot_top1"]["vs_baseline"]
    assert twin["difference"] == 0 and twin["ci_low"] == twin["ci_high"] == 0  # paired resamples
    base = by[ev.BASELINE]["zero_shot_top1"]
    assert base["ci_low"] < base["mean"] < base["ci_high"]
    assert by[ev.BASELINE]["image_to_text_r@1"]["mean"] == 1.0
    assert by[ev.BASELINE]["text_to_image_r@5"]["mean"] == 1.0
    assert by[ev.BASELINE]["text_to_image_r@1"]["mean"] == 0.0
    # the uncaptioned pictures count for zero-shot only
    assert by[ev.BASELINE]["image_to_text_r@1"]["n"] == n - len(SCENES)
    assert res["winner"]["name"] == "top-50pct"


# --- end to end -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluate_trains_each_candidate_and_writes_results(evaluated):
    run, results = evaluated
    names = [e["name"] for e in results["candidates"]]
    assert names == [ev.BASELINE, "strict", "loose", "top-50pct"]
    frame = pd.read_parquet(run.join("evaluate", "results.parquet"))
    assert len(frame) == len(names) * len(ev.measure_names(TINY.recall_k))
    assert set(frame["candidate"]) == set(names)
    assert (frame["ci_low"] <= frame["mean"]).all() and (frame["mean"] <= frame["ci_high"]).all()
    on_disk = json.loads(Path(run.join("evaluate", "results.json")).read_text())
    assert on_disk["winner"] == results["winner"]
    for e in results["candidates"]:
        assert e["trained_samples"] == [e["rows"]] * TINY.seeds  # every kept row trained on
        assert len(e["measures"]["zero_shot_top1"]["per_seed"]) == TINY.seeds
        # each candidate's thresholds file is what materialize takes, and selects the same rows
        toml = Path(run.join("evaluate", "thresholds", f"{e['name']}.toml"))
        view = open_run(run.path)
        assert view.kept_at(view.load_thresholds(toml)).total_kept == e["rows"]
    held = list(iter_shard(run.join("evaluate", "heldout", "00000.tar")))
    assert len(held) == results["heldout"]["images"] == len(SCENES) * 4
    assert results["heldout"]["overlap_check"]["overlap"] == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluation_is_deterministic_under_a_seed(scored, evaluated, client, tmp_path):
    run, tomls, heldout = scored
    _, first = evaluated
    frame = pd.read_parquet(run.join("evaluate", "results.parquet"))
    second = ev.evaluate(run, tomls, [0.5], heldout=heldout, cfg=TINY, client=client)

    def timeless(results):  # wall-clock seconds live apart, under "timing"
        return {k: v for k, v in results.items() if k != "timing"}

    assert timeless(second) == timeless(first)
    on_disk = json.loads(Path(run.join("evaluate", "results.json")).read_text())
    assert timeless(on_disk) == json.loads(json.dumps(timeless(first), default=str))
    pd.testing.assert_frame_equal(pd.read_parquet(run.join("evaluate", "results.parquet")), frame)
    # and another seed is another evaluation (the comparison above could fail)
    other = dataclasses.replace(TINY, seed=5, seeds=1)
    third = ev.evaluate(tmp_run(run, tmp_path), [], heldout=heldout, cfg=other, client=client)
    assert third["budget"]["seed"] == [5]
    assert third["candidates"][0]["final_loss"][0] != first["candidates"][0]["final_loss"][0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_cli_end_to_end(scored, tmp_path):
    run, tomls, heldout = scored
    copy = Path(tmp_run(run, tmp_path).path)
    done = subprocess.run(
        [
            str(EXE),
            "evaluate",
            str(copy),
            "--thresholds",
            str(tomls[0]),
            "--fraction",
            "0.5",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--seeds",
            "1",
            "--heldout",
            str(heldout),
            *LOCAL,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best by image_to_text_r@5" in done.stdout
    for name in (ev.BASELINE, "strict", "top-50pct"):
        assert name in done.stdout
    results = json.loads((copy / "evaluate" / "results.json").read_text())
    assert results["budget"]["steps"] == 2 and results["budget"]["seed"] == [0]


def test_the_cli_refuses_an_empty_candidate_in_one_line_and_creates_nothing(
    scored, tmp_path, capsys
):
    run, _, heldout = scored
    copy = Path(tmp_run(run, tmp_path).path)
    before = sorted(p for p in copy.rglob("*"))
    none = tmp_path / "nothing.toml"
    none.write_text(
        "[filters]\nsimilarity_en = 1.0\nsimilarity_multi = 1.0\nsimilarity_nolang = 1.0\n"
    )
    for argv, needle in (
        (["--thresholds", str(none), "--heldout", str(heldout)], "candidate nothing"),
        (["--fraction", "0", "--heldout", str(heldout)], "fraction must be in (0, 1]"),
        ([], "is not a demo run: give a labelled held-out set with --heldout DIR"),
        (["--heldout", str(tmp_path / "nope")], "held-out folder not found"),
        (["--steps", "0", "--heldout", str(heldout)], "evaluate.steps must be a positive"),
    ):
        assert main(["evaluate", str(copy), *argv, *LOCAL]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("laion-dask: "), err
        assert needle in err[0], err
    assert sorted(p for p in copy.rglob("*")) == before


# --- the view ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quality_plot_has_one_labelled_point_per_candidate(evaluated):
    import holoviews as hv

    from laion_dask.faces.evaluate_page import quality_plot, results_table

    run, results = evaluated
    _, frame = ev.read_results(run)
    plot = quality_plot(frame, "zero_shot_top1")
    points = [el for el in plot if isinstance(el, hv.Points)][0]
    labels = [el for el in plot if isinstance(el, hv.Labels)][0]
    bars = [el for el in plot if isinstance(el, hv.ErrorBars)][0]
    assert len(points) == len(labels) == len(bars) == len(results["candidates"])
    assert sorted(labels.dframe()["candidate"]) == sorted(e["name"] for e in results["candidates"])
    assert list(points.dframe()["rows"]) == [e["rows"] for e in results["candidates"]]
    table = results_table(frame, "zero_shot_top1")
    assert list(table.index) == [e["name"] for e in results["candidates"]]


_SKIP = browser_skip_reason()


@pytest.mark.slow
@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
@pytest.mark.timeout(900)
@contextlib.contextmanager
def dashboard_evaluate_tab(run: RunDir, shot: str):
    """``laion-dask dashboard RUN`` in Chromium, on its Evaluate tab (a screenshot on failure)."""
    port = free_port()
    cmd = [str(EXE), "dashboard", run.path, "--port", str(port), "--no-show", *LOCAL[:4]]
    with served(cmd, port) as url, chromium_page() as (page, errors):
        page.goto(url)
        try:
            page.locator(".bk-tab", has_text="Evaluate").click(timeout=120_000)
            yield page
        except BaseException:  # what the page showed instead, for the post-mortem
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
            raise
        assert not [e for e in errors if "page error" in e], errors


def assert_plot_drawn(page, text: str, timeout: int) -> None:
    """Once ``text`` shows, the size/quality plot has drawn pixels."""
    page.get_by_text(text).first.wait_for(timeout=timeout)
    figure = page.locator(".evaluate-plot")
    figure.locator("canvas").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1_000)
    assert drawn_colours(figure.screenshot()) > 20, "the size/quality plot is blank"


def test_the_dashboards_evaluate_tab_draws_the_results_in_chromium(evaluated):
    """``laion-dask dashboard RUN`` on an evaluated run: the Evaluate tab draws size/quality."""
    run, results = evaluated
    with dashboard_evaluate_tab(run, "evaluate-tab.png") as page:
        assert_plot_drawn(page, f"Best by {results['primary']}", 60_000)
        table = page.locator("table").last.inner_text()
        for e in results["candidates"]:
            assert e["name"] in table
        assert page.get_by_text(results["caveat"][:40]).count() == 1  # Panel draws in a shadow DOM


def test_the_dashboard_evaluates_the_sliders_thresholds_in_chromium(scored, tmp_path):
    """``laion-dask dashboard RUN``, Evaluate tab: a share outside (0, 1] is refused in one line
    with nothing written; then the sliders' thresholds and "top 50 %" train on the dashboard's
    cluster, the plot draws them, and the run's results hold exactly those candidates."""
    from laion_dask.faces.dashboard import start_thresholds

    run = tmp_run(scored[0], tmp_path)
    shutil.rmtree(run.join("evaluate"), ignore_errors=True)  # another test evaluates the original
    heldout = scored[2]
    sliders, _ = start_thresholds(open_run(run))  # what the dashboard's sliders start at
    with dashboard_evaluate_tab(run, "evaluate-from-dashboard.png") as page:
        page.get_by_text("No evaluation yet").first.wait_for(timeout=30_000)

        def fill(cls: str, value: str) -> None:
            box = page.locator(f".{cls} input")
            box.fill(value)
            box.press("Enter")  # Panel's text and number inputs commit on change

        fill("evaluate-fractions", "2")
        page.locator(".evaluate-button button").click()
        page.get_by_text("cannot evaluate").first.wait_for(timeout=30_000)
        assert not Path(run.join("evaluate")).exists()  # refused before any work
        for cls, value in (
            ("evaluate-fractions", "0.5"),
            ("evaluate-steps", "2"),
            ("evaluate-seeds", "1"),
            ("evaluate-heldout", str(heldout)),
        ):
            fill(cls, value)
        page.locator(".evaluate-button button").click()
        assert_plot_drawn(page, "Best by", 300_000)
        assert page.get_by_text("evaluated 3 candidates").count() == 1  # the status line
    results, _ = ev.read_results(run)
    cands = {c["name"]: c for c in results["candidates"]}
    assert set(cands) == {ev.BASELINE, "dashboard", "top-50pct"}
    assert results["budget"]["steps"] == 2 and results["budget"]["seed"] == [0]
    view = open_run(run)
    assert cands["dashboard"]["thresholds"] == {
        g: getattr(sliders, f"similarity_{g}") for g in ("en", "multi", "nolang")
    }
    assert cands["dashboard"]["rows"] == view.kept_at(sliders).total_kept
