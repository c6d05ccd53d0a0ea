from __future__ import annotations

import glob
import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import FilterConfig
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.materialize import (
    LAION_COLUMNS,
    _materialize_part,
    materialize,
    materialized_subsets,
    read_dataset,
)
from laion_dask.stages.filters import (
    FINAL_REASON,
    add_final_reason,
    dump_thresholds,
    load_thresholds,
)
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


# --- output subsets ------------------------------------------------------------------------

LOOSE = dict(similarity_en=0.15, similarity_multi=0.15, similarity_nolang=0.15)
SUBSETS = {
    "research-safe": {"max_punsafe": 0.45},
    "clean": {"max_punsafe": 0.3, "max_pwatermark": 0.6},
}


def _subset_reasons_by_hand(scores: pd.DataFrame, cfg: FilterConfig) -> dict[str, pd.Series]:
    """Each subset's per-row fate recomputed with pandas: the base reason, then its cut-offs."""
    base = add_final_reason(scores, cfg)[FINAL_REASON]
    out = {}
    for name, sub in cfg.subsets.items():
        reason = base.copy()
        open_ = reason.isna()
        for col, limit, above, missing in (
            (schema.PUNSAFE, sub.max_punsafe, "unsafe", "missing_punsafe"),
            (schema.PWATERMARK, sub.max_pwatermark, "watermark", "missing_pwatermark"),
        ):
            if limit is None:
                continue
            v = scores[col].astype("Float64")
            reason[open_ & v.isna()] = missing
            reason[open_ & v.notna() & (v > limit).fillna(False)] = above
            open_ = reason.isna()
        out[name] = reason
    return out


