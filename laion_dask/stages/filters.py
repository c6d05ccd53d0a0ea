"""Thresholds -> named drop reasons, over stored scores (never rescoring).

Used by ``explore`` (interactive what-if) and ``materialize`` (the real cut). A row's final
fate is the first reason along the pipeline:

1. the extraction rules' ``drop_reason`` (``bad_url_scheme`` ... ``duplicate``),
2. the download ``status`` when it is not ``success`` (``failed_to_download``, ``disallowed``, ...),
3. ``unscorable_image`` when CLIP could not decode the stored image,
   then ``near_duplicate`` for every member of a near-duplicate image group but its canonical
   one, when ``laion-dask index RUN --near-duplicates`` found them (``RUN/neardup``, joined per
   partition by :func:`laion_dask.products.knn.join_part_near_duplicates`),
4. the first failing threshold of :class:`~laion_dask.ground.config.FilterConfig`
(``filter_reason``).

``<NA>`` everywhere means kept, so rows in = kept + sum over reasons, always.

Output subsets (``[filters.subsets.NAME]``, :class:`~laion_dask.ground.config.SubsetConfig`) cut
on top of
that: a row's fate in a subset is its final reason above, then, for the rows it keeps, the
subset's own cut-offs (:data:`SUBSET_REASONS`, :func:`subset_final_reason`). So a subset only ever
moves kept rows to a reason, a stricter subset keeps a subset of a looser one's rows, and a row
dropped upstream (blocked, opted out, failed) is in none.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

from laion_dask.ground import schema
from laion_dask.ground.config import ConfigError, FilterConfig, SubsetConfig, config_to_dict

#: the column (bool) and the reason of an image that repeats a better one of its group
NEAR_DUPLICATE = "near_duplicate"

__all__ = [
    "NEAR_DUPLICATE",
    "FILTER_REASONS",
    "FINAL_REASON",
    "FILTER_REASON",
    "add_filter_reason",
    "final_reason",
    "add_final_reason",
    "SUBSET_REASONS",
    "subset_final_reason",
    "subset_final_reasons",
    "load_thresholds",
    "dump_thresholds",
    "similarity_threshold",
]

FILTER_REASON = "filter_reason"
FINAL_REASON = "final_reason"

#: the threshold filters, in the order they are checked (first failing one names the row)
FILTER_REASONS = (
    "text_too_short",
    "low_similarity",
    "unsafe",
    "watermark",
    "small_image",
    "extreme_aspect_ratio",
)

#: an output subset's own cut-offs, in the order they are checked on the rows ``[filters]``
#: keeps. ``unsafe`` / ``watermark`` are the base thresholds' names for the same cut; a subset
#: fails closed on a row without the score it cuts on (``missing_*``), unlike the base
#: thresholds, which treat a missing tag as no reason: a safety release must not keep a row it
#: cannot show passes.
SUBSET_REASONS = ("unsafe", "missing_punsafe", "watermark", "missing_pwatermark")


def similarity_threshold(groups: pd.Series, cfg: FilterConfig) -> np.ndarray:
    """Per-row similarity threshold from the row's language group."""
    g = groups.astype("string").fillna("nolang")
    return np.select(
        [g.eq("en").to_numpy(dtype=bool), g.eq("multi").to_numpy(dtype=bool)],
        [cfg.similarity_en, cfg.similarity_multi],
        default=cfg.similarity_nolang,
    ).astype("float32")


def add_filter_reason(df: pd.DataFrame, cfg: FilterConfig) -> pd.DataFrame:
    """Return ``df`` with ``filter_reason``: the first failing threshold, ``<NA>`` = passes.

    Rows without a similarity (never scored) get ``<NA>`` here: an upstream reason names them.
    """
    scored = df[schema.SIMILARITY].notna().to_numpy(dtype=bool)
    sim = df[schema.SIMILARITY].astype("float32").to_numpy(dtype="float32", na_value=np.nan)
    text_len = df[schema.TEXT].astype("string").str.len().fillna(0).to_numpy()
    w = _num(df, schema.ORIGINAL_WIDTH)
    h = _num(df, schema.ORIGINAL_HEIGHT)
    rules: dict[str, np.ndarray] = {
        "text_too_short": text_len < cfg.min_text_chars,
        "low_similarity": sim < similarity_threshold(df[schema.LANGUAGE_GROUP], cfg),
        "unsafe": _above(df, schema.PUNSAFE, cfg.max_punsafe),
        "watermark": _above(df, schema.PWATERMARK, cfg.max_pwatermark),
        "small_image": np.fmin(w, h) < cfg.min_side if cfg.min_side else np.zeros(len(df), bool),
        "extreme_aspect_ratio": (
            np.fmax(w, h) / np.fmax(np.fmin(w, h), 1) > cfg.max_aspect_ratio
            if cfg.max_aspect_ratio
            else np.zeros(len(df), bool)
        ),
    }
    reason = np.full(len(df), None, dtype=object)
    for name in reversed(FILTER_REASONS):  # first failing rule wins
        hit = np.asarray(rules[name], dtype=bool) & scored
        reason[hit] = name
    return df.assign(**{FILTER_REASON: pd.array(reason, dtype="string")})


