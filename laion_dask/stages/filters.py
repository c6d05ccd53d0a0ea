"""Thresholds -> named drop reasons, over stored scores (never rescoring): the one final-reason
engine that ``materialize``, ``explore`` and ``report`` all call.

A row's final fate is the first reason along the pipeline:

1. the extraction rules' ``drop_reason`` (``bad_url_scheme`` ... ``duplicate``),
2. the download ``status`` when it is not ``success`` (``failed_to_download``, ``disallowed``, ...),
3. ``unscorable_image`` when CLIP could not decode the stored image,
4. ``near_duplicate`` for every member of a near-duplicate image group but its canonical one,
   when ``laion-dask index RUN --near-duplicates`` found them (a ``near_duplicate`` column),
5. the first failing threshold of :class:`~laion_dask.ground.config.FilterConfig`
   (:data:`FILTER_RULES`, checked only on scored rows).

Steps 1-4 do not depend on thresholds (:data:`UPSTREAM_STEPS`); they are read once into
:class:`FateColumns` (small integer codes and the few numeric columns the rules read), and
:func:`decide` applies a threshold set to them in one vectorised numpy pass: what a dashboard
slider move costs. Adding a reason is one entry in :data:`FILTER_RULES` (a threshold) or
:data:`UPSTREAM_STEPS` (a threshold-free step). ``<NA>`` / code 0 means kept, so rows in =
kept + sum over reasons, always.

Output subsets (``[filters.subsets.NAME]``, :class:`~laion_dask.ground.config.SubsetConfig`) cut
on top of that: a row's fate in a subset is its final reason above, then, for the rows it keeps,
the subset's own cut-offs (:data:`SUBSET_REASONS`, :func:`subset_final_reason`). So a subset only
ever moves kept rows to a reason, a stricter subset keeps a subset of a looser one's rows, and a
row dropped upstream (blocked, opted out, failed) is in none.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import tomli_w

from laion_dask.ground import schema
from laion_dask.ground.config import (
    ConfigError,
    FilterConfig,
    PipelineConfig,
    SubsetConfig,
    config_to_dict,
    filters_table,
    refuse_unknown_keys,
)

#: the column (bool) and the reason of an image that repeats a better one of its group
NEAR_DUPLICATE = "near_duplicate"
UNSCORABLE = "unscorable_image"

__all__ = [
    "NEAR_DUPLICATE",
    "FILTER_RULES",
    "FILTER_REASONS",
    "UPSTREAM_STEPS",
    "FINAL_REASON",
    "FILTER_REASON",
    "TEXT_LENGTH",
    "UPSTREAM_REASON",
    "FateColumns",
    "Fate",
    "fate_columns",
    "decide",
    "upstream_reason",
    "add_final_reason",
    "SUBSET_REASONS",
    "subset_final_reason",
    "subset_final_reasons",
    "load_thresholds",
    "dump_thresholds",
    "similarity_threshold",
    "group_codes",
]

FILTER_REASON = "filter_reason"
FINAL_REASON = "final_reason"
#: precomputed columns :func:`fate_columns` reads when a frame has them (``explore`` keeps these
#: in memory instead of captions and four status columns)
TEXT_LENGTH = "text_length"
UPSTREAM_REASON = "upstream_reason"


@dataclass(frozen=True)
class FateColumns:
    """What decides a row's fate, one array entry per row (read once, decided many times).

    Attributes
    ----------
    upstream : numpy.ndarray
        ``int16`` code of the threshold-free reason (:data:`UPSTREAM_STEPS`): 0 = none (the
        row reaches the thresholds), ``i`` = ``upstream_names[i - 1]``.
    upstream_names : tuple of str
        The upstream reasons present, sorted.
    group : numpy.ndarray
        ``int8`` index into ``schema.LANGUAGE_GROUPS``; a missing or unknown group is ``nolang``
        (as the similarity cut treats it).
    text_len : numpy.ndarray
        Characters of the caption (``int32``, 0 when missing).
    similarity : numpy.ndarray
        ``float32``, NaN when the row was not scored (it then gets no threshold reason).
    punsafe, pwatermark, width, height : numpy.ndarray
        ``float64``, NaN when missing (width / height: the original image size).
    """

    upstream: np.ndarray
    upstream_names: tuple[str, ...]
    group: np.ndarray
    text_len: np.ndarray
    similarity: np.ndarray
    punsafe: np.ndarray
    pwatermark: np.ndarray
    width: np.ndarray
    height: np.ndarray

    def __len__(self) -> int:
        return len(self.upstream)

    @property
    def reasons(self) -> tuple[str, ...]:
        """Every reason a final code names: ``reasons[code - 1]`` (code 0 = kept)."""
        extra = tuple(r for r in FILTER_REASONS if r not in self.upstream_names)
        return self.upstream_names + extra


def _above(values: np.ndarray, limit: float | None) -> np.ndarray | None:
    # a missing tag is no reason (NaN > limit is False): the base thresholds treat tags as tags
    return None if limit is None else values > limit


def _small(c: FateColumns, cfg: FilterConfig) -> np.ndarray | None:
    return np.fmin(c.width, c.height) < cfg.min_side if cfg.min_side else None


def _aspect(c: FateColumns, cfg: FilterConfig) -> np.ndarray | None:
    if not cfg.max_aspect_ratio:
        return None
    long, short = np.fmax(c.width, c.height), np.fmax(np.fmin(c.width, c.height), 1)
    return long / short > cfg.max_aspect_ratio


#: the threshold filters, in the order they are checked (the first failing one names the row):
#: reason -> rows failing it (None: the rule is off)
FILTER_RULES: dict[str, Callable[[FateColumns, FilterConfig], np.ndarray | None]] = {
    "text_too_short": lambda c, cfg: c.text_len < cfg.min_text_chars,
    "low_similarity": lambda c, cfg: c.similarity < similarity_threshold(c.group, cfg),
    "unsafe": lambda c, cfg: _above(c.punsafe, cfg.max_punsafe),
    "watermark": lambda c, cfg: _above(c.pwatermark, cfg.max_pwatermark),
    "small_image": _small,
    "extreme_aspect_ratio": _aspect,
}
FILTER_REASONS = tuple(FILTER_RULES)

#: an output subset's own cut-offs, in the order they are checked on the rows ``[filters]``
#: keeps. ``unsafe`` / ``watermark`` are the base thresholds' names for the same cut; a subset
#: fails closed on a row without the score it cuts on (``missing_*``), unlike the base
#: thresholds, which treat a missing tag as no reason: a safety release must not keep a row it
#: cannot show passes.
SUBSET_REASONS = ("unsafe", "missing_punsafe", "watermark", "missing_pwatermark")


# --- reading a partition ------------------------------------------------------------------------


def _codes(s: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer codes (-1 = missing) and the names they stand for, of a string-like column."""
    if isinstance(s.dtype, pd.CategoricalDtype):  # explore's memory, Parquet dictionaries
        return s.cat.codes.to_numpy(), [str(v) for v in s.cat.categories]
    if s.dtype == "string[pyarrow]" or isinstance(s.dtype, pd.ArrowDtype):
        # Arrow's own encoder, same codes and order as pd.factorize: one report part (200k
        # rows, four columns) 6 ms against 20 ms through pandas
        enc = pc.dictionary_encode(pa.chunked_array(pa.array(s)).combine_chunks())
        return enc.indices.fill_null(-1).to_numpy(), [str(v) for v in enc.dictionary.to_pylist()]
    codes, names = pd.factorize(s, use_na_sentinel=True)
    return np.asarray(codes), [str(v) for v in names]


