"""The statistics report: every number in stats.json equals a pandas recomputation on the same
rows; report.html renders offline in headless Chromium with every plot."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import FilterConfig
from laion_dask.ground.sketches import (
    HistSpec,
    bincount,
    distinct_estimate,
    distinct_sketch,
    heavy_hitters,
    histogram,
    int_histogram,
    merge,
    merge_all,
    quantiles,
)
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.materialize import materialize
from laion_dask.products.report import (
    COLUMNS,
    HISTOGRAMS,
    QUANTILES,
    build_stats,
    main,
    partition_summary,
    render_markdown,
    write_report,
)
from laion_dask.stages.filters import FINAL_REASON, add_final_reason
from tests.helpers.browser import CHROMIUM, CHROMIUM_ARGS
from tests.helpers.runs import make_scored_run, scored_frame

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_report(tmp_path_factory, client):
    """A hand-built scored run (materialized with max_punsafe set) and its report."""
    run = make_scored_run(tmp_path_factory.mktemp("scored") / "run", parts=3, rows=60)
    cfg = FilterConfig(max_punsafe=0.9, min_side=80)
    materialize(run, cfg, client=client)
    stats = build_stats(run, client=client)
    paths = write_report(run, stats, formats=("html", "md"), client=client)
    return run, cfg, paths


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory, client):
    """A tiny real demo run (crawl -> download -> CLIP -> materialize) and its report."""
    from laion_dask.faces.demo.run import run_demo
    from laion_dask.products.synthetic.corpus import CorpusSpec

    out = tmp_path_factory.mktemp("demo") / "run"
    run_demo(out, spec=CorpusSpec(n_pages=30, seed=6), client=client, dashboard=False)
    run = RunDir(str(out))
    stats = build_stats(run, client=client)
    paths = write_report(run, stats, formats=("html", "md"), client=client)
    return run, run.read_config().filters, paths


def _rows(run: RunDir) -> pd.DataFrame:
    return pd.concat([run.read_parquet(p) for p in run.parts("scores")], ignore_index=True)


def _top(counter: Counter, k: int) -> list[list]:
    return [[n, c] for n, c in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def _host(url: str) -> str:
    return urlsplit(url).hostname or "<none>"


# --- pandas recomputation -------------------------------------------------------------------------


def check_against_pandas(run: RunDir, cfg: FilterConfig, stats: dict) -> None:
    """Every number of stats.json recomputed with plain pandas/numpy on all rows of the run."""
    df = add_final_reason(_rows(run), cfg)
    n = len(df)
    group = df[schema.LANGUAGE_GROUP].fillna("nolang")
    final = df[FINAL_REASON].fillna("kept")
    kept = final.eq("kept")
    status = df[schema.STATUS]
    rule = df[schema.DROP_REASON]
    attempted = rule.isna() & status.notna()
    downloaded = status.eq("success").fillna(False)
    scored = df[schema.SCORE_STATUS].eq("success").fillna(False) & df[schema.SIMILARITY].notna()
    failed = attempted & ~downloaded

    assert stats["thresholds"]["values"] == {
        k: getattr(cfg, k) for k in stats["thresholds"]["values"]
    }
    assert stats["rows"] == n
    assert stats["partitions"] == len(run.parts("scores"))
    # funnel: final fate by group, totals, the add-up checks, and materialize's own funnel.json
    fn = stats["funnel"]
    for g in schema.LANGUAGE_GROUPS:
        assert fn["by_group"][g] == final[group.eq(g)].value_counts().to_dict()
    assert fn["final"]["kept"] == {
        g: int((kept & group.eq(g)).sum()) for g in schema.LANGUAGE_GROUPS
    }
    assert fn["final"]["dropped"] == final[~kept].value_counts().to_dict()
    assert fn["final"]["adds_up"] is True
    assert fn["checks"] and all(fn["checks"].values())
    mat = json.loads(Path(run.join("dataset", "funnel.json")).read_text())
    assert mat["rows_in"] == n
    assert mat["kept"] == fn["final"]["kept"]
    assert mat["dropped"] == fn["final"]["dropped"]
    # per-stage counts
    st = stats["stages"]
    assert st["rules"] == rule.fillna("kept").value_counts().to_dict()
    assert st["download"] == status[attempted].value_counts().to_dict()
    assert (
        st["score"]
        == df.loc[downloaded, schema.SCORE_STATUS].fillna("<none>").value_counts().to_dict()
    )
    from laion_dask.stages.filters import FILTER_REASON

    assert st["filters"] == df.loc[scored, FILTER_REASON].fillna("passed").value_counts().to_dict()
    # languages
    lang = Counter(df[schema.LANGUAGE].fillna("<none>"))
    assert stats["languages"]["top"] == _top(lang, 30)
    assert stats["languages"]["rest"] == n - sum(c for _, c in _top(lang, 30))
    assert stats["languages"]["distinct"] == len(lang)
    assert stats["languages"]["groups"] == {
        g: int(group.eq(g).sum()) for g in schema.LANGUAGE_GROUPS
    }
    assert stats["languages"]["kept_top"] == _top(Counter(df.loc[kept, schema.LANGUAGE]), 30)
    # histograms: same edges, counts from numpy on the concatenated rows
    text = df[schema.TEXT].fillna("")
    w = df[schema.ORIGINAL_WIDTH].astype("float64")
    h = df[schema.ORIGINAL_HEIGHT].astype("float64")
    values = {
        "punsafe": (df[schema.PUNSAFE], scored),
        "pwatermark": (df[schema.PWATERMARK], scored),
        "original_width": (w, downloaded),
        "original_height": (h, downloaded),
        "aspect_ratio": ((w / h).where(h > 0), downloaded),
        "stored_width": (df[schema.WIDTH], downloaded),
        "stored_height": (df[schema.HEIGHT], downloaded),
        "original_bytes": (df[schema.ORIGINAL_BYTES], downloaded),
        "caption_chars": (text.map(len), pd.Series(True, index=df.index)),
        "caption_words": (text.map(lambda s: len(s.split())), pd.Series(True, index=df.index)),
        "caption_chars_kept": (text.map(len), kept),
        "caption_words_kept": (text.map(lambda s: len(s.split())), kept),
    }
    for g in schema.LANGUAGE_GROUPS:
        values[f"similarity_{g}"] = (df[schema.SIMILARITY], scored & group.eq(g))
    assert set(stats["histograms"]) == set(values) == set(HISTOGRAMS)
    for name, (col, mask) in values.items():
        e = stats["histograms"][name]
        v = pd.Series(col)[mask.to_numpy(bool)].astype("float64").to_numpy()
        finite = v[~np.isnan(v)]
        expect, _ = np.histogram(finite, bins=np.asarray(e["edges"]))
        assert e["counts"] == expect.tolist(), name
        assert e["n"] == finite.size and e["missing"] == v.size - finite.size, name
        assert e["under"] == int((finite < e["edges"][0]).sum()), name
        assert e["over"] == int((finite > e["edges"][-1]).sum()), name
        if finite.size:
            assert e["mean"] == pytest.approx(finite.mean(), rel=1e-9), name
            assert e["min"] == finite.min() and e["max"] == finite.max(), name
            # every quantile is within the documented error of the order statistic of rank
            # ceil(q * n); ranks in the under/overflow give the min/max (documented)
            xs = np.sort(finite)
            err = e["quantile_error"]
            for key, q in zip(e["quantiles"], QUANTILES, strict=True):
                x = xs[max(int(np.ceil(q * xs.size)) - 1, 0)]
                if x < e["edges"][0] or x > e["edges"][-1]:
                    assert e["quantiles"][key] == (e["min"] if x < e["edges"][0] else e["max"])
                    continue
                bound = err["abs"] if "abs" in err else err["rel"] * abs(x)
                assert abs(e["quantiles"][key] - x) <= bound + 1e-9, (name, key)
        if name.startswith("similarity_"):
            assert e["threshold"] == cfg.similarity_for(name.split("_")[1])
    for col, ref in (("punsafe", 0.5), ("pwatermark", 0.8)):
        a = stats["above_cutoff"][col]
        cut = getattr(cfg, f"max_{col}") or ref
        assert a["cutoff"] == cut
        assert a["rows"] == int((df.loc[scored, col] > cut).sum())
        assert a["scored"] == int(scored.sum())
    # domains and failures: the sketches are exact below their capacity, as in these runs
    hosts = df[schema.URL].map(_host)
    dom = stats["domains"]
    assert dom["sketch"]["capacity"] > hosts.nunique()
    assert dom["sketch"]["max_undercount"] == {k: 0 for k in dom["sketch"]["max_undercount"]}
    assert all(dom["sketch"]["exact"].values()) and all(dom["sketch"]["distinct_exact"].values())
    assert dom["distinct_candidates"] == hosts.nunique()
    assert dom["distinct_kept"] == hosts[kept].nunique()
    assert dom["rest_candidates"] == n - sum(c for _, c in dom["top_candidates"])
    assert dom["top_candidates"] == _top(Counter(hosts), 30)
    assert dom["top_images"] == _top(Counter(hosts[downloaded]), 30)
    assert dom["top_kept"] == _top(Counter(hosts[kept]), 30)
    assert dom["distinct_images"] == hosts[downloaded].nunique()
    fails = stats["download_failures"]
    assert fails["by_domain"] == _top(Counter(hosts[failed]), 20)
    assert fails["by_status"] == status[failed].value_counts().to_dict()
    http = df.loc[failed, schema.HTTP_STATUS].map(lambda x: "none" if pd.isna(x) else str(int(x)))
    assert fails["by_http_status"] == http.value_counts().to_dict()
    dups = int(rule.eq("duplicate").sum())
    assert stats["duplicates"] == {"rows": dups, "rate": pytest.approx(dups / n)}
    # consent and safety: every opt-out / blocklist reason, the schema's ones listed at zero
    consent = fn["consent"]
    expect = final[~kept].value_counts()
    listed = getattr(schema, "CONSENT_STATUSES", ())
    names = {*schema.EXTRACT_DROP_REASONS, *schema.DOWNLOAD_STATUSES, *listed, *expect.index}
    pattern = re.compile(r"disallowed|robots|tdm|opt_?out|opted|blocklist|blocked_(?!extension)")
    assert consent["reasons"] == {
        r: int(expect.get(r, 0)) for r in sorted(names) if r in listed or pattern.search(r)
    }
    assert consent["rows"] == sum(consent["reasons"].values())
    assert "page_robots_meta" in consent["reasons"] and "blocked_address" in consent["reasons"]
    assert "blocked_extension" not in consent["reasons"]
    # samples: random ones are kept rows of their group; threshold ones are the nearest rows
    by_key = df.set_index(schema.KEY)
    for g in schema.LANGUAGE_GROUPS:
        rnd = stats["samples"]["random"][g]
        pool = kept & group.eq(g) & downloaded
        assert len(rnd) == min(8, int(pool.sum()))
        assert all(by_key.loc[r["key"], FINAL_REASON] is pd.NA for r in rnd)
        assert all(by_key.loc[r["key"], schema.LANGUAGE_GROUP] == g for r in rnd)
        near = stats["samples"]["threshold"][g]
        pool = scored & group.eq(g) & downloaded
        dist = (df.loc[pool, schema.SIMILARITY].astype("float64") - cfg.similarity_for(g)).abs()
        got = sorted(abs(r["similarity"] - cfg.similarity_for(g)) for r in near)
        assert got == pytest.approx(sorted(dist.nsmallest(8).tolist()), abs=1e-6)


def test_stats_equal_pandas_on_scored_run(scored_report):
    run, cfg, paths = scored_report
    stats = json.loads(Path(paths["json"]).read_text())
    assert stats["thresholds"]["source"] == "RUN/dataset/thresholds.toml"
    assert stats["above_cutoff"]["punsafe"]["source"] == "filters"
    check_against_pandas(run, cfg, stats)


def test_stats_equal_pandas_on_demo_run(demo_report):
    run, cfg, paths = demo_report
    stats = json.loads(Path(paths["json"]).read_text())
    check_against_pandas(run, cfg, stats)
    facts = stats["run"]
    assert facts["input_files"] and all(p.endswith(".wat.gz") for p in facts["input_files"])
    assert facts["clip_resolved"]  # written by run_score
    assert {"laion-dask", "dask", "torch", "transformers"} <= set(facts["versions"])
    assert facts["stages"]["download"]["rows"] > 0 and facts["stages"]["score"]["seconds"] > 0
    assert stats["rows"] > 100 and sum(stats["funnel"]["final"]["kept"].values()) > 0


# --- merging: pandas == the same summary mapped over 3 dask partitions on the cluster ------------


def _summary_of(df: pd.DataFrame, cfg: FilterConfig) -> dict:
    return partition_summary(df, cfg)


def _without_sums(obj):
    if isinstance(obj, dict):
        return {k: _without_sums(v) for k, v in obj.items() if k != "sum"}
    return obj


def test_summary_of_three_dask_partitions_equals_pandas(client):
    df = pd.concat([scored_frame(50, p) for p in range(3)], ignore_index=True)[COLUMNS]
    cfg = FilterConfig(min_side=100)
    whole = partition_summary(df, cfg)
    parts = dd.from_pandas(df, npartitions=3).to_delayed()
    assert len(parts) == 3
    merged = client.compute(
        dask.delayed(merge_all)([dask.delayed(_summary_of)(p, cfg) for p in parts])
    ).result()
    assert merged.pop("partitions") == 3 and whole.pop("partitions") == 1
    assert _without_sums(merged) == _without_sums(whole)
    for name, hst in whole["hist"].items():
        assert merged["hist"][name]["sum"] == pytest.approx(hst["sum"])
    assert whole["rows"] == len(df)


def test_partition_summary_does_not_mutate_input():
    df = scored_frame(30, 0)
    before = df.copy()
    partition_summary(df, FilterConfig())
    pd.testing.assert_frame_equal(df, before)


def test_histogram_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 0.05, size=5000)
    spec = HistSpec(-1.0, 1.0, 400)
    h = histogram(np.concatenate([x, [np.nan, 5.0]]), spec)
    assert h["missing"] == 1 and h["over"] == 1 and h["n"] == 5001
    q = quantiles(h, spec, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(q, np.quantile(np.append(x, 5.0), [0.1, 0.5, 0.9]), atol=0.005)
    assert quantiles(histogram(np.array([]), spec), spec, [0.5]) == [None]


# --- outputs --------------------------------------------------------------------------------------


def test_markdown_and_cli(scored_report, client, capsys, tmp_path):
    run, _, paths = scored_report
    md = Path(paths["md"]).read_text()
    assert "| candidate rows |" in md and "adds up: yes" in md
    assert main([run.path, "--format", "md", "--out", str(tmp_path)]) == 0
    written = capsys.readouterr().out.strip()
    assert written == f"{tmp_path}/report.md"
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert Path(written).read_text() == render_markdown(stats)
    assert main([str(tmp_path / "nowhere")]) == 2


def test_report_without_scores_is_a_clear_error(tmp_path, client):
    run = RunDir(str(tmp_path / "empty"))
    from laion_dask.ground.config import PipelineConfig

    run.write_config(PipelineConfig())
    with pytest.raises(FileNotFoundError, match="no scores"):
        build_stats(run, client=client)


def test_html_is_self_contained(demo_report):
    _, _, paths = demo_report
    page = Path(paths["html"]).read_text()
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=\"?https?:", page)
    assert page.count('class="plot"') == len(
        re.search(r'name="laion-dask-plots" content="([^"]*)"', page).group(1).split(",")
    )
    assert page.count("data:image/jpeg;base64,") >= 3  # sample thumbnails inline


def _console_errors(stderr: str) -> list[str]:
    """Console lines of a page error: uncaught exceptions, console.error, Bokeh errors."""
    return [
        ln
        for ln in stderr.splitlines()
        if ("CONSOLE" in ln or "Uncaught" in ln)
        and ("Uncaught" in ln or ":ERROR:CONSOLE" in ln or "Error" in ln)
    ]


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        *CHROMIUM_ARGS,
        f"--user-data-dir={tmp}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=15000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} absent: apt-get install chromium"
)
@pytest.mark.parametrize("which", ["demo_report", "scored_report"])
def test_html_renders_in_headless_chromium(which, request, tmp_path):
    _, _, paths = request.getfixturevalue(which)
    url = Path(paths["html"]).resolve().as_uri()
    page = Path(paths["html"]).read_text()
    expected = re.search(r'name="laion-dask-plots" content="([^"]*)"', page).group(1).split(",")
    dom = _chromium(["--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not _console_errors(dom.stderr), _console_errors(dom.stderr)
    assert any("document idle" in ln for ln in console), console  # Bokeh finished rendering
    status = re.search(r'id="render-status"[^>]*>([^<]*)<', dom.stdout).group(1)
    assert status == f"rendered {len(expected)}"
    rendered = re.findall(r'data-plot="([^"]+)"[^>]*data-rendered="yes"', dom.stdout)
    assert sorted(rendered) == sorted(expected)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"report-{which}.png"
    shot.unlink(missing_ok=True)
    res = _chromium(
        ["--hide-scrollbars", "--window-size=1400,5000", f"--screenshot={shot}", url],
        tmp_path / "profile-shot",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_partition_merges_as_nothing():
    df = scored_frame(40, 1)[COLUMNS]
    cfg = FilterConfig()
    empty = partition_summary(df.iloc[:0], cfg)
    assert empty["rows"] == 0 and all(h["n"] == 0 for h in empty["hist"].values())
    merged = merge_all([empty, partition_summary(df, cfg)])
    merged.pop("partitions")
    alone = partition_summary(df, cfg)
    alone.pop("partitions")
    assert _without_sums(merged) == _without_sums(alone)


def test_url_domain_matches_urlsplit():
    from laion_dask.products.report import url_domain

    urls = [
        "http://User:pw@Img.Example.COM:8080/a.jpg?x=1#f",
        "https://cdn.example.org/path/x.png",
        "HTTP://UPPER.example/x",
        "http://127.0.0.1:8000/i.jpg",
        "//no-scheme.example/x",
        "not a url",
        None,
    ]
    got = url_domain(pd.Series(urls, dtype="string")).tolist()
    expect = [_host(u) if u and "://" in u else "<none>" for u in urls]
    assert got == expect


def test_part_missing_columns_is_reported_not_a_crash(tmp_path, client):
    run = make_scored_run(tmp_path / "run", parts=2, rows=30)
    old = run.read_parquet(run.part_path("scores", 1))
    run.write_parquet_atomic(
        run.part_path("scores", 1), old.drop(columns=[schema.PWATERMARK, schema.HASH])
    )
    stats = build_stats(run, client=client)
    first = run.read_parquet(run.part_path("scores", 0))
    scored = [
        df[schema.SCORE_STATUS].eq("success").fillna(False) & df[schema.SIMILARITY].notna()
        for df in (first, old)
    ]
    assert stats["rows"] == len(first) + len(old)
    wm = stats["histograms"]["pwatermark"]
    assert wm["n"] == int(first.loc[scored[0], schema.PWATERMARK].notna().sum())
    assert wm["missing"] == int(scored[1].sum())
    assert stats["histograms"]["punsafe"]["n"] == int(sum(s.sum() for s in scored))


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} absent: apt-get install chromium"
)
def test_console_error_scan_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><body><p>x</p>"
        "<script>console.error('bad thing'); throw new TypeError('boom');</script></body></html>"
    )
    res = _chromium(["--dump-dom", page.as_uri()], tmp_path / "profile")
    errors = _console_errors(res.stderr)
    assert any("boom" in ln for ln in errors), res.stderr[-2000:]


# --- the statistics pass's vectorized fast paths equal the reference implementations -------------


def _edge_frame() -> pd.DataFrame:
    """scored_frame rows plus nulls, odd captions and odd URLs in every column the report reads."""
    df = scored_frame(400, 7)
    rng = np.random.default_rng(3)
    n = len(df)
    for col in (schema.LANGUAGE_GROUP, schema.LANGUAGE, schema.TEXT, schema.URL):
        df.loc[rng.random(n) < 0.05, col] = None
    texts = [
        "",
        "  ",
        " a\tb\x1c c ",
        "x\x1fy",
        "\n\nq\x0b r\r",
        "one",
        "héllo wörld\u2003x\u00a0y",
        "日本語の\u3000キャプション です",
        "“quoted” — dash…\u2028next\u0085line\u1680ogham\u205fmath\u202fnb",
        "ünïcödé only, no odd spaces",
        "\u00a0",
        "tab\x1f\x0eafter",
    ]
    idx = np.flatnonzero(rng.random(n) < 0.2)
    df.loc[idx, schema.TEXT] = [texts[i % len(texts)] for i in range(len(idx))]
    urls = [
        "http://u:p@Host.EXAMPLE:80/x",
        "https://[::1]:8/a",
        "ftp://A.b/c?d",
        "nourl",
        "//x.y/z",
        "http://x@/",
        "http://ÄÖ.example/p",
    ]
    idx = np.flatnonzero(rng.random(n) < 0.2)
    df.loc[idx, schema.URL] = [urls[i % len(urls)] for i in range(len(idx))]
    return df


@pytest.mark.parametrize(
    "cfg",
    [
        FilterConfig(),
        FilterConfig(max_punsafe=0.5, max_pwatermark=0.7, min_side=100),
        FilterConfig(max_aspect_ratio=2.0, min_text_chars=10),
    ],
)
def test_fast_final_reason_equals_filters_on_hand_made_rows(cfg):
    from laion_dask.products.report import fast_final_reason

    df = _edge_frame()
    expect = add_final_reason(df, cfg)[FINAL_REASON]
    got = fast_final_reason(df, cfg)
    assert expect.notna().any() and expect.isna().any()
    pd.testing.assert_series_equal(got, expect.astype("string"), check_names=False)


def test_fast_final_reason_equals_filters_on_scored_and_demo_runs(scored_report, demo_report):
    from laion_dask.products.report import fast_final_reason

    for run, cfg, _ in (scored_report, demo_report):
        df = _rows(run)
        expect = add_final_reason(df, cfg)[FINAL_REASON]
        got = fast_final_reason(df, cfg)
        assert expect.notna().any()
        pd.testing.assert_series_equal(got, expect.astype("string"), check_names=False)


def test_word_counts_and_domains_match_python():
    from laion_dask.products.report import _domain_codes, _str_array, _word_counts_arrow, url_domain

    df = _edge_frame()
    text = _str_array(df[schema.TEXT]).fill_null("")
    got = _word_counts_arrow(text)
    assert got.tolist() == [len(s.split()) for s in df[schema.TEXT].fillna("")]
    ascii_only = df[schema.TEXT].fillna("").map(lambda s: s.encode("ascii", "replace").decode())
    got = _word_counts_arrow(_str_array(ascii_only))
    assert got.tolist() == [len(s.split()) for s in ascii_only]
    codes, labels = _domain_codes(df[schema.URL])
    assert [labels[c] for c in codes] == url_domain(df[schema.URL]).tolist()


# --- sketches: exact where they say so, within their recorded bounds elsewhere ----------------


def test_int_histogram_and_float_histogram_equal_numpy():
    rng = np.random.default_rng(5)
    n = 10_000  # several CHUNK slices
    x = rng.integers(-50, 5000, size=n)
    valid = rng.random(n) > 0.1
    mask = rng.random(n) > 0.3
    spec = HistSpec(0, 4096, 512)
    assert spec.integer_step == 8 and HistSpec(0.0, 1.0, 10).integer_step is None
    got = int_histogram(x, spec, valid, mask)
    sel = x[valid & mask].astype("float64")
    expect, _ = np.histogram(sel, bins=spec.edges)
    assert got["counts"] == expect.tolist()
    assert got["under"] == int((sel < 0).sum()) and got["over"] == int((sel > 4096).sum())
    assert got["missing"] == int((mask & ~valid).sum()) and got["n"] == sel.size
    assert (got["min"], got["max"], got["sum"]) == (sel.min(), sel.max(), sel.sum())
    # the float path: float32 values, a mask, NaN and invalid rows as missing
    f = rng.normal(0.3, 0.4, size=n).astype("float32")
    f[rng.random(n) < 0.05] = np.nan
    spec = HistSpec(-1.0, 1.0, 2000)
    got = histogram(f, spec, mask, valid)
    sub = f[mask & valid].astype("float64")
    fin = sub[~np.isnan(sub)]
    expect, _ = np.histogram(fin, bins=spec.edges)
    assert got["counts"] == expect.tolist() and got["n"] == fin.size
    assert got["missing"] == int((mask & ~valid).sum()) + int(np.isnan(sub).sum())
    assert got["under"] == int((fin < -1).sum()) and got["over"] == int((fin > 1).sum())
    assert got["sum"] == pytest.approx(fin.sum(), rel=1e-12)
    # values on the edges, at hi, outside, infinite; linear and log bins
    for spec in (
        HistSpec(-1.0, 1.0, 2000),
        HistSpec(0.0, 5.0, 500),
        HistSpec(100.0, 1e8, 300, True),
    ):
        e = spec.edges
        odd = np.concatenate(
            [e, np.nextafter(e, -np.inf), np.nextafter(e, np.inf), [0.0, -3.0, np.inf, -np.inf]]
        )
        vals = np.concatenate([odd, rng.uniform(e[0] / 2, e[-1] * 1.5, 5000)])
        got = histogram(vals, spec)
        fin = vals[np.isfinite(vals) | np.isinf(vals)]
        expect, _ = np.histogram(fin[np.isfinite(fin)], bins=e)
        assert got["counts"] == expect.tolist(), spec
        assert got["under"] == int((fin < e[0]).sum()) and got["over"] == int((fin > e[-1]).sum())
    codes = rng.integers(0, 7, size=n).astype("int8")
    assert bincount(codes, 7, mask).tolist() == np.bincount(codes[mask], minlength=7).tolist()


def _zipf_counts(rng, names: int, rows: int) -> Counter:
    p = 1.0 / np.arange(1, names + 1) ** 1.1
    return Counter(rng.choice([f"d{i}.example" for i in range(names)], size=rows, p=p / p.sum()))


def test_heavy_hitters_bounds_hold_after_tree_merges():
    rng = np.random.default_rng(11)
    parts = [_zipf_counts(rng, 3000, 4000) for _ in range(9)]
    truth = sum(parts, Counter())
    sketches = [heavy_hitters(list(c), np.array(list(c.values())), 64) for c in parts]
    merged = merge_all([merge_all(sketches[i : i + 3]) for i in range(0, 9, 3)])
    total = sum(truth.values())
    assert merged["n"] == total and len(merged["counts"]) <= 64
    err = merged["error"]
    assert 0 < err <= total / 65  # pruned, within the Misra-Gries bound
    for name, true in truth.items():
        est = merged["counts"].get(name, 0)
        assert true - err <= est <= true, name
    # below capacity every count is exact and the error is zero
    exact = merge(*[heavy_hitters(list(c), np.array(list(c.values())), 10_000) for c in parts[:2]])
    assert exact["error"] == 0 and exact["counts"] == dict(parts[0] + parts[1])


def test_distinct_sketch_exact_below_k_and_close_above():
    names = [f"host{i}.example" for i in range(3000)]
    a, b = distinct_sketch(names[:2000], 4096), distinct_sketch(names[1000:], 4096)
    assert distinct_estimate(merge(a, b)) == (3000, True)
    many = [f"h{i}.example" for i in range(60_000)]
    parts = [distinct_sketch(many[i : i + 20_000], 1024) for i in range(0, 60_000, 10_000)]
    est, exact = distinct_estimate(merge_all(parts))
    assert not exact
    assert abs(est - 60_000) <= 3 * 60_000 / np.sqrt(1024 - 2)  # 3 standard errors


def test_small_domain_capacity_reports_its_error_and_stays_within_it(tmp_path, client):
    from laion_dask.products.report import finalize, summarize_run

    run = make_scored_run(tmp_path / "run", parts=3, rows=80)
    frames = [run.read_parquet(p) for p in run.parts("scores")]
    for i, df in enumerate(frames):  # many domains, a few heavy ones
        rng = np.random.default_rng(i)
        hosts = np.where(rng.random(len(df)) < 0.5, rng.integers(0, 4, len(df)), np.arange(80))
        df[schema.URL] = [f"http://h{h}-{i if h >= 4 else 0}.example/x" for h in hosts]
        run.write_parquet_atomic(run.part_path("scores", i), df)
    cfg = FilterConfig()
    summary = summarize_run(run, cfg, client=client, domain_capacity=8, distinct_k=16)
    body = finalize(summary, cfg)
    dom, sk = body["domains"], body["domains"]["sketch"]
    assert sk["capacity"] == 8 and not sk["exact"]["candidates"]
    assert not sk["distinct_exact"]["candidates"]
    truth = Counter(_host(u) for df in frames for u in df[schema.URL])
    err = sk["max_undercount"]["candidates"]
    assert 0 < err <= sum(truth.values()) / 9
    for name, est in dom["top_candidates"]:
        assert truth[name] - err <= est <= truth[name]
    heavy = {f"h{i}-0.example" for i in range(4)}
    assert {name for name, _ in dom["top_candidates"][:4]} == heavy  # far above the error


def test_categorical_columns_summarize_like_strings():
    from laion_dask.products.report import DICTIONARY_COLUMNS

    df = _edge_frame()
    df.loc[df.index[:5], schema.STATUS] = "some_new_status"  # not in schema: still counted
    cat = df.astype({c: "category" for c in DICTIONARY_COLUMNS})
    cfg = FilterConfig(min_side=100)
    assert partition_summary(cat, cfg) == partition_summary(df, cfg)
    assert partition_summary(df, cfg)["stages"]["rules"]  # the frame has rule drops


def test_consent_group_counts_new_statuses_and_reasons(tmp_path, client):
    run = make_scored_run(tmp_path / "run", parts=2, rows=60)
    new = {
        "disallowed_robots_txt": 3,
        "opted_out_domain": 2,
        "blocklisted_url": 1,
        "a_status_nobody_knows": 2,
    }
    frames = []
    for i in range(2):
        df = run.read_parquet(run.part_path("scores", i))
        open_rows = df.index[df[schema.DROP_REASON].isna()]
        at = 0
        for status, k in new.items():
            rows = open_rows[at : at + k]
            at += k
            df.loc[rows, schema.STATUS] = status
            df.loc[rows, [schema.SCORE_STATUS, schema.SIMILARITY]] = None
        df.loc[open_rows[at : at + 2], schema.DROP_REASON] = "page_tdm_reservation"
        run.write_parquet_atomic(run.part_path("scores", i), df)
        frames.append(df)
    stats = build_stats(run, client=client)
    consent = stats["funnel"]["consent"]
    assert consent["reasons"]["disallowed_robots_txt"] == 6
    assert consent["reasons"]["opted_out_domain"] == 4
    assert consent["reasons"]["blocklisted_url"] == 2
    assert consent["reasons"]["page_tdm_reservation"] == 4
    assert consent["reasons"]["page_robots_meta"] == 0  # known to the schema, listed at zero
    assert "a_status_nobody_knows" not in consent["reasons"]
    final = stats["funnel"]["final"]
    assert final["dropped"]["a_status_nobody_knows"] == 4 and final["adds_up"]
    assert stats["stages"]["download"]["a_status_nobody_knows"] == 4
    md = render_markdown(stats)
    assert "| consent and safety | rows | share |" in md
    assert f"| **all consent and safety** | {consent['rows']:,} |" in md


# --- the Arrow-backed read and the byte-level kernels equal the plain pandas / regex paths -------


@pytest.mark.parametrize("row_group_size", [None, 37])  # one chunk per column, or many
def test_arrow_backed_read_gives_the_pandas_frames_summary(tmp_path, row_group_size):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laion_dask.products.report import _read_part

    df = _edge_frame()
    run = RunDir(str(tmp_path / "run"))
    run.makedirs("scores")
    if row_group_size is None:
        run.write_parquet_atomic(run.part_path("scores", 0), df)
    else:
        table = pa.Table.from_pandas(df, preserve_index=False)
        pq.write_table(table, run.part_path("scores", 0), row_group_size=row_group_size)
    read = _read_part(run, run.part_path("scores", 0))
    assert all(isinstance(t, pd.ArrowDtype) for t in read.dtypes)  # the zero-copy path
    for cfg in (FilterConfig(), FilterConfig(max_punsafe=0.5, min_side=100, max_aspect_ratio=2)):
        got, expect = partition_summary(read, cfg), partition_summary(df[COLUMNS], cfg)
        assert _without_sums(got) == _without_sums(expect)
        for name, hst in expect["hist"].items():
            assert got["hist"][name]["sum"] == pytest.approx(hst["sum"]), name


def test_host_fast_path_equals_the_regex_on_random_urls():
    import pyarrow as pa
    import pyarrow.compute as pc

    from laion_dask.ground.sketches import Workspace
    from laion_dask.products.report import _DOMAIN_RE, _raw_hosts, _str_array

    def regex(urls: pd.Series) -> list:
        arr = _str_array(urls)
        return pc.struct_field(pc.extract_regex(arr, pattern=_DOMAIN_RE), [0]).to_pylist()

    rng = np.random.default_rng(11)
    bits = ["http://", "https://", "HTTP://", "ftp://", "/", ":", "?", "#", "@", "[", "]", "a"]
    bits += ["B", "é", "x.y", "日", "", "//", "80", "-", " "]
    ws = Workspace(4)  # grows and is reused across calls, as in a worker
    for trial in range(400):
        urls = []
        for _ in range(int(rng.integers(0, 40))):
            u = "".join(rng.choice(bits, size=int(rng.integers(0, 8))))
            if rng.random() < 0.6:
                u = str(rng.choice(["http://", "https://"])) + u
            if rng.random() < 0.05:  # hosts across several 64-bit words of the bitmap
                u += "h" * int(rng.integers(50, 300))
            urls.append(None if rng.random() < 0.1 else u)
        s = pd.Series(urls, dtype="string")
        s = s.iloc[2:] if trial % 3 == 0 else s
        assert _raw_hosts(s, ws if trial % 2 else None).to_pylist() == regex(s), list(s)
    # a sliced Arrow-backed column
    arr = pa.array([f"https://{'b' * k}.example:8/{k}" for k in range(150)], pa.large_string())
    s = pd.Series(pd.arrays.ArrowExtensionArray(arr.slice(7, 120)))
    assert _raw_hosts(s).to_pylist() == regex(s)


def test_word_counts_on_random_text_and_without_numpy_bitwise_count(monkeypatch):
    import pyarrow as pa

    from laion_dask.ground.sketches import Workspace
    from laion_dask.products.report import _word_counts_arrow

    rng = np.random.default_rng(12)
    alphabet = list("ab c\t\n\x0b\x1c\x1f\x0e\x01é日\u3000\u00a0\u2028 ")
    ws = Workspace(3)

    def check() -> None:
        for trial in range(150):
            n = int(rng.integers(0, 60))
            texts = ["".join(rng.choice(alphabet, size=int(rng.integers(0, 70)))) for _ in range(n)]
            arr = pa.array(texts, pa.large_string())
            if n > 4 and trial % 2:
                arr, texts = arr.slice(1, n - 2), texts[1 : n - 1]
            got = _word_counts_arrow(arr, ws if trial % 3 else None)
            assert got.tolist() == [len(t.split()) for t in texts], texts

    check()
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # NumPy < 2: the lookup table
    check()


def test_sample_candidates_by_group_equal_the_whole_groups_picks():
    from laion_dask.ground.sketches import Workspace
    from laion_dask.products.report import _candidates_by_group

    rng = np.random.default_rng(13)
    k = 8
    ws = Workspace(10)
    for n, rare in ((100, 0.3), (5_000, 0.3), (20_000, 0.0005), (5_000, 0.002), (600, 0.3)):
        gcodes = rng.choice([0, 1, 2], size=n, p=[0.7 - rare, 0.3, rare]).astype(np.int8)
        prio = rng.integers(0, 50, size=n).astype("float64")  # many ties at the k-th value
        prio[gcodes == 2] += 40  # the rare group's rows sit above most others' (past the cut)
        rows = np.flatnonzero(rng.random(n) < 0.9)
        gidx = {"en": 0, "multi": 1, "nolang": 2}
        got = _candidates_by_group(rows, prio[rows], gcodes, gidx, k)
        # in scratch buffers (reused from the previous, larger round: stale contents)
        with_ws = _candidates_by_group(rows, prio[rows], gcodes, gidx, k, ws)
        for g in gidx:
            for a, b in zip(got[g], with_ws[g], strict=True):
                np.testing.assert_array_equal(a, b)
        for g, code in (("en", 0), ("multi", 1), ("nolang", 2)):
            whole = rows[gcodes[rows] == code]
            p = prio[whole]
            expect = set(whole[p <= np.sort(p)[k - 1]]) if p.size > k else set(whole)
            sub_rows, sub_prio = got[g]
            assert (prio[sub_rows] == sub_prio).all()
            if sub_rows.size > k:
                sub_rows = sub_rows[sub_prio <= np.sort(sub_prio)[k - 1]]
            assert set(sub_rows) == expect, (n, rare, g)


def test_statistics_pass_releases_the_workers_scratch_arrays(tmp_path, client):
    from laion_dask.products import report

    run = make_scored_run(tmp_path / "run", parts=2, rows=30)
    build_stats(run, client=client)  # the session cluster's workers run in this process
    assert report._WORKSPACES == {}
    report.partition_summary(scored_frame(30, 1)[COLUMNS], FilterConfig())
    assert report.release_workspaces() > 0 and report._WORKSPACES == {}


def test_arrow_buffers_read_as_pandas_reads_them_on_sliced_arrays():
    import pyarrow as pa

    from laion_dask.products.report import _col_codes, _col_values, _float32, _valid_of, _values_of

    rng = np.random.default_rng(14)
    n = 1_000
    ints = pa.array([None if rng.random() < 0.3 else int(v) for v in rng.integers(0, 9, n)])
    floats = pa.array(
        [None if rng.random() < 0.3 else float(v) for v in rng.random(n)], pa.float32()
    )
    words = pa.array(
        [None if rng.random() < 0.3 else str(rng.choice(["a", "b", "c"])) for _ in range(n)]
    )
    for lo, hi in ((0, n), (3, 700), (77, 78)):
        i, f = ints.slice(lo, hi - lo), floats.slice(lo, hi - lo)
        d = words.dictionary_encode().slice(lo, hi - lo)
        assert _valid_of(i).tolist() == i.is_valid().to_pylist()
        ok = _valid_of(i)
        assert _values_of(i)[ok].tolist() == [v for v in i.to_pylist() if v is not None]
        arrow = pd.DataFrame({"i": pd.arrays.ArrowExtensionArray(i)})
        values, valid = _col_values(arrow, "i")
        assert values[valid].tolist() == [v for v in i.to_pylist() if v is not None]
        assert valid.tolist() == i.is_valid().to_pylist()
        got = _float32(pd.Series(pd.arrays.ArrowExtensionArray(f)))
        expect = pd.Series(f.to_pylist(), dtype="Float32").to_numpy("float32", na_value=np.nan)
        np.testing.assert_array_equal(got, expect)
        codes, labels, valid = _col_codes(pd.Series(pd.arrays.ArrowExtensionArray(d)), "<none>")
        assert [labels[c] for c in codes] == [v or "<none>" for v in d.to_pylist()]
        assert valid.tolist() == d.is_valid().to_pylist()


def _with_garbage_under_nulls(values: np.ndarray, valid: np.ndarray, offset: int = 0):
    """An Arrow array of ``values`` whose rows where ``valid`` is False are null but keep their
    bytes (what a reader may leave under a null), sliced from ``offset``."""
    import pyarrow as pa

    bits = np.packbits(valid, bitorder="little")
    arr = pa.Array.from_buffers(
        pa.from_numpy_dtype(values.dtype),
        len(values),
        [pa.py_buffer(bits.tobytes()), pa.py_buffer(values.tobytes())],
        null_count=int(np.count_nonzero(~valid)),
    )
    return arr.slice(offset)


def test_scratch_buffer_kernels_equal_numpy_where_and_unpackbits():
    import pyarrow as pa

    from laion_dask.ground.sketches import Workspace
    from laion_dask.products.report import (
        _bools_of,
        _char_counts,
        _col_codes,
        _fill_where_invalid,
        _float32,
        _hash_prio,
        _nan_where_invalid,
        _valid_of,
    )

    rng = np.random.default_rng(15)
    ws = Workspace(5)  # grows; stale contents from the previous round must not leak
    for n, p_null in ((1, 0.5), (9, 0.5), (64, 0.0), (1_000, 0.3), (3_001, 0.9), (200, 0.3)):
        valid = rng.random(n) >= p_null
        if not valid.all():
            valid[rng.integers(0, n)] = True
        # garbage under the nulls: extreme integers, NaN, inf, -0.0, huge floats
        codes = rng.integers(0, 7, n).astype(np.int32)
        codes[~valid] = rng.choice([np.iinfo(np.int32).min, -1, 2**31 - 1, 5], (~valid).sum())
        floats = rng.random(n).astype(np.float32)
        junk = np.array([np.nan, np.inf, -np.inf, -0.0, 3e38, 0.5], dtype=np.float32)
        floats[~valid] = rng.choice(junk, (~valid).sum())
        for fill in (0, 6, 7):
            expect = np.where(valid, codes, np.int32(fill))
            np.testing.assert_array_equal(_fill_where_invalid(codes, valid, fill), expect)
            out = ws.get(np.int32, n, 84)
            out[:] = 12345
            got = _fill_where_invalid(codes, valid, fill, out)
            assert got.base is out.base or got is out
            np.testing.assert_array_equal(got, expect)
        expect = np.where(valid, floats, np.float32(np.nan)).view(np.uint32)
        for bufs in ((), (ws.get(np.uint32, n, 87), ws.get(np.uint32, n, 88))):
            got = _nan_where_invalid(floats, valid, *bufs)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got.view(np.uint32), expect)  # bit for bit
        for offset in sorted({0, 1, 7, 8, 9, n - 1} & set(range(n))):
            i = _with_garbage_under_nulls(codes, valid, offset)
            f = _with_garbage_under_nulls(floats, valid, offset)
            flags = pa.array(rng.random(n - offset) < 0.5)
            for slot in (0, 3):
                got = _valid_of(i, ws, slot)
                assert got.dtype == bool and got.tolist() == i.is_valid().to_pylist()
                assert _bools_of(flags, ws, slot).tolist() == flags.to_pylist()
            series = pd.Series(pd.arrays.ArrowExtensionArray(f))
            fresh = _float32(series)
            np.testing.assert_array_equal(
                _float32(series, ws, 87).view(np.uint32), fresh.view(np.uint32)
            )
            expect32 = pd.Series(f.to_pylist(), dtype="Float32").to_numpy(
                "float32", na_value=np.nan
            )
            np.testing.assert_array_equal(fresh, expect32)
            d = pa.array(
                [
                    None if not v else str(c)
                    for v, c in zip(valid[offset:], codes[offset:] % 5, strict=True)
                ]
            ).dictionary_encode()
            ds = pd.Series(pd.arrays.ArrowExtensionArray(d))
            c1, l1, v1 = _col_codes(ds, "<none>")
            c2, l2, v2 = _col_codes(ds, "<none>", ws, 85)
            assert (
                [l2[c] for c in c2] == [l1[c] for c in c1] == [v or "<none>" for v in d.to_pylist()]
            )
            assert v2.tolist() == v1.tolist() == d.is_valid().to_pylist()
            h = _with_garbage_under_nulls(rng.integers(-(2**63), 2**63 - 1, n), valid, offset)
            hs = pd.Series(pd.arrays.ArrowExtensionArray(h))
            rows = np.flatnonzero(rng.random(n - offset) < 0.6)
            expect_prio = hs.iloc[rows].astype("Int64").to_numpy("float64", na_value=0.0) / 2.0**63
            np.testing.assert_array_equal(_hash_prio(hs, rows), expect_prio)
            np.testing.assert_array_equal(_hash_prio(hs, rows, ws), expect_prio)
        text = pa.array(["".join(rng.choice(list("ab c"), int(k))) for k in rng.integers(0, 9, n)])
        text = text.cast(pa.large_string())
        np.testing.assert_array_equal(_char_counts(text, ws), _char_counts(text))
        assert _char_counts(text, ws).tolist() == [len(t) for t in text.to_pylist()]
    assert ws.arange(5, 2).tolist() == [0, 2, 4, 6, 8]
    big = ws.arange(10_000, 2)
    np.testing.assert_array_equal(big, np.arange(0, 20_000, 2))
    assert not big.flags.writeable and ws.arange(3).tolist() == [0, 1, 2]


def test_summaries_in_one_thread_equal_those_with_fresh_scratch_arrays(tmp_path):
    """partition_summary keeps columns in its thread's scratch arrays (named slots): summaries
    of different frames one after the other (small after large, Arrow after pandas) must equal
    those made with fresh ones."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from laion_dask.products import report

    frames = []
    run = RunDir(str(tmp_path / "run"))
    run.makedirs("scores")
    for i, df in enumerate((scored_frame(3_000, 1), _edge_frame(), scored_frame(500, 2))):
        run.write_parquet_atomic(run.part_path("scores", i), df)
        frames += [report._read_part(run, run.part_path("scores", i)), df[COLUMNS]]
    # every column with nulls of its own (buffers of two columns mixed up must show)
    rng = np.random.default_rng(16)
    table = pa.Table.from_pandas(scored_frame(2_000, 3)[COLUMNS], preserve_index=False)
    for name in table.column_names:
        col = table[name].combine_chunks()
        mask = pa.array(rng.random(len(col)) < rng.uniform(0.05, 0.5))
        table = table.set_column(
            table.column_names.index(name), name, pc.if_else(mask, pa.scalar(None, col.type), col)
        )
    pq.write_table(table, run.part_path("scores", 3))
    frames += [report._read_part(run, run.part_path("scores", 3))]
    cfg = FilterConfig(max_punsafe=0.5, min_side=100, max_aspect_ratio=2)

    def dump(summary):
        return json.dumps(summary, sort_keys=True, default=str)

    fresh = []
    for df in frames:
        report.release_workspaces()
        fresh.append(dump(partition_summary(df, cfg)))
    for _ in range(2):
        for df, expect in zip(frames[::-1], fresh[::-1], strict=True):
            assert dump(partition_summary(df, cfg)) == expect
    # and the frame with nulls of its own per column as pandas reads it (no Arrow buffers)
    got, expect = partition_summary(frames[-1], cfg), partition_summary(table.to_pandas(), cfg)
    assert _without_sums(got) == _without_sums(expect)
    for name, hst in expect["hist"].items():
        assert got["hist"][name]["sum"] == pytest.approx(hst["sum"]), name
    report.release_workspaces()
