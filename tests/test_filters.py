from __future__ import annotations

import dataclasses
import json
import pickle
import tomllib

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import (
    ConfigError,
    FilterConfig,
    PipelineConfig,
    SubsetConfig,
    config_from_dict,
    dump_config,
)
from laion_dask.stages.filters import (
    FILTER_REASON,
    FILTER_REASONS,
    FINAL_REASON,
    NEAR_DUPLICATE,
    SUBSET_REASONS,
    add_final_reason,
    decide,
    dump_thresholds,
    fate_columns,
    load_thresholds,
    subset_final_reason,
    subset_final_reasons,
    upstream_reason,
)
from tests.helpers.runs import scored_frame


@pytest.fixture
def df():
    return scored_frame(400, 0)


def add_filter_reason(df: pd.DataFrame, cfg: FilterConfig) -> pd.DataFrame:
    return add_final_reason(df, cfg).drop(columns=FINAL_REASON)


# --- the pandas oracle: the rule spelled out with pandas' own operations, independent of the
# engine's codes (this is what filters.py computed before it had one engine) ---------------------


def _oracle_num(df: pd.DataFrame, col: str) -> np.ndarray:
    return df[col].astype("Float64").to_numpy(dtype="float64", na_value=np.nan)


def oracle_filter_reason(df: pd.DataFrame, cfg: FilterConfig) -> pd.Series:
    g = df[schema.LANGUAGE_GROUP].astype("string").fillna("nolang")
    thr = np.select(
        [g.eq("en").to_numpy(dtype=bool), g.eq("multi").to_numpy(dtype=bool)],
        [cfg.similarity_en, cfg.similarity_multi],
        default=cfg.similarity_nolang,
    ).astype("float32")
    scored = df[schema.SIMILARITY].notna().to_numpy(dtype=bool)
    sim = df[schema.SIMILARITY].astype("float32").to_numpy(dtype="float32", na_value=np.nan)
    text_len = df[schema.TEXT].astype("string").str.len().fillna(0).to_numpy()
    w, h = _oracle_num(df, schema.ORIGINAL_WIDTH), _oracle_num(df, schema.ORIGINAL_HEIGHT)
    off = np.zeros(len(df), bool)

    def above(col, limit):
        return off if limit is None else np.nan_to_num(_oracle_num(df, col), nan=-np.inf) > limit

    with np.errstate(invalid="ignore", divide="ignore"):
        rules = {
            "text_too_short": text_len < cfg.min_text_chars,
            "low_similarity": sim < thr,
            "unsafe": above(schema.PUNSAFE, cfg.max_punsafe),
            "watermark": above(schema.PWATERMARK, cfg.max_pwatermark),
            "small_image": np.fmin(w, h) < cfg.min_side if cfg.min_side else off,
            "extreme_aspect_ratio": (
                np.fmax(w, h) / np.fmax(np.fmin(w, h), 1) > cfg.max_aspect_ratio
                if cfg.max_aspect_ratio
                else off
            ),
        }
    reason = np.full(len(df), None, dtype=object)
    for name in reversed(list(rules)):  # first failing rule wins
        reason[np.asarray(rules[name], dtype=bool) & scored] = name
    return pd.Series(pd.array(reason, dtype="string"), index=df.index, name=FILTER_REASON)


def oracle_final_reason(df: pd.DataFrame, cfg: FilterConfig) -> pd.Series:
    none = pd.Series(pd.NA, index=df.index, dtype="string")
    reason = df[schema.DROP_REASON].astype("string") if schema.DROP_REASON in df else none
    if schema.STATUS in df.columns:
        status = df[schema.STATUS].astype("string")
        reason = reason.fillna(status.mask(status.eq("success")))
    if schema.SCORE_STATUS in df.columns:
        sstat = df[schema.SCORE_STATUS].astype("string")
        reason = reason.fillna(none.mask(sstat.notna() & sstat.ne("success"), "unscorable_image"))
    if NEAR_DUPLICATE in df.columns:
        near = df[NEAR_DUPLICATE].astype("boolean").fillna(False).to_numpy(dtype=bool)
        reason = reason.fillna(none.mask(near, NEAR_DUPLICATE))
    return reason.fillna(oracle_filter_reason(df, cfg)).rename(FINAL_REASON)