def _read_group(root: str, group: str) -> pd.DataFrame | None:
    files = sorted(glob.glob(f"{root}/{group}/*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files]) if files else None


def _tar_keys(root: str, group: str) -> list[str]:
    import webdataset as wds

    tars = sorted(glob.glob(f"{root}/{group}/*.tar"))
    return sorted(s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)) if tars else []


def test_subsets_are_written_beside_the_base_and_their_funnels_add_up(run, client):
    # a kept row without a punsafe score: the base keeps it, every subset cutting on it drops it
    df = run.read_parquet(run.part_path("scores", 0))
    base_only = FilterConfig(**LOOSE, max_punsafe=0.95)
    keep = df.index[add_final_reason(df, base_only)[FINAL_REASON].isna().to_numpy(bool)]
    df.loc[keep[:2], schema.PUNSAFE] = np.nan
    run.write_parquet_atomic(run.part_path("scores", 0), df)
    cfg = FilterConfig(**LOOSE, max_punsafe=0.95, subsets=SUBSETS)
    seen = []
    report = materialize(run, cfg, client=client, progress=lambda d, t, p: seen.append(d))
    assert seen == [1, 2, 3]  # one task per scores partition, whatever the number of subsets
    report.check()
    scores = _all_scores(run)
    base = add_final_reason(scores, cfg)
    expect = _subset_reasons_by_hand(scores, cfg)
    assert list(report.subsets) == list(SUBSETS)
    kept_keys: dict[str, set[str]] = {"": set(base.loc[base[FINAL_REASON].isna(), schema.KEY])}
    for name, sub in report.subsets.items():
        reason = expect[name]
        # the funnel equals the pandas recomputation and adds up
        assert sub.rows_in == report.rows_in == len(scores)
        assert sub.dropped == reason.value_counts().to_dict()
        for g in schema.LANGUAGE_GROUPS:
            assert sub.kept[g] == int((reason.isna() & scores[schema.LANGUAGE_GROUP].eq(g)).sum())
        assert sum(sub.kept.values()) + sum(sub.dropped.values()) == sub.rows_in
        assert sub.dropped["missing_punsafe"] == 2 and sub.dropped["unsafe"] > report.dropped.get(
            "unsafe", 0
        )
        # upstream reasons are the base's, untouched
        for k in ("duplicate", "text_too_short", "failed_to_download", "unscorable_image"):
            assert sub.dropped[k] == report.dropped[k]
        # its own folder: funnel.json, thresholds.toml, parquet + shards + embeddings per group
        assert sub.out_dir == f"{report.out_dir}/{name}"
        written = json.loads(open(f"{sub.out_dir}/funnel.json").read())
        assert {k: written[k] for k in ("rows_in", "kept", "dropped")} == sub.to_dict()
        assert written["cut"] == SUBSETS[name]
        assert load_thresholds(f"{sub.out_dir}/thresholds.toml") == cfg
        keys: set[str] = set()
        for g in schema.LANGUAGE_GROUPS:
            table = _read_group(sub.out_dir, g)
            if table is None:
                assert sub.kept[g] == 0
                continue
            exp = scores[reason.isna() & scores[schema.LANGUAGE_GROUP].eq(g)]
            assert sorted(table["key"]) == sorted(exp[schema.KEY])
            assert _tar_keys(sub.out_dir, g) == sorted(table["key"])  # exactly its kept keys
            assert (table["punsafe"] <= SUBSETS[name]["max_punsafe"]).all()
            metas = glob.glob(f"{sub.out_dir}/{g}/embeddings/metadata/*.parquet")
            meta_keys = pd.concat([pq.read_table(m).to_pandas() for m in metas])["key"]
            assert sorted(meta_keys) == sorted(table["key"])
            embs = glob.glob(f"{sub.out_dir}/{g}/embeddings/img_emb/*.npy")
            assert sum(len(np.load(e)) for e in embs) == len(table)
            pd.testing.assert_frame_equal(
                read_dataset(run, g, subset=name).sort_values("key").reset_index(drop=True),
                table.sort_values("key").reset_index(drop=True),
            )
            keys |= set(table["key"])
        kept_keys[name] = keys
    # nesting: clean ⊆ research-safe ⊆ base
    assert kept_keys["clean"] < kept_keys["research-safe"] < kept_keys[""]
    # the top funnel.json lists the subsets; the base is where it always was
    top = json.loads(open(f"{report.out_dir}/funnel.json").read())
    assert top["kept"] == report.kept and set(top["subsets"]) == set(SUBSETS)
    assert top["subsets"]["clean"]["dropped"] == report.subsets["clean"].dropped
    assert materialized_subsets(run) == list(SUBSETS)
    with pytest.raises(FileNotFoundError, match="research-safe, clean"):
        read_dataset(run, "en", subset="research")


def test_base_output_is_the_same_with_or_without_subsets(run, client):
    with_subsets = materialize(run, FilterConfig(**LOOSE, subsets=SUBSETS), client=client)
    base_tables = {g: _read_group(run.join("dataset"), g) for g in schema.LANGUAGE_GROUPS}
    base_tars = {g: _tar_keys(run.join("dataset"), g) for g in schema.LANGUAGE_GROUPS}
    plain = materialize(run, FilterConfig(**LOOSE), client=client)
    assert (plain.kept, plain.dropped, plain.subsets) == (
        with_subsets.kept,
        with_subsets.dropped,
        {},
    )
    # the layout of today: no subset folders left over, funnel.json without a subsets entry
    assert sorted(p.rsplit("/", 1)[-1] for p in glob.glob(f"{plain.out_dir}/*")) == [
        "en",
        "funnel.json",
        "multi",
        "nolang",
        "thresholds.toml",
    ]
    funnel = json.loads(open(f"{plain.out_dir}/funnel.json").read())
    assert set(funnel) == {"rows_in", "kept", "dropped", "thresholds_fingerprint"}
    assert "subsets" not in open(f"{plain.out_dir}/thresholds.toml").read()
    assert materialized_subsets(run) == []
    for g in schema.LANGUAGE_GROUPS:
        pd.testing.assert_frame_equal(_read_group(plain.out_dir, g), base_tables[g])
        assert _tar_keys(plain.out_dir, g) == base_tars[g]


def test_subsets_from_a_thresholds_file(run, client, tmp_path):
    path = tmp_path / "thresholds.toml"
    path.write_text(
        "[filters]\nsimilarity_en = 0.15\nsimilarity_multi = 0.15\nsimilarity_nolang = 0.15\n"
        "max_punsafe = 0.95\n\n[filters.subsets.research-safe]\nmax_punsafe = 0.45\n"
    )
    report = materialize(run, str(path), client=client)
    assert list(report.subsets) == ["research-safe"]
    assert load_thresholds(f"{report.out_dir}/thresholds.toml") == load_thresholds(path)
    assert (
        len(read_dataset(run, "en", subset="research-safe"))
        == report.subsets["research-safe"].kept["en"]
    )


def test_each_scores_partition_is_read_once_for_all_subsets(tmp_path):
    """One pass: the partition function reads its scores (and embeddings) once, not per subset."""
    run = make_scored_run(tmp_path / "run", parts=1, rows=60)

    class CountingRun(RunDir):
        reads: list[str] = []

        def read_parquet(self, path, **kw):
            self.reads.append(path)
            return super().read_parquet(path, **kw)

    counting = CountingRun(run.path)
    cfg = FilterConfig(**LOOSE, subsets=SUBSETS)
    out = counting.join("dataset")
    result = _materialize_part(0, counting, cfg, out)
    assert set(result["subsets"]) == set(SUBSETS)
    scores_reads = [p for p in CountingRun.reads if "/scores/" in p]
    meta_reads = [p for p in CountingRun.reads if "/embeddings/metadata/" in p]
    assert scores_reads == [counting.part_path("scores", 0)]
    assert len(meta_reads) == 1
