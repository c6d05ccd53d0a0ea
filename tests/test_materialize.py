from __future__ import annotations

import glob
import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from laion_dask import schema
from laion_dask.config import FilterConfig
from laion_dask.filters import FINAL_REASON, add_final_reason, dump_thresholds
from laion_dask.materialize import LAION_COLUMNS, materialize
from tests.helpers.cluster import LOOPBACK_CLUSTER
from tests.helpers.runs import make_scored_run


@pytest.fixture
def run(tmp_path):
    return make_scored_run(tmp_path / "run", parts=3, rows=60)


def _all_scores(run) -> pd.DataFrame:
    return pd.concat([run.read_parquet(p) for p in run.parts("scores")], ignore_index=True)


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(open(p, "rb").read())
    return h.hexdigest()


def test_materialize_writes_laion_parquet_shards_and_embeddings(run, client):
    cfg = FilterConfig(similarity_en=0.3, similarity_multi=0.25, similarity_nolang=0.25)
    report = materialize(run, cfg, client=client)
    scores = add_final_reason(_all_scores(run), cfg)
    expect_kept = scores[scores[FINAL_REASON].isna()]
    # funnel equals a pandas recomputation and adds up
    assert report.rows_in == len(scores)
    assert report.dropped == scores[FINAL_REASON].value_counts().to_dict()
    for g in schema.LANGUAGE_GROUPS:
        assert report.kept[g] == int(expect_kept[schema.LANGUAGE_GROUP].eq(g).sum())
    report.check()
    funnel = json.loads(open(f"{report.out_dir}/funnel.json").read())
    assert funnel["kept"] == report.kept

    for g in schema.LANGUAGE_GROUPS:
        files = sorted(glob.glob(f"{report.out_dir}/{g}/*.parquet"))
        if not report.kept[g]:
            assert not files
            continue
        table = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
        assert list(table.columns[: len(LAION_COLUMNS)]) == LAION_COLUMNS
        assert table["hash"].dtype == np.int64
        exp = expect_kept[expect_kept[schema.LANGUAGE_GROUP] == g]
        assert sorted(table["URL"]) == sorted(exp[schema.URL])
        assert (table["similarity"] >= {"en": 0.3}.get(g, 0.25)).all()
        # shards: only kept samples, readable by the webdataset reader
        import webdataset as wds

        tars = sorted(glob.glob(f"{report.out_dir}/{g}/*.tar"))
        keys = [s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)]
        assert sorted(keys) == sorted(table["key"])
        # embeddings aligned with metadata rows
        metas = sorted(glob.glob(f"{report.out_dir}/{g}/embeddings/metadata/*.parquet"))
        n_meta = sum(len(pq.read_table(m)) for m in metas)
        embs = sorted(glob.glob(f"{report.out_dir}/{g}/embeddings/img_emb/*.npy"))
        assert sum(len(np.load(e)) for e in embs) == n_meta == len(table)


def test_other_thresholds_change_only_what_is_kept(run, client, tmp_path):
    before = _digest(
        glob.glob(f"{run.path}/scores/*.parquet") + glob.glob(f"{run.path}/images/*.tar")
    )
    strict = materialize(run, FilterConfig(similarity_en=0.4), client=client)
    strict_kept = dict(strict.kept)
    path = tmp_path / "thresholds.toml"
    dump_thresholds(
        FilterConfig(similarity_en=0.15, similarity_multi=0.15, similarity_nolang=0.15), path
    )
    loose = materialize(run, str(path), client=client)
    assert loose.rows_in == strict.rows_in
    assert loose.kept["en"] > strict_kept["en"]
    # upstream reasons are identical: only threshold reasons moved
    upstream = {k for k in strict.dropped if k not in ("low_similarity",)}
    for k in upstream:
        assert loose.dropped.get(k) == strict.dropped.get(k)
    after = _digest(
        glob.glob(f"{run.path}/scores/*.parquet") + glob.glob(f"{run.path}/images/*.tar")
    )
    assert before == after  # nothing rescored, nothing re-downloaded
    assert "0.15" in open(f"{loose.out_dir}/thresholds.toml").read()


def test_materialize_without_scores_is_a_clear_error(tmp_path, client):
    from laion_dask.rundir import RunDir

    run = RunDir(str(tmp_path / "empty"))
    run.makedirs()
    with pytest.raises(FileNotFoundError, match="no scores"):
        materialize(run, FilterConfig(), client=client)


def test_a_client_that_is_not_the_default_one(tmp_path):
    """Stage runners use the client they are given (the dashboard starts its own)."""
    from distributed import Client, LocalCluster

    run = make_scored_run(tmp_path / "run")
    with LocalCluster(n_workers=1, **LOOPBACK_CLUSTER) as cluster:
        own = Client(cluster, set_as_default=False)
        try:
            report = materialize(run, FilterConfig(), client=own)
        finally:
            own.close()
    report.check()
