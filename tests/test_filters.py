from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from laion_dask import schema
from laion_dask.config import ConfigError, FilterConfig
from laion_dask.filters import (
    FILTER_REASON,
    FINAL_REASON,
    add_filter_reason,
    add_final_reason,
    dump_thresholds,
    final_reason,
    load_thresholds,
)
from tests.helpers.runs import scored_frame


@pytest.fixture
def df():
    return scored_frame(400, 0)


def test_thresholds_per_language_group(df):
    cfg = FilterConfig(similarity_en=0.3, similarity_multi=0.2, similarity_nolang=0.4)
    out = add_filter_reason(df, cfg)
    scored = df[schema.SIMILARITY].notna()
    thr = df[schema.LANGUAGE_GROUP].map({"en": 0.3, "multi": 0.2, "nolang": 0.4}).astype(float)
    expect_low = scored & (df[schema.SIMILARITY].astype(float) < thr)
    got_low = out[FILTER_REASON].eq("low_similarity").fillna(False)
    # text is long enough in this frame, so low similarity is the first failing filter
    assert (got_low == expect_low).all()
    assert out[FILTER_REASON][~scored].isna().all()


def test_counts_add_up_and_input_unchanged(df):
    before = df.copy()
    out = add_final_reason(df, FilterConfig(max_punsafe=0.5, min_side=100, max_aspect_ratio=3))
    pd.testing.assert_frame_equal(df, before)
    kept = out[FINAL_REASON].isna().sum()
    dropped = out[FINAL_REASON].value_counts().sum()
    assert kept + dropped == len(df)
    reasons = set(out[FINAL_REASON].dropna())
    assert {"text_too_short", "duplicate", "failed_to_download", "unscorable_image"} <= reasons
    assert {"low_similarity", "unsafe", "small_image"} <= reasons


def test_first_reason_along_the_pipeline_wins(df):
    out = add_final_reason(
        df, FilterConfig(similarity_en=1.0, similarity_multi=1.0, similarity_nolang=1.0)
    )
    rules = df[schema.DROP_REASON].notna()
    assert (out[FINAL_REASON][rules] == df[schema.DROP_REASON][rules]).all()
    # every scored row fails similarity 1.0
    scored = df[schema.SCORE_STATUS].eq("success").fillna(False)
    assert out[FINAL_REASON][scored].eq("low_similarity").all()


def test_tag_only_by_default(df):
    out = add_filter_reason(df, FilterConfig())
    assert not out[FILTER_REASON].isin(["unsafe", "watermark"]).any()


def test_looser_thresholds_keep_a_superset(df):
    strict = add_final_reason(df, FilterConfig(similarity_en=0.35))[FINAL_REASON].isna()
    loose = add_final_reason(df, FilterConfig(similarity_en=0.2))[FINAL_REASON].isna()
    assert (loose | ~strict).all()
    assert loose.sum() > strict.sum()


def test_dask_equals_pandas(df, client):
    cfg = FilterConfig(max_pwatermark=0.8)
    expect = add_final_reason(df, cfg)
    meta = add_final_reason(df.iloc[:0], cfg)
    got = dd.from_pandas(df, npartitions=3).map_partitions(add_final_reason, cfg, meta=meta)
    pd.testing.assert_frame_equal(got.compute().reset_index(drop=True), expect)


def test_final_reason_without_download_columns():
    df = pd.DataFrame({schema.DROP_REASON: pd.array([None, "duplicate"], dtype="string")})
    assert final_reason(df).tolist() == [pd.NA, "duplicate"]


def test_thresholds_toml_round_trip(tmp_path):
    cfg = FilterConfig(similarity_en=0.31, max_punsafe=0.45, min_side=64)
    path = tmp_path / "thresholds.toml"
    dump_thresholds(cfg, path)
    assert load_thresholds(path) == cfg
    path.write_text("similarity_en = 0.3\n")  # bare keys are accepted too
    assert load_thresholds(path).similarity_en == 0.3
    path.write_text("[filters]\nsimilarity_eng = 0.3\n")
    with pytest.raises(ConfigError, match="filters.similarity_eng"):
        load_thresholds(path)
    path.write_text("[filters]\nsimilarity_en = 3\n")
    with pytest.raises(ConfigError, match="filters.similarity_en"):
        load_thresholds(path)


def test_missing_tag_is_not_a_cut_reason():
    df = scored_frame(50, 1)
    df.loc[df.index[:5], schema.PUNSAFE] = np.nan
    out = add_filter_reason(df, FilterConfig(max_punsafe=0.0))
    assert out.loc[df.index[:5], FILTER_REASON].ne("unsafe").all()