def _random_frame(seed: int) -> pd.DataFrame:
    """Scored rows with every kind of gap: missing scores and tags, missing or unknown groups,
    missing captions and sizes, near-duplicates, statuses the lists do not know."""
    rng = np.random.default_rng(seed)
    df = scored_frame(300, seed % 5, seed=seed)
    n = len(df)

    def some(p):
        return rng.random(n) < p

    df.loc[some(0.1), schema.PUNSAFE] = np.nan
    df.loc[some(0.1), schema.PWATERMARK] = np.nan
    df.loc[some(0.05), schema.SIMILARITY] = np.nan  # a scored status without a score
    df.loc[some(0.05), schema.LANGUAGE_GROUP] = None
    df.loc[some(0.03), schema.LANGUAGE_GROUP] = "klingon"
    df.loc[some(0.05), schema.TEXT] = None
    df.loc[some(0.05), schema.TEXT] = "ab"
    df[schema.ORIGINAL_WIDTH] = df[schema.ORIGINAL_WIDTH].astype("Int32")
    df.loc[some(0.05), schema.ORIGINAL_WIDTH] = pd.NA
    df.loc[some(0.02), schema.ORIGINAL_HEIGHT] = 0
    df.loc[some(0.02), schema.STATUS] = "weird_new_status"
    if seed % 2:
        df[NEAR_DUPLICATE] = pd.array(np.where(some(0.1), True, None), dtype="boolean")
    if seed % 3 == 0:
        df = df.drop(columns=[schema.SCORE_STATUS])
    return df


_RANDOM_CONFIGS = [
    FilterConfig(),
    FilterConfig(similarity_en=0.3, similarity_multi=0.2, similarity_nolang=0.4, max_punsafe=0.5),
    FilterConfig(max_pwatermark=0.3, min_side=300, max_aspect_ratio=1.5, min_text_chars=25),
    FilterConfig(
        similarity_en=-1.0, similarity_multi=1.0, max_punsafe=0.0, max_pwatermark=1.0, min_side=1
    ),
]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("cfg", _RANDOM_CONFIGS, ids=range(len(_RANDOM_CONFIGS)))
def test_engine_equals_the_pandas_oracle(seed, cfg):
    df = _random_frame(seed)
    out = add_final_reason(df, cfg)
    pd.testing.assert_series_equal(out[FINAL_REASON], oracle_final_reason(df, cfg))
    pd.testing.assert_series_equal(out[FILTER_REASON], oracle_filter_reason(df, cfg))
    # the codes say the same: 0 = kept, else reasons[code - 1]; the filter codes too
    fate = decide(fate_columns(df), cfg)
    names = np.array([None, *fate.reasons], dtype=object)[fate.final]
    assert pd.array(names, dtype="string").tolist() == out[FINAL_REASON].tolist()
    assert len(set(fate.reasons)) == len(fate.reasons)
    filt = np.array([*FILTER_REASONS, None], dtype=object)[fate.filtered]
    assert pd.array(filt, dtype="string").tolist() == out[FILTER_REASON].tolist()


@pytest.mark.parametrize("seed", range(4))
def test_engine_on_precomputed_columns_equals_the_oracle(seed):
    """What explore holds (caption length, upstream reason as categoricals) decides the same."""
    df = _random_frame(seed)
    cfg = _RANDOM_CONFIGS[seed % len(_RANDOM_CONFIGS)]
    slim = df.drop(columns=[schema.TEXT, schema.DROP_REASON, schema.STATUS]).assign(
        text_length=df[schema.TEXT].astype("string").str.len().fillna(0).astype("int32"),
        upstream_reason=upstream_reason(df),
        language_group=df[schema.LANGUAGE_GROUP].astype("category"),
    )
    fate = decide(fate_columns(slim), cfg)
    expect = oracle_final_reason(df, cfg)
    assert pd.array(fate.names(), dtype="string").tolist() == expect.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_subsets_over_the_engine_equal_the_oracle(seed):
    df = _random_frame(seed)
    cfg = FilterConfig(
        similarity_en=0.15,
        similarity_multi=0.15,
        similarity_nolang=0.15,
        subsets={"research-safe": {"max_punsafe": 0.45}, "clean": {"max_pwatermark": 0.5}},
    )
    got = subset_final_reasons(add_final_reason(df, cfg), cfg)
    base = oracle_final_reason(df, cfg)
    for name, cut in (("research-safe", {"max_punsafe": 0.45}), ("clean", {"max_pwatermark": 0.5})):
        expect = _expected_subset_reason(df, cfg, **cut, base=base)
        pd.testing.assert_series_equal(got[name], expect)


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


