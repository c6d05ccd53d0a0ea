"""The download stage through the pipeline: shards + parquet per task, counts that add up,
resume, and --retry-failed merging transient failures, against a real loopback HTTP server."""

from __future__ import annotations

import glob
import shutil
from pathlib import Path

import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import PipelineConfig
from laion_dask.ground.shards import iter_shard
from laion_dask.orchestration import pipeline
from laion_dask.orchestration.pipeline import (
    ConfigChanged,
    StageError,
    is_transient_failure,
    run_download,
    run_extract,
    run_score,
)
from laion_dask.orchestration.rundir import RunDir
from tests.helpers.extract import make_wat, wat_payload
from tests.helpers.imagehost import noise_image, serve_images


@pytest.fixture
def host():
    with serve_images() as h:
        yield h


def _link(url: str, alt: str) -> dict:
    return {"path": "IMG@/src", "url": url, "alt": alt}


def _build_inputs(host, tmp_path, token: str) -> list[str]:
    paths = []
    for f in range(2):
        records = []
        for p in range(3):
            links = []
            for i in range(4):
                name = f"f{f}p{p}i{i}.jpg"
                url = host.add(
                    name, noise_image(200 + 10 * i, 150, "JPEG", seed=f * 100 + p * 10 + i)
                )
                links.append(_link(url, f"a photo number {f} {p} {i}"))
            links.append(_link(host.url(f"/status/404?p={f}{p}"), "a missing picture"))
            links.append(_link(host.url(f"/flaky/{token}-{f}-{p}"), "a flaky picture here"))
            links.append(_link(host.url(f"/robots?tag=noai&p={f}{p}"), "a picture that opts out"))
            links.append(_link("data:image/png;base64,AAAA", "an inline picture"))
            records.append(wat_payload(f"http://page.test/{f}/{p}.html", links))
        path = tmp_path / f"crawl-{f}.warc.wat.gz"
        path.write_bytes(make_wat(records))
        paths.append(str(path))
    return paths


def _cfg(**download) -> PipelineConfig:
    base = {
        "allow_private_networks": True,
        "retries": 0,
        "rows_per_task": 10,
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "deadline": 5.0,
    }
    return PipelineConfig().replace("download", **(base | download))


def _downloads(run: RunDir) -> pd.DataFrame:
    return pd.concat([run.read_parquet(p) for p in run.parts("downloads")], ignore_index=True)


def test_download_writes_shards_and_counts_add_up(host, tmp_path, client):
    paths = _build_inputs(host, tmp_path, "a")
    run = RunDir(str(tmp_path / "run"))
    cfg = _cfg()
    ext = run_extract(run, cfg, paths, client=client)
    report = run_download(run, cfg, client=client)
    report.check()
    dl = _downloads(run)
    # every candidate row is in downloads, exactly once
    assert len(dl) == ext.rows_in == report.rows_in
    assert dl[schema.UID].is_unique
    attempted = dl[schema.DROP_REASON].isna()
    assert report.counts["not_attempted"] == int((~attempted).sum())
    status = dl.loc[attempted, schema.STATUS].value_counts().to_dict()
    assert status["success"] == 24
    assert status["disallowed"] == 6
    assert status["failed_to_download"] == 12  # 404s and first-time 500s (retries = 0)
    # rows_per_task = 10 -> several shards, each holding exactly its successes
    tars = sorted(glob.glob(f"{run.path}/images/*.tar"))
    assert len(tars) == len(run.markers("downloads")) >= 2
    in_shards = {k for t in tars for k, _ in iter_shard(t)}
    ok = dl[dl[schema.STATUS] == "success"]
    assert in_shards == set(ok[schema.KEY])
    for t in tars[:1]:
        for _key, members in iter_shard(t):
            assert {"jpg", "txt", "json"} <= set(members)
    # keep_ratio (img2dataset): the smaller side becomes image_size
    short = ok[[schema.WIDTH, schema.HEIGHT]].min(axis=1)
    assert short.eq(256).all() and ok[schema.SHA256].str.len().eq(64).all()


