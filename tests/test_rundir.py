"""RunDir helpers the download plan and the stage starts lean on."""

from __future__ import annotations

import tomllib

import pandas as pd
import pytest

from laion_dask.ground.config import PipelineConfig
from laion_dask.orchestration.rundir import RunDir


def test_read_parquet_rows_reads_any_slice_across_row_groups(tmp_path):
    run = RunDir(str(tmp_path))
    df = pd.DataFrame({"i": range(23), "s": pd.array([f"r{i}" for i in range(23)], "string")})
    path = run.join("x.parquet")
    run.write_parquet_atomic(path, df, row_group_rows=5)
    for start, stop in [(0, 5), (3, 12), (20, 23), (0, 23), (7, 7)]:
        got = run.read_parquet_rows(path, start, stop)
        pd.testing.assert_frame_equal(got, df.iloc[start:stop].reset_index(drop=True))
    with pytest.raises(ValueError, match="rows 20..23 asked, the file has 23"):
        run.read_parquet_rows(path, 20, 24)


def test_read_parquet_take_keeps_the_order_asked_and_refuses_a_rewritten_file(tmp_path):
    run = RunDir(str(tmp_path))
    df = pd.DataFrame({"i": range(23), "s": pd.array([f"r{i}" for i in range(23)], "string")})
    path = run.join("x.parquet")
    run.write_parquet_atomic(path, df, row_group_rows=5)
    pos = [22, 0, 7, 7, 14, 3]
    got = run.read_parquet_take(path, pos, columns=["s"], expected_rows=23)
    pd.testing.assert_frame_equal(got, df.iloc[pos][["s"]].reset_index(drop=True))
    with pytest.raises(RuntimeError, match="has 23 rows, 30 when"):
        run.read_parquet_take(path, pos, expected_rows=30)
    with pytest.raises(ValueError, match="rows -1..3 asked"):
        run.read_parquet_take(path, [3, -1])


def test_remove_tmp_files_takes_only_temporary_names(tmp_path):
    run = RunDir(str(tmp_path))
    run.makedirs("downloads")
    names = {
        "downloads/part-00001.parquet.tmp-0a1b2c3d": True,  # rundir: 8 hex digits
        "downloads/_done/part-00001.json.tmp-ffffffff": True,
        "images/00001.tar.tmp-31337": True,  # shards.py: a process id
        "images/deep/er/x.npy.tmp-12": True,
        "downloads/part-00001.parquet": False,
        "images/00001.tar": False,
        "images/a.tmp-notes": False,
        "images/b.tmp-12.txt": False,
        "scores/part-00001.parquet.tmp-0a1b2c3d": False,  # a folder not asked for
    }
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    removed = run.remove_tmp_files("downloads", "images", "missing")
    assert sorted(p.removeprefix(str(tmp_path) + "/") for p in removed) == sorted(
        n for n, tmp in names.items() if tmp
    )
    assert {n for n in names if (tmp_path / n).exists()} == {n for n, t in names.items() if not t}


def test_markers_past_five_digits_keep_their_index(tmp_path):
    run = RunDir(str(tmp_path))
    run.makedirs("downloads")
    for index in (7, 99_999, 100_000, 123_456):
        run.mark_done("downloads", index, {"index": index})
    markers = run.markers("downloads")
    assert sorted(markers) == [7, 99_999, 100_000, 123_456]
    assert all(m["index"] == i for i, m in markers.items())
    assert run.marker_indices("downloads") == [7, 99_999, 100_000, 123_456]


def test_config_round_trips_with_its_run_facts(tmp_path):
    cfg = PipelineConfig().replace("download", retries=4)
    run = RunDir(str(tmp_path / "run"))
    run.write_config(cfg, extra={"clip_resolved": {"revision": "abc"}})
    assert run.read_config() == cfg  # the [run] facts are not configuration
    with open(run.config_path, "rb") as fh:
        assert tomllib.load(fh)["run"] == {"clip_resolved": {"revision": "abc"}}
    run.write_config(cfg)  # no facts: no [run] table
    assert run.read_config() == cfg and "[run" not in open(run.config_path).read()
