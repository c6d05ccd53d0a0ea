"""The extract stage through the pipeline on a real distributed cluster: checkpoints, resume,
run-wide duplicates, failures reported by name, and equality with the lazy graph."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import PipelineConfig
from laion_dask.orchestration import pipeline
from laion_dask.orchestration.pipeline import (
    ConfigChanged,
    StageError,
    candidates_graph,
    run_extract,
)
from laion_dask.orchestration.rundir import RunDir

WARC = "chatnoir-eu-chatnoir-resiliparse/warcfile.warc.gz"
WAT = "eugeneware-warc/CC-MAIN-20140820021334-00006-ip-10-180-136-8.ec2.internal.warc.wat"


@pytest.fixture
def inputs(corpus, tmp_path):
    # the same WARC twice under two names: every kept pair of the second copy is a duplicate
    a = shutil.copy(corpus / WARC, tmp_path / "a.warc.gz")
    b = shutil.copy(corpus / WARC, tmp_path / "b.warc.gz")
    return [str(a), str(b), str(corpus / WAT)]


def _candidates(run: RunDir) -> pd.DataFrame:
    return pd.concat([run.read_parquet(p) for p in run.parts("candidates")], ignore_index=True)


def test_extract_counts_add_up_and_duplicates_span_files(inputs, tmp_path, client):
    run = RunDir(str(tmp_path / "run"))
    report = run_extract(run, PipelineConfig(), inputs, client=client)
    report.check()
    assert not report.failed and report.partitions == 3
    cand = _candidates(run)
    assert len(cand) == report.rows_in
    assert cand[schema.DROP_REASON].fillna("kept").value_counts().to_dict() == report.counts
    first = cand[cand[schema.SOURCE_FILE] == inputs[0]]
    second = cand[cand[schema.SOURCE_FILE] == inputs[1]]
    kept_first = first[schema.DROP_REASON].isna()
    assert kept_first.sum() > 0
    # copy b: rows the rules keep are all duplicates of copy a (which keeps its first occurrences)
    rules_ok_b = second[schema.DROP_REASON].isna() | second[schema.DROP_REASON].eq("duplicate")
    assert second.loc[rules_ok_b, schema.DROP_REASON].eq("duplicate").all()
    assert (cand[schema.DROP_REASON].isna()).sum() == cand.loc[
        cand[schema.DROP_REASON].isna(), [schema.URL, schema.TEXT]
    ].drop_duplicates().shape[0]
    # the lazy notebook graph gives the same candidates
    lazy = candidates_graph(inputs, PipelineConfig()).compute()
    key = [schema.UID]
    pd.testing.assert_frame_equal(
        lazy.sort_values(key).reset_index(drop=True),
        cand.sort_values(key).reset_index(drop=True),
        check_dtype=False,
    )


def test_duplicates_in_one_task_match_the_shuffle(inputs, tmp_path, client, monkeypatch):
    """Issue 17: a small run finds its duplicates in one task, a big one by a Dask shuffle; both
    mark the same rows. A part with nothing to mark is its extract part, copied."""
    one = RunDir(str(tmp_path / "one"))
    report = run_extract(one, PipelineConfig(), inputs, client=client)
    monkeypatch.setattr(pipeline, "_DEDUP_ONE_TASK_ROWS", 0)  # every run is "big"
    shuffled = RunDir(str(tmp_path / "shuffled"))
    assert run_extract(shuffled, PipelineConfig(), inputs, client=client).counts == report.counts
    assert report.counts["duplicate"] > 0
    pd.testing.assert_frame_equal(_candidates(one), _candidates(shuffled))
    copied = 0
    for index in one.markers("candidates"):
        part = one.read_parquet(one.part_path("candidates", index))
        if not part[schema.DROP_REASON].eq("duplicate").any():
            extracted = one.part_path("extract", index)
            with open(extracted, "rb") as a, open(one.part_path("candidates", index), "rb") as b:
                assert a.read() == b.read()
            copied += 1
    assert 0 < copied < len(inputs)


def test_resume_skips_finished_partitions_and_gives_identical_output(inputs, tmp_path, client):
    run = RunDir(str(tmp_path / "run"))
    first = run_extract(run, PipelineConfig(), inputs, client=client)
    before = _candidates(run)
    marker_times = {i: m["seconds"] for i, m in run.markers("extract").items()}
    again = run_extract(run, PipelineConfig(), inputs, client=client)
    assert again.resumed == 3
    assert again.counts == first.counts
    pd.testing.assert_frame_equal(_candidates(run), before)
    assert {i: m["seconds"] for i, m in run.markers("extract").items()} == marker_times
    # a changed rule is refused, naming the key; forced, every partition re-runs
    cfg = PipelineConfig().replace("rules", min_text_chars=10)
    with pytest.raises(ConfigChanged, match=r"rules\.min_text_chars: 5 -> 10"):
        run_extract(run, cfg, inputs, client=client)
    assert {i: m["seconds"] for i, m in run.markers("extract").items()} == marker_times
    changed = run_extract(run, cfg, inputs, client=client, force=True)
    assert changed.resumed == 0
    assert changed.counts.get("text_too_short", 0) > first.counts.get("text_too_short", 0)


def test_unreadable_file_fails_its_partition_only(inputs, tmp_path, client):
    bad = tmp_path / "broken.warc.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage that is not gzip")
    run = RunDir(str(tmp_path / "run"))
    paths = [*inputs, str(bad), str(tmp_path / "missing.warc.gz")]
    report = run_extract(run, PipelineConfig(), paths, client=client)
    assert str(tmp_path / "missing.warc.gz") in report.failed
    assert "missing.warc.gz" in report.failed[str(tmp_path / "missing.warc.gz")]
    assert report.partitions == 5
    report.check()
    # the corrupt gzip is either a counted skip (empty partition) or a named failure
    markers = run.markers("extract")
    if str(bad) not in report.failed:
        summary = next(m["summary"] for m in markers.values() if m["source_file"] == str(bad))
        assert sum(summary["bad_records"].values()) >= 1
    assert len(run.markers("candidates")) == 5 - len(report.failed)


def test_strict_stops_at_the_first_unreadable_file(inputs, tmp_path, client):
    import dataclasses

    cfg = dataclasses.replace(PipelineConfig(), strict=True)
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(StageError, match="missing.warc.gz"):
        run_extract(run, cfg, [*inputs, str(tmp_path / "missing.warc.gz")], client=client)


def test_fewer_inputs_on_rerun_forget_stale_partitions(inputs, tmp_path, client):
    run = RunDir(str(tmp_path / "run"))
    run_extract(run, PipelineConfig(), inputs, client=client)
    report = run_extract(run, PipelineConfig(), inputs[:1], client=client)
    assert sorted(run.markers("candidates")) == [0]
    assert len(_candidates(run)) == report.rows_in
    fresh = run_extract(
        RunDir(str(tmp_path / "fresh")), PipelineConfig(), inputs[:1], client=client
    )
    assert report.counts == fresh.counts


def test_wget_warc_through_the_pipeline_drops_only_real_bad_schemes(corpus, tmp_path, client):
    """Issue 15: a wget WARC (``WARC-Target-URI: <uri>``) lost 35-65 % of its pairs' URLs as
    ``bad_url_scheme``; through the pipeline, only its real ``data:`` images are dropped so."""
    files = [str(corpus / f"allenai-dolma/sample-000{i}.warc.gz") for i in (0, 1)]
    run = RunDir(str(tmp_path / "run"))
    run_extract(run, PipelineConfig(), files, client=client).check()
    cand = _candidates(run)
    assert len(cand) == 169 + 126  # what the independent parse finds (tests/test_conformance)
    bad = cand[cand[schema.DROP_REASON].eq("bad_url_scheme")]
    assert bad[schema.URL].str.startswith("data:").all()
    assert cand[schema.URL].str.match(r"https?://|data:").all()
    assert not cand[schema.PAGE_URL].str.startswith("<").any()