def test_a_plan_made_in_one_task_equals_the_shuffled_plan(host, tmp_path, client, monkeypatch):
    """Issue 17: a small run is planned by one task instead of a Dask groupby + shuffle; the
    plan (buckets, big hosts, chains, every bucket file) is the same, big hosts included."""
    paths = _build_inputs(host, tmp_path, "plan")
    cfg = _cfg(rows_per_task=1)  # the image host's 30 fetched rows make it a big host
    one = RunDir(str(tmp_path / "one"))
    run_extract(one, cfg, paths, client=client)
    shutil.copytree(one.path, tmp_path / "shuffled")
    shuffled = RunDir(str(tmp_path / "shuffled"))
    small = pipeline._download_plan(one, cfg, one.markers("candidates"), client)
    monkeypatch.setattr(pipeline, "_PLAN_ONE_TASK_ROWS", 0)  # every run is "big"
    big = pipeline._download_plan(shuffled, cfg, shuffled.markers("candidates"), client)
    assert small["chains"] and any(len(chain) > 1 for chain in small["chains"])
    assert {k: v for k, v in small.items() if k != "folder"} == {
        k: v for k, v in big.items() if k != "folder"
    }
    files = sorted(p.name for p in Path(small["folder"]).glob("*.parquet"))
    assert "_big_hosts.parquet" in files
    assert files == sorted(p.name for p in Path(big["folder"]).glob("*.parquet"))
    for name in files:
        pd.testing.assert_frame_equal(
            pd.read_parquet(f"{small['folder']}/{name}"), pd.read_parquet(f"{big['folder']}/{name}")
        )


def test_resume_and_retry_failed(host, tmp_path, client):
    paths = _build_inputs(host, tmp_path, "b")
    run = RunDir(str(tmp_path / "run"))
    cfg = _cfg()
    run_extract(run, cfg, paths, client=client)
    first = run_download(run, cfg, client=client)
    before = _downloads(run)
    n_requests = len(host.requests)
    again = run_download(run, cfg, client=client)
    assert again.resumed == again.partitions
    assert len(host.requests) == n_requests  # nothing fetched twice
    pd.testing.assert_frame_equal(_downloads(run), before)

    transient = is_transient_failure(before)
    assert transient.sum() == 6  # the flaky 500s; 404s are final
    retried = run_download(run, cfg, client=client, retry_failed=True)
    after = _downloads(run)
    assert len(after) == len(before)
    assert retried.counts["success"] == first.counts["success"] + 6
    flaky = after[after[schema.URL].str.contains("/flaky/")]
    assert flaky[schema.STATUS].eq("success").all()
    # 404s were not asked for again
    assert sum(1 for p, _, _ in host.requests if p.startswith("/status/404")) == 6
    tars = sorted(glob.glob(f"{run.path}/images/*.tar"))
    in_shards = {k for t in tars for k, _ in iter_shard(t)}
    assert in_shards == set(after.loc[after[schema.STATUS] == "success", schema.KEY])


def test_private_networks_are_refused_by_default(host, tmp_path, client):
    paths = _build_inputs(host, tmp_path, "c")
    run = RunDir(str(tmp_path / "run"))
    cfg = _cfg(allow_private_networks=False)
    run_extract(run, cfg, paths, client=client)
    n_requests = len(host.requests)
    report = run_download(run, cfg, client=client)
    assert report.counts.get("success", 0) == 0
    assert report.counts["blocked_address"] == 42
    assert len(host.requests) == n_requests


def test_a_smaller_plan_forgets_the_shards_it_no_longer_has(host, tmp_path, client):
    paths = _build_inputs(host, tmp_path, "d")
    run = RunDir(str(tmp_path / "run"))
    run_extract(run, _cfg(), paths, client=client)
    small = run_download(run, _cfg(), client=client)
    bigger = _cfg(rows_per_task=25)
    with pytest.raises(ConfigChanged, match=r"download\.rows_per_task: 10 -> 25"):
        run_download(run, bigger, client=client)
    report = run_download(run, bigger, client=client, force=True)
    report.check()
    assert report.partitions < small.partitions and report.resumed == 0
    markers = run.markers("downloads")
    assert sorted(markers) == list(range(report.partitions))
    assert len(glob.glob(f"{run.path}/images/*.tar")) == report.partitions
    dl = _downloads(run)
    assert len(dl) == report.rows_in == small.rows_in and dl[schema.UID].is_unique
    assert dl.groupby(schema.SHARD).size().max() <= 25
    # one plan kept: the one the finished partitions were made from
    assert len(glob.glob(f"{run.path}/download_plan/*/_plan.json")) == 1


def test_leftover_tmp_files_are_removed_when_a_stage_starts(host, tmp_path, client):
    """Files a killed task was writing (NAME.tmp-XXXXXXXX) go when the stage runs again."""
    paths = _build_inputs(host, tmp_path, "e")
    run = RunDir(str(tmp_path / "run"))
    cfg = _cfg()
    run_extract(run, cfg, paths, client=client)
    run_download(run, cfg, client=client)
    before = _downloads(run)
    root = tmp_path / "run"
    planted = {
        "extract": root / "extract" / "part-00000.parquet.tmp-0a1b2c3d",
        "candidates": root / "candidates" / "_done" / "part-00001.json.tmp-deadbeef",
        "downloads": root / "downloads" / "part-00002.parquet.tmp-1234abcd",
        "marker": root / "downloads" / "_done" / "part-00002.json.tmp-1234abce",
        "shard": root / "images" / "00002.tar.tmp-4242",  # shards.py: pid suffix
        "consent": next((root / "consent").rglob("*.jsonl")).with_suffix(".jsonl.tmp-00ff00ff"),
    }
    keep = root / "images" / "notes.tmp-file.txt"  # not a temporary name: left alone
    for path in [*planted.values(), keep]:
        path.write_bytes(b"half written")
    ext = run_extract(run, cfg, paths, client=client)
    assert ext.resumed == 2
    assert not planted["extract"].exists() and not planted["candidates"].exists()
    assert planted["downloads"].exists()  # another stage's folder: its own start cleans it
    again = run_download(run, cfg, client=client)
    assert again.resumed == again.partitions
    assert not any(p.exists() for p in planted.values())
    assert keep.exists()
    pd.testing.assert_frame_equal(_downloads(run), before)


