"""laion_dask.products.explore: the interactive API, checked against pandas recomputations."""

from __future__ import annotations

import dataclasses
import io

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from laion_dask.ground import schema
from laion_dask.ground.config import FilterConfig
from laion_dask.products import explore
from laion_dask.products.materialize import materialize
from laion_dask.stages.filters import FINAL_REASON, add_final_reason, load_thresholds
from laion_dask.stages.imaging import png_bytes
from tests.helpers.runs import make_scored_run

CONFIGS = [
    FilterConfig(),
    FilterConfig(similarity_en=0.3, similarity_multi=0.2, similarity_nolang=0.4),
    FilterConfig(max_punsafe=0.5, max_pwatermark=0.8, min_text_chars=0),
    FilterConfig(min_side=200, max_aspect_ratio=2.0, min_text_chars=30),
    FilterConfig(
        similarity_en=-1.0,
        similarity_multi=1.0,
        similarity_nolang=0.0,
        max_punsafe=0.0,
        max_aspect_ratio=1.0,
    ),
]


@pytest.fixture(scope="module")
def scored_view(tmp_path_factory, client):
    run = make_scored_run(tmp_path_factory.mktemp("scored"), parts=3, rows=60)
    return explore.open_run(run.path, client=client)


@pytest.fixture(scope="module")
def demo_view(tmp_path_factory, client):
    from laion_dask.faces.demo.run import run_demo
    from laion_dask.products.synthetic.corpus import CorpusSpec

    out = tmp_path_factory.mktemp("demo")
    run_demo(out, spec=CorpusSpec(n_pages=30, seed=4), client=client, dashboard=False)
    return explore.open_run(out, client=client)


@pytest.fixture(params=["scored", "demo"])
def view(request):
    return request.getfixturevalue(f"{request.param}_view")


def _scores(view: explore.RunView) -> pd.DataFrame:
    parts = [view.run.read_parquet(p) for p in view.run.parts("scores")]
    return pd.concat(parts, ignore_index=True)


def _pandas_funnel(df: pd.DataFrame, cfg: FilterConfig) -> tuple[dict, dict]:
    out = add_final_reason(df, cfg)
    reason = out[FINAL_REASON]
    groups = out[schema.LANGUAGE_GROUP].astype("string").fillna("nolang")
    kept = groups[reason.isna()].value_counts()
    kept = {g: int(kept.get(g, 0)) for g in schema.LANGUAGE_GROUPS}
    dropped = {str(k): int(v) for k, v in reason.dropna().value_counts().items()}
    return kept, dropped


# --- kept_at ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_kept_at_equals_add_final_reason(view, cfg):
    df = _scores(view)
    funnel = view.kept_at(cfg)
    kept, dropped = _pandas_funnel(df, cfg)
    assert funnel.kept == kept
    assert funnel.dropped == dropped
    assert funnel.rows_in == len(df)
    funnel.check()
    # row by row, in part order
    expected = add_final_reason(df, cfg)[FINAL_REASON].reset_index(drop=True)
    pd.testing.assert_series_equal(view.reasons_at(cfg), expected, check_names=False)
    # the group x outcome table agrees with the dicts
    table = funnel.table
    assert table.loc["kept"].to_dict() == kept
    assert table.drop(index="kept").sum(axis=1).to_dict() == dropped


def test_kept_at_thresholds_change_the_funnel(view):
    loose = view.kept_at(FilterConfig(similarity_en=-1, similarity_multi=-1, similarity_nolang=-1))
    strict = view.kept_at(FilterConfig(similarity_en=1, similarity_multi=1, similarity_nolang=1))
    assert loose.total_kept > 0
    assert strict.total_kept == 0
    assert "low_similarity" not in loose.dropped
    assert strict.dropped["low_similarity"] >= loose.total_kept


def test_kept_at_equals_materialize(scored_view, client):
    cfg = FilterConfig(similarity_en=0.3, max_pwatermark=0.7, min_side=100)
    report = materialize(scored_view.run, cfg, client=client)
    funnel = scored_view.kept_at(cfg)
    assert funnel.kept == report.kept
    assert funnel.dropped == report.dropped