def test_upstream_reason_without_download_columns():
    df = pd.DataFrame({schema.DROP_REASON: pd.array([None, "duplicate"], dtype="string")})
    assert upstream_reason(df).astype("string").tolist() == [pd.NA, "duplicate"]


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


# --- output subsets ------------------------------------------------------------------------


def _expected_subset_reason(df, base_cfg, max_punsafe=None, max_pwatermark=None, base=None):
    """A row's fate in a subset, spelled out row by row (independent of filters.py's numpy)."""
    if base is None:
        base = add_final_reason(df, base_cfg)[FINAL_REASON]
    out = []
    for i, reason in enumerate(base):
        if not pd.isna(reason):
            out.append(reason)
            continue
        p = df[schema.PUNSAFE].iloc[i]
        w = df[schema.PWATERMARK].iloc[i]
        if max_punsafe is not None and pd.isna(p):
            out.append("missing_punsafe")
        elif max_punsafe is not None and p > max_punsafe:
            out.append("unsafe")
        elif max_pwatermark is not None and pd.isna(w):
            out.append("missing_pwatermark")
        elif max_pwatermark is not None and w > max_pwatermark:
            out.append("watermark")
        else:
            out.append(None)
    return pd.Series(out, index=df.index, dtype="string", name=FINAL_REASON)


def test_subsets_cut_only_the_rows_the_base_keeps(df):
    base = FilterConfig(similarity_en=0.15, similarity_multi=0.15, similarity_nolang=0.15)
    # rows the base keeps, some without the score a subset cuts on (missing tags pass the base)
    df = df.copy()
    kept = df.index[add_final_reason(df, base)[FINAL_REASON].isna().to_numpy(bool)]
    df.loc[kept[:4], schema.PUNSAFE] = np.nan
    low = kept[4:][df.loc[kept[4:], schema.PUNSAFE].lt(0.3).to_numpy(bool)]
    df.loc[low[:3], schema.PWATERMARK] = np.nan
    cfg = dataclasses.replace(
        base,
        max_punsafe=0.95,
        subsets={
            "research-safe": {"max_punsafe": 0.45},
            "clean": {"max_punsafe": 0.3, "max_pwatermark": 0.6},
        },
    )
    out = add_final_reason(df, cfg)
    got = subset_final_reasons(out, cfg)
    assert list(got) == ["research-safe", "clean"]
    safe = _expected_subset_reason(df, cfg, max_punsafe=0.45)
    clean = _expected_subset_reason(df, cfg, max_punsafe=0.3, max_pwatermark=0.6)
    pd.testing.assert_series_equal(got["research-safe"], safe)
    pd.testing.assert_series_equal(got["clean"], clean)
    # every reason the base names stays; a subset only moves kept rows to its own reasons
    named = out[FINAL_REASON].notna()
    assert (got["clean"][named] == out[FINAL_REASON][named]).all()
    moved = set(got["clean"][~named].dropna())
    assert moved <= set(SUBSET_REASONS)
    assert {"unsafe", "missing_punsafe", "watermark", "missing_pwatermark"} <= moved
    # a stricter subset keeps a subset of a looser one's rows, which keeps a subset of the base's
    kept = {k: v.isna().to_numpy(bool) for k, v in got.items()}
    base_kept = out[FINAL_REASON].isna().to_numpy(bool)
    assert (~kept["clean"] | kept["research-safe"]).all()
    assert (~kept["research-safe"] | base_kept).all()
    assert kept["clean"].sum() < kept["research-safe"].sum() < base_kept.sum()
    # a row dropped upstream (rules, download, scoring) is in no subset
    upstream = df[schema.SCORE_STATUS].ne("success").fillna(True).to_numpy(bool)
    assert not (kept["research-safe"] & upstream).any()


def test_subset_reason_needs_the_base_reason(df):
    with pytest.raises(KeyError, match="add_final_reason"):
        subset_final_reason(df, SubsetConfig(max_punsafe=0.5))
    assert subset_final_reasons(add_final_reason(df, FilterConfig()), FilterConfig()) == {}