def test_scores_of_shards_a_smaller_plan_dropped_are_forgotten(host, tmp_path, client):
    """After a re-plan with fewer shards, the scores (and embeddings) of the shards that are
    gone must not stay behind for materialize, explore and the report to read."""
    from laion_dask.orchestration.pipeline import run_score
    from tests.helpers.clip import save_tiny_clip

    paths = _build_inputs(host, tmp_path, "f")
    run = RunDir(str(tmp_path / "run"))
    cfg = _cfg().replace("clip", model=str(save_tiny_clip(tmp_path / "clip")))
    run_extract(run, cfg, paths, client=client)
    run_download(run, cfg, client=client)
    run_score(run, cfg, client=client)
    before = sorted(run.markers("scores"))
    bigger = cfg.replace("download", rows_per_task=25)
    shards = run_download(run, bigger, client=client, force=True).partitions
    assert shards < len(before)
    run_score(run, bigger, client=client)
    assert sorted(run.markers("scores")) == sorted(run.markers("downloads")) == list(range(shards))
    assert len(run.parts("scores")) == shards
    for kind in ("img_emb", "text_emb", "metadata"):
        assert len(glob.glob(f"{run.path}/embeddings/{kind}/*")) == shards, kind
    scores = pd.concat([run.read_parquet(p) for p in run.parts("scores")], ignore_index=True)
    # every downloaded row once (scores keep the rows they could not score, with a status)
    assert len(scores) == len(_downloads(run)) and scores[schema.UID].is_unique


def test_scoring_tasks_get_torch_threads_from_their_worker(host, tmp_path, monkeypatch):
    """The scoring stage never asks Dask how many threads it has: the orchestration tells it.
    Each task of a 3-thread worker scores with ``threads=3``, and torch uses them."""
    import torch
    from distributed import Client, LocalCluster

    from laion_dask.orchestration import pipeline
    from tests.helpers.clip import save_tiny_clip
    from tests.helpers.cluster import LOOPBACK_CLUSTER

    seen: list[tuple[int | None, int | None]] = []

    def spy(*args, **kwargs):
        out = pipeline.score_partition.__wrapped__(*args, **kwargs)
        # torch's count is per calling thread: read it in the task's thread, where rows were scored
        seen.append((kwargs.get("threads"), torch.get_num_threads() if out.keys else None))
        return out

    spy.__wrapped__ = pipeline.score_partition
    monkeypatch.setattr(pipeline, "score_partition", spy)
    run = RunDir(str(tmp_path / "run"))
    cfg = _cfg().replace("clip", model=str(save_tiny_clip(tmp_path / "clip")), device="cpu")
    before = torch.get_num_threads()
    try:
        with (
            LocalCluster(n_workers=1, threads_per_worker=3, **LOOPBACK_CLUSTER) as cluster,
            Client(cluster) as c,
        ):
            pipeline.run_extract(run, cfg, _build_inputs(host, tmp_path, "t"), client=c)
            pipeline.run_download(run, cfg, client=c)
            report = pipeline.run_score(run, cfg, client=c)
            assert c.submit(pipeline.worker_threads, pure=False).result() == 3
    finally:
        torch.set_num_threads(before)
    assert report.partitions == len(seen) > 1 and not report.failed
    assert {threads for threads, _ in seen} == {3}
    assert {used for _, used in seen} - {None} == {3}
    assert pipeline.worker_threads() is None  # outside a worker task


def test_download_and_score_refuse_a_run_whose_upstream_has_not_run(tmp_path):
    """No candidates -> download raises; no shards -> score raises; neither creates anything.

    Before, download made RUN/downloads and RUN/images before raising, and score returned a
    report of "0 rows in" after loading the model.
    """
    run = RunDir(str(tmp_path / "run"))
    cfg = PipelineConfig()
    with pytest.raises(StageError, match="run `laion-dask extract"):
        run_download(run, cfg, client=object())  # never reached: the check comes first
    with pytest.raises(StageError, match="run `laion-dask download"):
        run_score(run, cfg, client=object())
    assert not (tmp_path / "run").exists()