def _scheduler_transitions(dask_scheduler=None) -> int:
    return dask_scheduler.transition_counter


def _new_work_since(counter: int, dask_scheduler=None) -> list:
    """Keys that became waiting/queued/processing after ``counter`` (released futures of earlier
    tests being garbage-collected meanwhile are transitions too, but no work)."""
    n = dask_scheduler.transition_counter - counter
    recent = list(dask_scheduler.transition_log)[-n:] if n > 0 else []
    return [e[0] for e in recent if e[2] in ("waiting", "queued", "processing", "no-worker")]


def _no_dask(*args, **kwargs):
    raise AssertionError("a Dask graph was computed")


def test_interaction_runs_no_dask_job(demo_view, client):
    before = client.run_on_scheduler(_scheduler_transitions)
    with dask.config.set(scheduler=_no_dask):
        for cfg in CONFIGS:
            demo_view.kept_at(cfg)
        t = demo_view.threshold_for_fraction("en", 0.3)
        demo_view.fraction_kept("multi", t)
        demo_view.histogram(schema.SIMILARITY, "en")
        demo_view.describe(schema.PUNSAFE)
        demo_view.compare(CONFIGS[0], CONFIGS[1])
    assert client.run_on_scheduler(_new_work_since, before) == []


def test_open_run_reads_scores_on_the_cluster(tmp_path, client):
    run = make_scored_run(tmp_path / "run", parts=3, rows=60)
    before = client.run_on_scheduler(_scheduler_transitions)
    view = explore.open_run(run.path, client=client)
    # one read task per scores part (plus the merges) ran on the cluster
    reads = [k for k in client.run_on_scheduler(_new_work_since, before) if "read_part" in str(k)]
    assert len({str(k) for k in reads}) >= 3
    # in memory: only the interaction columns, in part order, as the pandas recomputation
    # gives them
    rows = view.rows
    assert list(rows.columns) == list(explore.MEMORY_COLUMNS)
    assert not set(explore.DETAIL_COLUMNS) & set(rows.columns)  # url, text, key stay on disk
    assert not any(t is np.dtype(object) for t in rows.dtypes)
    expected = explore.interaction_columns(_scores(view))[list(explore.MEMORY_COLUMNS)]
    strings = {c: "string" for c in rows.columns if isinstance(rows[c].dtype, pd.CategoricalDtype)}
    pd.testing.assert_frame_equal(rows.astype(strings), expected, check_dtype=False)


def test_open_run_without_a_cluster_reads_on_threads(scored_view, monkeypatch):
    import distributed

    def no_client():
        raise ValueError("no client")

    monkeypatch.setattr(distributed, "get_client", no_client)
    alone = explore.open_run(scored_view.run.path)
    pd.testing.assert_frame_equal(alone.rows, scored_view.rows)


def test_details_reads_rows_by_position(scored_view):
    df = _scores(scored_view)
    pos = [len(df) - 1, 0, 61, 5, 130, 5]  # across parts, out of order, repeated
    got = scored_view.details(pos)
    expected = df.iloc[pos][list(explore.DETAIL_COLUMNS)].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)
    assert scored_view.details([], columns=(schema.URL,)).columns.tolist() == [schema.URL]
    with pytest.raises(IndexError, match="out of range"):
        scored_view.details([len(df)])


def test_details_reads_only_the_needed_row_groups(tmp_path, client):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = make_scored_run(tmp_path / "run", parts=2, rows=50)
    path = run.part_path("scores", 1)
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=7)  # 8 row groups of up to 7 rows
    view = explore.open_run(run.path, client=client)
    df = _scores(view)
    pos = [99, 50, 57, 63, 64, 2, 77]
    got = view.details(pos, columns=(schema.KEY, schema.TEXT))
    expected = df.iloc[pos][[schema.KEY, schema.TEXT]].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)
    # a part rewritten with other rows since open_run is a clear error, not wrong captions
    pq.write_table(table.slice(0, 10), path)
    with pytest.raises(RuntimeError, match="open_run it again"):
        view.details([60])
    assert pa  # pyarrow is what the run's parts are written with


