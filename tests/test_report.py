"""The statistics report: every number in stats.json equals a pandas recomputation on the same
rows; report.html renders offline in headless Chromium with every plot."""

from __future__ import annotations

import dataclasses
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

from laion_dask.faces.cli import main as cli_main
from laion_dask.ground import schema
from laion_dask.ground.config import FilterConfig
from laion_dask.ground.sketches import (
    HistSpec,
    distinct_estimate,
    distinct_sketch,
    heavy_hitters,
    histogram,
    merge,
    merge_all,
    quantiles,
)
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.materialize import materialize
from laion_dask.products.report import (
    COLUMNS,
    HISTOGRAMS,
    build_stats,
    partition_summary,
    render_markdown,
    write_report,
)
from laion_dask.products.report.statistics import QUANTILES
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
    assert cli_main(["report", run.path, "--format", "md", "--out", str(tmp_path)]) == 0
    written = capsys.readouterr().out.strip().splitlines()[-1]
    assert written == f"{tmp_path}/report.md"
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert Path(written).read_text() == render_markdown(stats)
    assert cli_main(["report", str(tmp_path / "nowhere")]) == 2


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
    summary = summarize_run(run, cfg, client=client, domain_capacity=8, distinct_k=32)
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
    from laion_dask.products.report.statistics import DICTIONARY_COLUMNS

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

    from laion_dask.products.report import read_part

    df = _edge_frame()
    run = RunDir(str(tmp_path / "run"))
    run.makedirs("scores")
    if row_group_size is None:
        run.write_parquet_atomic(run.part_path("scores", 0), df)
    else:
        table = pa.Table.from_pandas(df, preserve_index=False)
        pq.write_table(table, run.part_path("scores", 0), row_group_size=row_group_size)
    read = read_part(run, run.part_path("scores", 0))
    assert isinstance(read[schema.TEXT].dtype, pd.ArrowDtype)  # captions stay Arrow strings
    for cfg in (FilterConfig(), FilterConfig(max_punsafe=0.5, min_side=100, max_aspect_ratio=2)):
        got, expect = partition_summary(read, cfg), partition_summary(df[COLUMNS], cfg)
        assert _without_sums(got) == _without_sums(expect)
        for name, hst in expect["hist"].items():
            assert got["hist"][name]["sum"] == pytest.approx(hst["sum"]), name


def test_host_fast_path_equals_the_regex_on_random_urls():
    import pyarrow as pa
    import pyarrow.compute as pc

    from laion_dask.products.report.statistics import DOMAIN_RE, url_hosts

    rng = np.random.default_rng(5)
    pieces = [
        "http://",
        "https://",
        "HTTP://",
        "ftp://",
        "a",
        "b.",
        "/",
        ":",
        "?",
        "#",
        "@",
        "[",
        "]",
    ]
    pieces += ["Ex", "é", "::1", "80", "%20", "//", " "]
    urls = ["".join(rng.choice(pieces, size=rng.integers(0, 9))) for _ in range(3000)]
    urls += [None, "", "https://", "http://@", "https://[::1]:8080/x", "http://a.b"]
    arr = pa.array(urls, type=pa.large_string())
    expect = pc.struct_field(pc.extract_regex(arr, pattern=DOMAIN_RE), [0]).to_pylist()
    got = url_hosts(pd.Series(urls, dtype="string")).to_pylist()
    assert got == expect


def test_caption_words_equal_str_split_on_random_text():
    from laion_dask.products.report.statistics import caption_words

    rng = np.random.default_rng(8)
    alphabet = list("ab \t\n\x0b\x1c\x1f\x0eé日") + ["\u3000", "\u00a0", "\u2028", "\u0085", "  "]
    texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 12))) for _ in range(3000)]
    texts += [None, "", " ", "one", "héllo wörld"]
    got = caption_words(pd.Series(texts, dtype="string"))
    assert got.tolist() == [len(t.split()) if t else 0 for t in texts]


def test_report_runs_on_threads_without_a_cluster(scored_report, monkeypatch):
    """map_reduce falls back to local threads: the same statistics without any client."""
    import distributed

    run, cfg, paths = scored_report

    def no_client():
        raise ValueError("no client")

    monkeypatch.setattr(distributed, "get_client", no_client)
    alone = build_stats(run)
    stats = json.loads(Path(paths["json"]).read_text())
    for key in ("funnel", "stages", "languages", "histograms", "domains", "samples"):
        assert json.loads(json.dumps(alone[key], sort_keys=True)) == stats[key], key


def test_tag_caveat_names_the_demo_model_and_uncalibrated_tags(demo_report, scored_report):
    run, _, paths = demo_report
    stats = json.loads(Path(paths["json"]).read_text())
    assert "demo model" in stats["tags"]["caveat"]
    page = Path(paths["html"]).read_text()
    assert 'id="tag-caveat"' in page and "not meaningful" in page
    assert "Caveat on punsafe / pwatermark" in Path(paths["md"]).read_text()
    # a run scored zero-shot with another model: uncalibrated, said so; a learned head: none
    scored = json.loads(Path(scored_report[2]["json"]).read_text())
    assert "zero-shot" in scored["tags"]["caveat"]
    from laion_dask.products.report import tag_provenance

    cfg = scored_report[0].read_config()
    head = dataclasses.replace(cfg.clip, tags="head", tag_head="head.safetensors")
    scored_report[0].write_config(dataclasses.replace(cfg, clip=head))
    try:
        assert tag_provenance(scored_report[0])["caveat"] is None
    finally:
        scored_report[0].write_config(cfg)