def test_thresholds_toml_round_trip_with_subsets(tmp_path):
    path = tmp_path / "thresholds.toml"
    path.write_text(
        "[filters]\nsimilarity_en = 0.3\nmax_punsafe = 0.95\n\n"
        "[filters.subsets.research-safe]\nmax_punsafe = 0.45\n\n"
        "[filters.subsets.no_watermarks]\nmax_pwatermark = 0.8\n"
    )
    cfg = load_thresholds(path)
    assert cfg.subsets == {
        "research-safe": SubsetConfig(max_punsafe=0.45),
        "no_watermarks": SubsetConfig(max_pwatermark=0.8),
    }
    assert list(cfg.subsets) == ["research-safe", "no_watermarks"]  # file order is kept
    again = tmp_path / "again.toml"
    dump_thresholds(cfg, again)
    assert load_thresholds(again) == cfg
    assert "[filters.subsets.research-safe]" in again.read_text()
    # the whole run config too, and without subsets the TOML has no trace of them
    pipeline = PipelineConfig(filters=cfg)
    assert config_from_dict(tomllib.loads(dump_config(pipeline))) == pipeline
    assert "subsets" not in dump_thresholds(FilterConfig())
    assert FilterConfig(subsets={}) == FilterConfig()  # no subsets, however spelled
    # a file without subsets keeps the base's; one with subsets replaces them
    path.write_text("[filters]\nsimilarity_en = 0.2\n")
    assert load_thresholds(path, base=cfg).subsets == cfg.subsets


def test_config_with_subsets_stays_frozen_and_hashable():
    cfg = FilterConfig(subsets={"research-safe": {"max_punsafe": 0.45}})
    assert hash(cfg) == hash(
        FilterConfig(subsets={"research-safe": SubsetConfig(max_punsafe=0.45)})
    )
    assert {cfg: 1}[dataclasses.replace(cfg)] == 1
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(TypeError, match="read-only"):
        cfg.subsets["other"] = SubsetConfig(max_punsafe=0.1)  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.subsets["research-safe"].max_punsafe = 0.9  # type: ignore[misc]
    # the dict report.py writes to stats.json
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))["subsets"] == {
        "research-safe": {"max_punsafe": 0.45, "max_pwatermark": None}
    }


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (
            "[filters.subsets.research-safe]\nmax_punsafe = 1.5\n",
            "filters.subsets.research-safe.max_punsafe",
        ),
        (
            "[filters.subsets.research-safe]\nmax_punsafe = true\n",
            "filters.subsets.research-safe.max_punsafe",
        ),
        (
            "[filters.subsets.research-safe]\nmax_pwatermark = -0.1\n",
            "filters.subsets.research-safe.max_pwatermark",
        ),
        (
            "[filters.subsets.research-safe]\nmax_unsafe = 0.4\n",
            "filters.subsets.research-safe.max_unsafe: unknown key",
        ),
        ("[filters.subsets.empty]\n", "filters.subsets.empty: sets no cut-off"),
        ("[filters.subsets]\nflat = 0.4\n", "filters.subsets.flat: must be a table"),
        ("[filters]\nsubsets = 0.4\n", "filters.subsets: must be a table of tables"),
        ("[filters.subsets.en]\nmax_punsafe = 0.4\n", "filters.subsets.en: is a language group"),
        ("[filters.subsets.Safe]\nmax_punsafe = 0.4\n", "filters.subsets.Safe: a subset name"),
        (
            "[filters.subsets.'../up']\nmax_punsafe = 0.4\n",
            r"filters.subsets.\.\./up: a subset name",
        ),
        ("[filters.subsets.'a b']\nmax_punsafe = 0.4\n", "filters.subsets.a b: a subset name"),
        ("[filters.subsets.-x]\nmax_punsafe = 0.4\n", "filters.subsets.-x: a subset name"),
    ],
)
def test_bad_subsets_name_the_key(tmp_path, table, match):
    path = tmp_path / "thresholds.toml"
    path.write_text(table)
    with pytest.raises(ConfigError, match=match):
        load_thresholds(path)
    with pytest.raises(ConfigError, match=match):  # the run config's [filters] says the same
        config_from_dict(tomllib.loads(table))


def test_load_thresholds_refuses_what_cannot_be_meant(tmp_path):
    """The Python API refuses what the CLI does: a file setting nothing, keys outside [filters]."""
    from laion_dask.ground.config import ConfigError
    from laion_dask.stages.filters import load_thresholds

    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing\n")
    stray = tmp_path / "stray.toml"
    stray.write_text("similarity_multi = 0.1\n[filters]\nsimilarity_en = 0.3\n")
    with pytest.raises(ConfigError, match="sets no threshold"):
        load_thresholds(empty)
    with pytest.raises(ConfigError, match="outside the \\[filters\\] table"):
        load_thresholds(stray)
    whole = tmp_path / "config.toml"  # a run's whole config.toml still works
    whole.write_text("[download]\nimage_size = 128\n[filters]\nsimilarity_en = 0.3\n")
    assert load_thresholds(whole).similarity_en == 0.3