def test_interaction_columns_dask_equivalence(scored_view, client):
    df = _scores(scored_view)
    before = df.copy()
    expected = explore.interaction_columns(df)
    ddf = dd.from_pandas(df, npartitions=3)
    got = ddf.map_partitions(
        explore.interaction_columns, meta=explore.interaction_columns(df.iloc[:0])
    )
    got = client.compute(got).result()
    pd.testing.assert_frame_equal(got.sort_index(), expected)
    pd.testing.assert_frame_equal(df, before)  # the input is not mutated


def test_open_run_without_scores_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished scores"):
        explore.open_run(tmp_path)


# --- threshold <-> fraction ---------------------------------------------------------------------


@pytest.mark.parametrize("group", ["en", "multi", "nolang", "all"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_fraction_threshold_round_trip(view, group, fraction):
    df = _scores(view)
    if group != "all":
        df = df[df[schema.LANGUAGE_GROUP].eq(group).fillna(False)]
    sim = df[schema.SIMILARITY].dropna().to_numpy("float32")
    t = view.threshold_for_fraction(group, fraction)
    kept = view.fraction_kept(group, t)
    # pandas: the same fraction, compared in float32 as the filters do
    assert kept == pytest.approx(float((sim >= np.float32(t)).mean()))
    assert abs(kept - fraction) <= 0.5 / len(sim) + 1e-12 or len(np.unique(sim)) < len(sim)
    # and back: the threshold for that fraction keeps exactly the same rows
    t2 = view.threshold_for_fraction(group, kept)
    assert view.fraction_kept(group, t2) == kept
    assert FilterConfig(similarity_en=t)  # a valid threshold


def test_fraction_kept_upper_columns(scored_view):
    df = _scores(scored_view)
    pu = df[schema.PUNSAFE].dropna().to_numpy("float64")
    for limit in (0.1, 0.5, 0.9):
        assert scored_view.fraction_kept("all", limit, column=schema.PUNSAFE) == pytest.approx(
            float((pu <= limit).mean())
        )
        t = scored_view.threshold_for_fraction("all", limit, column=schema.PUNSAFE)
        assert abs(scored_view.fraction_kept("all", t, schema.PUNSAFE) - limit) <= 1 / len(pu)


def test_bad_arguments(scored_view):
    with pytest.raises(ValueError, match="unknown language group"):
        scored_view.fraction_kept("xx", 0.3)
    with pytest.raises(ValueError, match="unknown column"):
        scored_view.histogram("uid")
    with pytest.raises(ValueError, match="fraction"):
        scored_view.threshold_for_fraction("en", 1.5)
    with pytest.raises(ValueError, match="side"):
        scored_view.samples_near(0.3, "en", "left")


# --- distributions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "column", [schema.SIMILARITY, schema.PUNSAFE, schema.ORIGINAL_WIDTH, explore.TEXT_LENGTH]
)
def test_histogram_and_describe_match_numpy(view, column):
    df = explore.interaction_columns(_scores(view))
    for group in ("en", "multi", "nolang", "all"):
        sub = df if group == "all" else df[df[schema.LANGUAGE_GROUP].eq(group).fillna(False)]
        values = sub[column].astype("Float64").dropna().to_numpy("float64")
        counts, edges = view.histogram(column, group)
        assert counts.sum() == len(values)
        np.testing.assert_array_equal(counts, np.histogram(values, bins=edges)[0])
        if len(values):
            q = view.describe(column).loc[group, ["min", "25%", "50%", "75%", "max"]]
            np.testing.assert_allclose(
                q.to_numpy("float64"), np.quantile(values, [0, 0.25, 0.5, 0.75, 1])
            )
    # the default edges are shared by the groups (overlayable)
    np.testing.assert_array_equal(view.histogram(column, "en")[1], view.histogram(column)[1])


def test_describe_and_languages(scored_view):
    table = scored_view.describe()
    assert table.loc["all", "count"] == _scores(scored_view)[schema.SIMILARITY].notna().sum()
    langs = scored_view.language_counts("multi")
    assert langs.to_dict() == {"de": int(scored_view.rows[schema.LANGUAGE_GROUP].eq("multi").sum())}


# --- samples near a threshold -------------------------------------------------------------------


@pytest.mark.parametrize("side", ["above", "below"])
def test_samples_near(view, side):
    t = float(view.describe(schema.SIMILARITY).loc["en", "50%"])
    got = view.samples_near(t, "en", side, 6)
    assert 0 < len(got) <= 6
    sims = got[schema.SIMILARITY].to_numpy("float32")
    if side == "above":
        assert (sims >= np.float32(t)).all()
    else:
        assert (sims < np.float32(t)).all()
    assert (got[schema.LANGUAGE_GROUP] == "en").all()
    dist = got["distance"].to_numpy()
    assert (np.diff(dist) >= 0).all()
    np.testing.assert_allclose(dist, np.abs(sims - np.float32(t)), rtol=1e-6)
    # the nearest rows of that side: nothing closer was skipped
    df = _scores(view)
    en = df[df[schema.LANGUAGE_GROUP].eq("en").fillna(False)][schema.SIMILARITY].dropna()
    en = en.to_numpy("float32")
    on_side = en[en >= np.float32(t)] if side == "above" else en[en < np.float32(t)]
    expected = np.sort(np.abs(on_side.astype("float64") - float(np.float32(t))))[: len(got)]
    np.testing.assert_allclose(dist, expected, rtol=1e-6)
    # deterministic
    again = view.samples_near(t, "en", side, 6, images=False)
    assert again[schema.KEY].tolist() == got[schema.KEY].tolist()
    # thumbnails decode, are small, and survive a PNG round trip
    for img in got["thumbnail"]:
        assert img is not None
        assert max(img.size) <= 128
        png = png_bytes(img)
        assert Image.open(io.BytesIO(png)).size == img.size
    html = explore.samples_html(got, title=f"{side} {t:.3f}")
    assert html.count("data:image/png;base64,") == len(got)


def test_samples_html_shows_search_results_too():
    """One grid for samples and search hits: rank, folded near-duplicates, escaped caption, and
    a link only to an http(s) URL."""
    hits = pd.DataFrame(
        {
            "rank": [1, 2, 3],
            schema.SIMILARITY: [0.91, 0.5, 0.25],
            "collapsed": [2, 0, 0],
            schema.URL: ["https://img.test/a.jpg", "javascript:alert(1)", None],
            schema.TEXT: ["a <b>cat</b>", "dog", None],
            "thumbnail": [Image.new("RGB", (8, 8)), None, None],
        }
    )
    grid = explore.samples_html(hits, title="hits", cell_class="knn-result")
    assert grid.count('class="knn-result"') == 3
    assert "#1 similarity 0.910</b> (+2 near-dup)" in grid
    assert "#2 similarity 0.500</b><br>dog</div>" in grid  # no link to a javascript: URL
    assert grid.count("<a href=") == 1 and 'href="https://img.test/a.jpg"' in grid
    assert "a &lt;b&gt;cat&lt;/b&gt;" in grid and "None" not in grid
    assert grid.count("data:image/png;base64,") == 1 and grid.count("no image") == 2
    # a sample (no rank, no URL column) shows the score it was sampled on
    plain = explore.samples_html(hits.drop(columns=["rank", schema.URL]), score=schema.SIMILARITY)
    assert '<div class="sample"' in plain and "<b>similarity 0.250</b>" in plain


def test_samples_near_captions_and_scores(scored_view):
    got = scored_view.samples_near(0.3, "multi", "below", 3, thumb_size=16)
    rows = _scores(scored_view).set_index(schema.KEY)
    for _, r in got.iterrows():
        assert r[schema.TEXT] == rows.at[r[schema.KEY], schema.TEXT]
        assert r[schema.SIMILARITY] == rows.at[r[schema.KEY], schema.SIMILARITY]
        assert max(r["thumbnail"].size) <= 16


@pytest.mark.parametrize("column", [schema.PUNSAFE, schema.PWATERMARK])
def test_samples_near_upper_cutoffs_split_as_the_filter(scored_view, column):
    """punsafe/pwatermark keep ``value <= t``: ``below`` is the kept side, ``above`` dropped."""
    df = _scores(scored_view)
    values = df[column].dropna().to_numpy("float64")
    t = float(np.sort(values)[len(values) // 2])  # a value present in the data: a tie at t
    kept = scored_view.samples_near(t, "all", "below", 4, column=column, images=False)
    dropped = scored_view.samples_near(t, "all", "above", 4, column=column, images=False)
    assert (kept[column].to_numpy("float64") <= t).all()
    assert kept[column].iloc[0] == pytest.approx(t)  # the row at the cut-off is kept
    assert (dropped[column].to_numpy("float64") > t).all()
    nearest = np.sort(values[values > t] - t)[: len(dropped)]
    np.testing.assert_allclose(dropped["distance"].to_numpy(), nearest)
    loose = dict(similarity_en=-1, similarity_multi=-1, similarity_nolang=-1, min_text_chars=0)
    cfg = FilterConfig(**loose, min_side=0, max_aspect_ratio=None, **{f"max_{column}": t})
    reasons = add_final_reason(df, cfg).set_index(schema.KEY)[FINAL_REASON]
    assert reasons.loc[kept[schema.KEY]].isna().all()
    name = "unsafe" if column == schema.PUNSAFE else "watermark"
    assert (reasons.loc[dropped[schema.KEY]] == name).all()


# --- ground truth -------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=range(3))
def test_precision_recall_equals_pandas(demo_view, cfg):
    gt_path = demo_view.run.join("corpus", "ground_truth.parquet")
    got = demo_view.precision_recall(cfg)
    df = add_final_reason(_scores(demo_view), cfg)
    df = df[df[schema.SCORE_STATUS].eq("success").fillna(False)]
    gt = pd.read_parquet(gt_path, columns=["url", "text", "matches"]).dropna(subset=["text"])
    gt = gt.drop_duplicates(["url", "text"])
    m = df.merge(gt, on=["url", "text"])
    kept = m[FINAL_REASON].isna()
    truth = m["matches"].astype(bool)
    tp = int((kept & truth).sum())
    assert got["with_ground_truth"] == len(m) > 0
    assert got["kept"] == int(kept.sum())
    assert got["true_pairs"] == int(truth.sum())
    assert got["precision"] == pytest.approx(tp / kept.sum())
    assert got["recall"] == pytest.approx(tp / truth.sum())
    en = m[schema.LANGUAGE_GROUP].eq("en")
    assert got["groups"]["en"]["kept"] == int((kept & en).sum())


def test_precision_recall_agrees_with_demo_quality(demo_view):
    """The demo's own similarity-only measure (demo_quality.json) at the run's thresholds."""
    import json

    with open(demo_view.run.join("demo_quality.json"), encoding="utf-8") as fh:
        quality = json.load(fh)
    got = demo_view.precision_recall(demo_view.thresholds)
    assert got["scored_pairs"] == quality["scored_pairs"]
    assert got["with_ground_truth"] == quality["with_ground_truth"]
    assert got["kept"] == quality["kept"]
    assert got["precision"] == pytest.approx(quality["precision"])
    assert got["recall"] == pytest.approx(quality["recall"])


# --- thresholds.toml ----------------------------------------------------------------------------


def test_save_and_load_thresholds(scored_view, tmp_path):
    cfg = scored_view.with_similarity(en=scored_view.threshold_for_fraction("en", 0.3))
    cfg = dataclasses.replace(cfg, max_punsafe=0.4)
    path = scored_view.save_thresholds(cfg, tmp_path / "thresholds.toml")
    assert load_thresholds(path) == cfg
    assert scored_view.load_thresholds(path) == cfg
    default_path = scored_view.save_thresholds(cfg)
    assert default_path == scored_view.run.join("thresholds.toml")
    assert load_thresholds(default_path) == cfg