def _num(df: pd.DataFrame, col: str) -> np.ndarray:
    return df[col].astype("Float64").to_numpy(dtype="float64", na_value=np.nan)


def _above(df: pd.DataFrame, col: str, limit: float | None) -> np.ndarray:
    if limit is None:
        return np.zeros(len(df), dtype=bool)
    values = _num(df, col)
    return np.nan_to_num(values, nan=-np.inf) > limit


def final_reason(df: pd.DataFrame) -> pd.Series:
    """The first reason along the pipeline (rules, download, scoring, filters); NA = kept."""
    reason = df[schema.DROP_REASON].astype("string")
    if schema.STATUS in df.columns:
        status = df[schema.STATUS].astype("string")
        reason = reason.fillna(status.mask(status.eq("success")))
    if schema.SCORE_STATUS in df.columns:
        sstat = df[schema.SCORE_STATUS].astype("string")
        failed = sstat.notna() & sstat.ne("success")
        unscorable = pd.Series(pd.NA, index=df.index, dtype="string").mask(
            failed, "unscorable_image"
        )
        reason = reason.fillna(unscorable)
    if NEAR_DUPLICATE in df.columns:
        near = df[NEAR_DUPLICATE].astype("boolean").fillna(False).to_numpy(dtype=bool)
        reason = reason.fillna(
            pd.Series(pd.NA, index=df.index, dtype="string").mask(near, NEAR_DUPLICATE)
        )
    if FILTER_REASON in df.columns:
        reason = reason.fillna(df[FILTER_REASON].astype("string"))
    return reason.rename(FINAL_REASON)


def add_final_reason(df: pd.DataFrame, cfg: FilterConfig) -> pd.DataFrame:
    """``add_filter_reason`` then ``final_reason`` as a column."""
    out = add_filter_reason(df, cfg)
    return out.assign(**{FINAL_REASON: final_reason(out)})


def subset_final_reason(df: pd.DataFrame, subset: SubsetConfig) -> pd.Series:
    """A row's fate in one output subset; ``<NA>`` = kept.

    Parameters
    ----------
    df : pandas.DataFrame
        Scored rows with ``final_reason`` (from :func:`add_final_reason`: the base thresholds).
    subset : SubsetConfig
        The subset's cut-offs, applied only to the rows ``final_reason`` keeps.

    Returns
    -------
    pandas.Series
        ``final_reason`` where it names a reason, else the first failing cut of
        :data:`SUBSET_REASONS`, else ``<NA>``; same index as ``df``, named ``final_reason``.
    """
    if FINAL_REASON not in df.columns:
        raise KeyError(f"{FINAL_REASON!r} is not a column: call add_final_reason(df, cfg) first")
    base = df[FINAL_REASON].astype("string")
    # copies: pandas may hand out read-only views
    reason = base.to_numpy(dtype=object, na_value=None).copy()
    open_ = base.isna().to_numpy(dtype=bool).copy()
    cuts = (
        (schema.PUNSAFE, subset.max_punsafe, "unsafe", "missing_punsafe"),
        (schema.PWATERMARK, subset.max_pwatermark, "watermark", "missing_pwatermark"),
    )
    for col, limit, above_name, missing_name in cuts:
        if limit is None:
            continue
        values = _num(df, col)
        missing = open_ & np.isnan(values)
        with np.errstate(invalid="ignore"):
            above = open_ & ~missing & (values > limit)
        reason[missing] = missing_name
        reason[above] = above_name
        open_ &= ~(missing | above)
    return pd.Series(pd.array(reason, dtype="string"), index=df.index, name=FINAL_REASON)


def subset_final_reasons(df: pd.DataFrame, cfg: FilterConfig) -> dict[str, pd.Series]:
    """:func:`subset_final_reason` for every subset of ``cfg`` (name -> reasons; ``{}`` when
    there are none); ``df`` must carry ``final_reason`` for ``cfg``."""
    return {name: subset_final_reason(df, sub) for name, sub in (cfg.subsets or {}).items()}


# --- thresholds.toml ----------------------------------------------------------------------------


def load_thresholds(path: str | Path, base: FilterConfig | None = None) -> FilterConfig:
    """Read ``thresholds.toml``: a ``[filters]`` table or bare keys; unknown keys are errors.

    ``[filters.subsets.NAME]`` tables are the output subsets; when the file has any, they
    replace ``base``'s (subsets are never merged one by one).
    """
    try:
        data: Mapping[str, Any] = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"thresholds file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    values = dict(data.get("filters", data))
    known = {f.name for f in dataclasses.fields(FilterConfig)}
    for key in values:
        if key not in known:
            raise ConfigError(f"filters.{key}: unknown key (known: {', '.join(sorted(known))})")
    base = base or FilterConfig()
    merged = {k: getattr(base, k) for k in known} | values
    return FilterConfig(**merged)


def dump_thresholds(cfg: FilterConfig, path: str | Path | None = None) -> str:
    """Write ``cfg`` as a ``[filters]`` table (what ``materialize --thresholds`` reads)."""
    from laion_dask.ground.config import PipelineConfig

    table = config_to_dict(PipelineConfig(filters=cfg))["filters"]
    text = "# laion-dask thresholds: applied to stored scores by `laion-dask materialize`\n"
    text += tomli_w.dumps({"filters": table})
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