def _rule_step(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    return _codes(df[schema.DROP_REASON])


def _download_step(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    codes, names = _codes(df[schema.STATUS])
    if "success" in names:  # a downloaded row has no reason here
        codes = np.where(codes == names.index("success"), -1, codes)
    return codes, names


def _scoring_step(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    codes, names = _codes(df[schema.SCORE_STATUS])
    ok = names.index("success") if "success" in names else -2
    failed = (codes >= 0) & (codes != ok)
    return np.where(failed, 0, -1), [UNSCORABLE]


def _near_step(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    near = df[NEAR_DUPLICATE].astype("boolean").fillna(False).to_numpy(dtype=bool)
    return np.where(near, 0, -1), [NEAR_DUPLICATE]


#: the threshold-free steps in pipeline order: (column it needs, row -> reason code / -1 = none).
#: A frame without the column skips the step (a run before that stage).
UPSTREAM_STEPS: tuple[tuple[str, Callable[[pd.DataFrame], tuple[np.ndarray, list[str]]]], ...] = (
    (schema.DROP_REASON, _rule_step),
    (schema.STATUS, _download_step),
    (schema.SCORE_STATUS, _scoring_step),
    (NEAR_DUPLICATE, _near_step),
)


def _compact(codes: np.ndarray, names: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Codes ``-1..len(names)-1`` -> ``int16`` codes ``0..k`` over the names present, sorted."""
    present = np.bincount(codes + 1, minlength=len(names) + 1)[1:] > 0
    kept = sorted({names[i] for i in np.flatnonzero(present)})
    table = np.zeros(len(names) + 1, dtype=np.int16)  # slot 0: code -1 (no reason)
    for i, name in enumerate(names):
        if name in kept:
            table[i + 1] = kept.index(name) + 1
    return table[codes + 1], tuple(kept)


def _upstream(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """The first threshold-free reason of each row (:data:`UPSTREAM_STEPS`): codes, names."""
    out = np.full(len(df), -1, dtype=np.int32)
    names: list[str] = []
    for column, step in UPSTREAM_STEPS:
        if column not in df.columns:
            continue
        codes, step_names = step(df)
        index = np.array([_index(names, n) for n in step_names] or [0], dtype=np.int32)
        hit = (out < 0) & (codes >= 0)
        out[hit] = index[codes[hit]]
    return out, names


def _index(names: list[str], name: str) -> int:
    if name not in names:
        names.append(name)
    return names.index(name)


def upstream_reason(df: pd.DataFrame) -> pd.Series:
    """Each row's threshold-free reason (:data:`UPSTREAM_STEPS`), categorical; NA = none."""
    codes, names = _upstream(df)
    cat = pd.Categorical.from_codes(codes, categories=pd.Index(names, dtype="object"))
    return pd.Series(cat, index=df.index, name=UPSTREAM_REASON)


def group_codes(groups: pd.Series) -> np.ndarray:
    """``int8`` index into ``schema.LANGUAGE_GROUPS``; missing or unknown -> ``nolang``."""
    codes, names = _codes(groups)
    nolang = schema.LANGUAGE_GROUPS.index("nolang")
    table = [
        schema.LANGUAGE_GROUPS.index(n) if n in schema.LANGUAGE_GROUPS else nolang for n in names
    ]
    # the last slot answers code -1 (missing)
    return np.array([*table, nolang], dtype=np.int8)[codes]


def _num(s: pd.Series, dtype: str = "float64") -> np.ndarray:
    """A numeric column as ``dtype`` floats, NaN for missing (any pandas or Arrow dtype)."""
    if isinstance(s.dtype, np.dtype) and s.dtype.kind == "f":
        return s.to_numpy(dtype=dtype)
    return s.to_numpy(dtype=dtype, na_value=np.nan)


def fate_columns(df: pd.DataFrame) -> FateColumns:
    """Read what decides each row's fate from one partition (scores rows).

    ``df`` holds ``language_group``, ``similarity``, ``punsafe``, ``pwatermark``, the original
    sizes, the caption (``text``, or its length as ``text_length``) and the columns of
    :data:`UPSTREAM_STEPS` the run has (or their outcome as ``upstream_reason``, see
    :func:`upstream_reason`).
    """
    if UPSTREAM_REASON in df.columns:
        codes, names = _codes(df[UPSTREAM_REASON])
    else:
        codes, names = _upstream(df)
    up, up_names = _compact(codes, names)
    if TEXT_LENGTH in df.columns:
        text_len = df[TEXT_LENGTH].to_numpy(dtype="int32", na_value=0)
    else:
        text = df[schema.TEXT]
        text = text.astype("string") if text.dtype == object else text
        text_len = text.str.len().to_numpy(dtype="int32", na_value=0)
    return FateColumns(
        upstream=up,
        upstream_names=up_names,
        group=group_codes(df[schema.LANGUAGE_GROUP]),
        text_len=text_len,
        similarity=_num(df[schema.SIMILARITY], "float32"),
        punsafe=_num(df[schema.PUNSAFE]),
        pwatermark=_num(df[schema.PWATERMARK]),
        width=_num(df[schema.ORIGINAL_WIDTH]),
        height=_num(df[schema.ORIGINAL_HEIGHT]),
    )


# --- deciding -----------------------------------------------------------------------------------


class Fate(NamedTuple):
    """:func:`decide`'s answer: ``final`` code per row (0 = kept, ``i`` =
    ``reasons[i - 1]``) and ``filtered``, the index into :data:`FILTER_REASONS` of the first
    failing threshold (``len(FILTER_REASONS)`` = passes; unscored rows pass), whatever the
    upstream reason."""

    final: np.ndarray
    filtered: np.ndarray
    reasons: tuple[str, ...]

    def names(self, codes: np.ndarray | None = None) -> np.ndarray:
        """Final reasons as an object array (None = kept)."""
        codes = self.final if codes is None else codes
        return np.array([None, *self.reasons], dtype=object)[codes]


def similarity_threshold(groups: np.ndarray | pd.Series, cfg: FilterConfig) -> np.ndarray:
    """Per-row ``float32`` similarity threshold from the row's language group (codes from
    :func:`group_codes`, or the group names)."""
    codes = group_codes(groups) if isinstance(groups, pd.Series) else groups
    per_group = [cfg.similarity_for(g) for g in schema.LANGUAGE_GROUPS]
    return np.array(per_group, dtype="float32")[codes]


def decide(cols: FateColumns, cfg: FilterConfig) -> Fate:
    """Every row's final reason at ``cfg``: the upstream reason, else the first failing
    threshold of a scored row, else kept."""
    passes = len(FILTER_REASONS)
    filtered = np.full(len(cols), passes, dtype=np.int8)
    open_ = ~np.isnan(cols.similarity)  # only scored rows meet the thresholds
    with np.errstate(invalid="ignore", divide="ignore"):
        for i, rule in enumerate(FILTER_RULES.values()):
            hit = rule(cols, cfg)
            if hit is None:
                continue
            hit &= open_  # the first failing rule wins: later ones see the rows left
            filtered[hit] = i
            open_ &= ~hit
    reasons = cols.reasons
    # a threshold reason's final code (its place in ``reasons``); "passes" -> 0 (kept)
    table = np.array([reasons.index(r) + 1 for r in FILTER_REASONS] + [0], dtype=np.int16)
    final = table[filtered]
    np.copyto(final, cols.upstream, where=cols.upstream > 0)
    return Fate(final=final, filtered=filtered, reasons=reasons)


def add_final_reason(df: pd.DataFrame, cfg: FilterConfig) -> pd.DataFrame:
    """``df`` with ``filter_reason`` (the first failing threshold of a scored row) and
    ``final_reason`` (the first reason along the pipeline), ``<NA>`` = kept: :func:`decide`
    over :func:`fate_columns` as string columns."""
    fate = decide(fate_columns(df), cfg)
    filtered = np.array([*FILTER_REASONS, None], dtype=object)[fate.filtered]
    return df.assign(
        **{
            FILTER_REASON: pd.array(filtered, dtype="string"),
            FINAL_REASON: pd.array(fate.names(), dtype="string"),
        }
    )


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
        values = _num(df[col])
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
    # refuses a file that sets nothing, or keys outside [filters] that would be ignored
    values = filters_table(data, where=str(path))
    refuse_unknown_keys(FilterConfig, "filters", values)
    return dataclasses.replace(base or FilterConfig(), **values)


def dump_thresholds(cfg: FilterConfig, path: str | Path | None = None) -> str:
    """Write ``cfg`` as a ``[filters]`` table (what ``materialize --thresholds`` reads)."""
    table = config_to_dict(PipelineConfig(filters=cfg))["filters"]
    text = "# laion-dask thresholds: applied to stored scores by `laion-dask materialize`\n"
    text += tomli_w.dumps({"filters": table})
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
