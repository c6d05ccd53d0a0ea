from __future__ import annotations

import shutil

from laion_dask.ground.config import FilterConfig, PipelineConfig
from laion_dask.orchestration.pipeline import run_extract
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.materialize import materialize
from laion_dask.products.stats import check_funnel, format_funnel, funnel
from tests.helpers.runs import make_scored_run


def test_funnel_of_extract_adds_up(corpus, tmp_path, client):
    src = corpus / "chatnoir-eu-chatnoir-resiliparse/warcfile.warc.gz"
    paths = [str(shutil.copy(src, tmp_path / f"{n}.warc.gz")) for n in "ab"]
    run = RunDir(str(tmp_path / "run"))
    report = run_extract(run, PipelineConfig(), paths, client=client)
    table = funnel(run)
    ext = table[table.stage == "extract"].set_index("outcome")["rows"]
    assert ext["pairs_found"] == report.rows_in
    assert ext["duplicate"] == report.counts["duplicate"]
    assert check_funnel(table) == {"extract": True}
    assert "counts add up" in format_funnel(table)


def test_funnel_of_materialize_matches_report(tmp_path, client):
    run = make_scored_run(tmp_path / "run")
    rep = materialize(run, FilterConfig(), client=client)
    table = funnel(run)
    mat = table[table.stage == "materialize"].set_index("outcome")["rows"]
    assert mat["rows_in"] == rep.rows_in
    assert sum(mat[f"kept_{g}"] for g in rep.kept) == sum(rep.kept.values())
    assert check_funnel(table)["materialize"]


def test_broken_counts_are_flagged():
    import pandas as pd

    table = pd.DataFrame(
        {"stage": ["x", "x", "x"], "outcome": ["attempted", "a", "b"], "rows": [10, 3, 4]}
    )
    assert check_funnel(table) == {"x": False}
    assert "DO NOT ADD UP" in format_funnel(table)
