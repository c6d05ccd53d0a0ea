"""Dataset statistics of a run: ``RUN/report/stats.json``, ``report.html`` and ``report.md``.

Statistics are computed per scores partition by :func:`partition_summary` (a plain function over
one pandas frame, returning a small mergeable dict, see :mod:`laion_dask.sketches`), run on the
cluster one task per partition and merged with a tree reduce of those dicts: rows never travel
to the client, and every merged object has a bounded size whatever the row count.

- Histograms have fixed bins (:data:`HISTOGRAMS`); quantiles come from the merged counts and are
  within ``quantile_error`` (one bin width; a factor for log bins) of the exact order statistic
  (ranks in the under/overflow report the min/max).
- Counts of low-cardinality values (languages, groups, rule reasons, statuses, final reasons)
  are exact. Every value is counted as it is: a status or reason no list knows is counted under
  its own name, never dropped.
- Domains are Misra-Gries heavy-hitter summaries (:data:`DOMAIN_CAPACITY` counters): each count
  is a lower bound at most ``domains.sketch.max_undercount`` below the true one (0 = exact, the
  case while a run has fewer distinct domains than the capacity); distinct domains are
  k-minimum-values estimates (exact below :data:`DISTINCT_K`).

``stats.json`` schema (``schema_version`` 2)::

    schema_version   2
    run              path, input_files, config (resolved, as dict), model, clip_resolved,
                     versions {package: version}, stages {extract|download|score:
                     {partitions, rows, seconds, rows_per_second[, bytes, bytes_per_second]}}
                     (from the _done markers), generated_at (UTC ISO time)
    thresholds       source ("RUN/dataset/thresholds.toml" or "config"), values {FilterConfig}
    rows, partitions candidate rows (every row of RUN/scores) and scores partitions
    funnel           table [{stage, outcome, rows}] and checks {stage: bool} from stats.funnel,
                     final {rows_in, kept {group: n}, dropped {reason: n}, adds_up},
                     by_group {group: {reason|"kept": n}} (final reason of every row),
                     consent {reasons {reason: n}, rows, share}: the "consent and safety"
                     group, final reasons matching CONSENT_PATTERN (opt-outs, robots, TDM
                     reservations, block lists, refused addresses); the schema's names are
                     listed even at 0
    stages           rules {reason|"kept": n}, download {status: n} (attempted rows),
                     score {status: n} (downloaded rows), filters {reason|"passed": n} (scored)
    languages        top [[lang, n]] (30), rest, distinct, groups {group: n},
                     kept_top [[lang, n]] (30), kept_rest, kept_groups {group: n}
    histograms       name -> {population, edges, counts, under, over, missing, n, sum, mean,
                     min, max, quantiles {"p01".."p99": value}, quantile_error {"abs": width}
                     or {"rel": factor - 1}, threshold?}; names in HISTOGRAMS
    above_cutoff     punsafe|pwatermark -> {cutoff, source ("filters"|"reference"), rows, scored,
                     share}
    domains          top_candidates, top_images (downloaded), top_kept [[domain, n]] (30) with
                     distinct_* and rest_* (rows not in the top list) counts; sketch {kind
                     "misra_gries", capacity, max_undercount {candidates|images|kept|failed: n},
                     exact {...: bool}, distinct_kind "kmv", distinct_k, distinct_exact {...}}
    download_failures by_status {status: n}, by_http_status {code|"none": n},
                     by_domain [[domain, n]] (20, a lower bound within
                     domains.sketch.max_undercount.failed), rest_by_domain
    duplicates       {rows, rate} (rule reason "duplicate" over candidate rows)
    samples          random|threshold -> {group: [{key, shard, text, url, language,
                     similarity, prio}]}: 8 kept rows per group by LAION's row hash, and 8
                     scored rows per group nearest the group's similarity threshold

Example
-------
>>> stats = build_stats("demo-run", client=client)          # doctest: +SKIP
>>> paths = write_report("demo-run", stats, formats=("html", "md"), client=client)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import html
import io
import json
import logging
import re
import sys
import threading
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import schema
from .config import FilterConfig, config_to_dict
from .filters import (
    FILTER_REASONS,
    FINAL_REASON,
    NEAR_DUPLICATE,
    load_thresholds,
)
from .rundir import RunDir
from .sketches import (
    HistSpec,
    Workspace,
    bincount,
    distinct_estimate,
    distinct_sketch,
    heavy_hitters,
    histogram,
    int_histogram,
    merge_all,
    quantiles,
    top_k,
)

log = logging.getLogger(__name__)

__all__ = [
    "HISTOGRAMS",
    "SCHEMA_VERSION",
    "DOMAIN_CAPACITY",
    "DISTINCT_K",
    "CONSENT_PATTERN",
    "is_consent",
    "partition_summary",
    "summarize_run",
    "finalize",
    "build_stats",
    "render_html",
    "render_markdown",
    "write_report",
    "url_domain",
    "fast_final_reason",
    "main",
]

SCHEMA_VERSION = 2
TOP_LANGUAGES = 30
TOP_DOMAINS = 30
TOP_FAILED_DOMAINS = 20
SAMPLES_PER_GROUP = 8
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
#: reference cut-offs when the filters keep punsafe / pwatermark as tags only (LAION-5B's)
REFERENCE_CUTOFFS = {"punsafe": 0.5, "pwatermark": 0.8}

#: name -> (population, fixed bins); populations: scored_<group>, scored, downloaded,
#: candidates, kept. Quantiles are within one bin width (``quantile_error`` in stats.json).
HISTOGRAMS: dict[str, tuple[str, HistSpec]] = {
    "similarity_en": ("scored_en", HistSpec(-1.0, 1.0, 2000)),
    "similarity_multi": ("scored_multi", HistSpec(-1.0, 1.0, 2000)),
    "similarity_nolang": ("scored_nolang", HistSpec(-1.0, 1.0, 2000)),
    "punsafe": ("scored", HistSpec(0.0, 1.0, 1000)),
    "pwatermark": ("scored", HistSpec(0.0, 1.0, 1000)),
    "original_width": ("downloaded", HistSpec(0, 4096, 512)),
    "original_height": ("downloaded", HistSpec(0, 4096, 512)),
    "aspect_ratio": ("downloaded", HistSpec(0.0, 5.0, 500)),
    "stored_width": ("downloaded", HistSpec(0, 4096, 512)),
    "stored_height": ("downloaded", HistSpec(0, 4096, 512)),
    "original_bytes": ("downloaded", HistSpec(100.0, 1e8, 300, log=True)),
    "caption_chars": ("candidates", HistSpec(0, 1000, 1000)),
    "caption_words": ("candidates", HistSpec(0, 200, 200)),
    "caption_chars_kept": ("kept", HistSpec(0, 1000, 1000)),
    "caption_words_kept": ("kept", HistSpec(0, 200, 200)),
}
#: bars a histogram plot shows at most (adjacent bins are summed for the plot only)
PLOT_BINS = 200
#: counters per domain heavy-hitter summary: counts are exact while a run has fewer distinct
#: domains (per population), else lower bounds within ``max_undercount`` (stats.json)
DOMAIN_CAPACITY = 4096
#: hashes per distinct-domain sketch: exact below this many distinct domains, else about 1.6 %
#: relative standard error
DISTINCT_K = 4096
#: domain populations with a distinct count
DISTINCT_DOMAINS = ("candidates", "images", "kept")

#: columns of RUN/scores the report reads
COLUMNS = [
    schema.URL,
    schema.TEXT,
    schema.HASH,
    schema.LANGUAGE,
    schema.LANGUAGE_GROUP,
    schema.DROP_REASON,
    schema.STATUS,
    schema.HTTP_STATUS,
    schema.ORIGINAL_WIDTH,
    schema.ORIGINAL_HEIGHT,
    schema.WIDTH,
    schema.HEIGHT,
    schema.ORIGINAL_BYTES,
    schema.KEY,
    schema.SHARD,
    schema.SIMILARITY,
    schema.PUNSAFE,
    schema.PWATERMARK,
    schema.SCORE_STATUS,
]

_DOMAIN_RE = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]]*\]|[^/:?#]*)"
#: the same host for URLs without ``@`` and ``[`` (RE2 runs it without the optional group)
_FAST_HOST_RE = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?P<host>[^/:?#]*)"


#: what names a consent or safety drop (a reason or a download status): opt-outs (robots meta,
#: robots.txt, X-Robots-Tag ``disallowed``, TDM reservations), user opt-out and block lists, and
#: addresses the downloader refuses; ``blocked_extension`` is a file-type rule, not one of them
CONSENT_PATTERN = re.compile(
    r"disallowed|robots|tdm|opt_?out|opted|blocklist|blocked_(?!extension\b)", re.IGNORECASE
)


def is_consent(reason: str) -> bool:
    """Whether a final reason counts in the funnel's "consent and safety" group: one of
    ``schema.CONSENT_STATUSES`` or a name :data:`CONSENT_PATTERN` matches."""
    return reason in getattr(schema, "CONSENT_STATUSES", ()) or bool(CONSENT_PATTERN.search(reason))


# --- per partition --------------------------------------------------------------------------------


def _arrow_strings(s: pd.Series) -> Any:
    """The Arrow string array behind ``s`` (zero-copy for pandas' Arrow-backed strings)."""
    import pyarrow as pa

    arr = pa.array(s.astype("string"))
    return (
        arr
        if pa.types.is_large_string(arr.type) or pa.types.is_string(arr.type)
        else (arr.cast(pa.large_string()))
    )


def _rows_with_bytes(arr: Any, chars: bytes) -> np.ndarray:
    """Which rows of a large string array contain any of the bytes ``chars`` (on the buffer)."""
    n = len(arr)
    out = np.zeros(n, dtype=bool)
    if not n or arr.buffers()[2] is None:
        return out
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    raw = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    found = []
    step = 1 << 15  # 32 KB slices: small temporaries (no fresh pages in a Dask worker)
    hit = np.empty(min(step, raw.size), dtype=bool)
    eq = np.empty_like(hit)
    for i in range(0, raw.size, step):
        part = raw[i : i + step]
        h, e = hit[: part.size], eq[: part.size]
        h[:] = False
        for c in chars:
            h |= np.equal(part, c, out=e)
        if h.any():
            found.append(np.flatnonzero(h) + i)
    pos = np.concatenate(found) + offsets[0] if found else np.zeros(0, np.int64)
    if pos.size:
        rows = np.searchsorted(offsets, pos, side="right") - 1
        out[rows] = True
    if arr.null_count:
        out &= np.asarray(arr.is_valid())
    return out


def _raw_hosts(urls: pd.Series) -> Any:
    """Host of each URL as :data:`_DOMAIN_RE` captures it (null when it does not match).

    Fast path: URLs with neither ``@`` nor ``[`` (no userinfo, no IPv6 literal) take
    :data:`_FAST_HOST_RE`, whose host is then the full pattern's; the others take
    :data:`_DOMAIN_RE` itself.
    """
    import pyarrow.compute as pc

    arr = _str_array(urls)
    host = pc.struct_field(pc.extract_regex(arr, pattern=_FAST_HOST_RE), [0])
    odd = _rows_with_bytes(arr, b"@[")
    if odd.any():
        slow = pc.struct_field(pc.extract_regex(arr.filter(odd), pattern=_DOMAIN_RE), [0])
        host = pc.replace_with_mask(host, odd, slow.cast(host.type))
    return host


def _domains(urls: pd.Series) -> Any:
    """Lower-cased host of each URL as an Arrow string array (``<none>`` when there is none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    host = pc.utf8_lower(_raw_hosts(urls))
    host = pc.if_else(pc.equal(host, ""), pa.scalar(None, host.type), host)
    return host.fill_null("<none>")


def url_domain(urls: pd.Series) -> pd.Series:
    """Lower-cased host of each URL (``<none>`` when there is none), vectorized with Arrow."""
    return pd.Series(_domains(urls).to_pylist(), index=urls.index, dtype="string")


def _num(df: pd.DataFrame, col: str) -> np.ndarray:
    s = df[col]
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype="float64", na_value=np.nan)  # no Float64 copy in between
    return s.astype("Float64").to_numpy(dtype="float64", na_value=np.nan)


def _f32(df: pd.DataFrame, col: str) -> np.ndarray:
    """A float column as float32 (NaN = missing) when it is float32 already, else float64."""
    s = df[col]
    if s.dtype == np.float32:
        return s.to_numpy()
    return _num(df, col)


def _col_values(df: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(values, valid)``: an integer column as its own integers (missing rows 0) and which rows
    have a value; any other as float64 with NaN for missing (``valid`` None). No float64 copy of
    an integer column: a large temporary costs fresh pages in a Dask worker."""
    s = df[col]
    dtype = s.dtype
    if pd.api.types.is_integer_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
        native = getattr(dtype, "numpy_dtype", dtype)
        return s.to_numpy(dtype=native, na_value=0), s.notna().to_numpy(dtype=bool)
    return _num(df, col), None


def _as_float(values: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    x = values.astype("float64")
    if valid is not None:
        x[~valid] = np.nan
    return x


def _aspect(
    w: tuple[np.ndarray, np.ndarray | None],
    h: tuple[np.ndarray, np.ndarray | None],
    mask: np.ndarray,
) -> np.ndarray:
    """Width / height (float64, NaN without a positive height) of the rows under ``mask``."""
    wf = _as_float(w[0][mask], None if w[1] is None else w[1][mask])
    hf = _as_float(h[0][mask], None if h[1] is None else h[1][mask])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(hf > 0, wf / hf, np.nan)


def _hist(
    values: np.ndarray,
    valid: np.ndarray | None,
    spec: HistSpec,
    mask: np.ndarray | None,
    ws: Workspace,
) -> dict[str, Any]:
    """Histogram of ``values[mask]``: integer values (``valid`` marks the rows that have one)
    on integer edges by ``bincount`` (:func:`~laion_dask.sketches.int_histogram`), any other as
    ``numpy.histogram`` bins them (NaN = missing)."""
    if np.issubdtype(values.dtype, np.integer) and spec.integer_step is not None:
        return int_histogram(values, spec, valid, mask, ws)
    return histogram(values, spec, mask, valid, ws)


def _rows_with_unicode_space(raw: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Rows (``rel``: byte offsets) whose UTF-8 bytes hold a non-ASCII whitespace character
    ``str.split()`` splits on (U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F,
    U+205F, U+3000)."""
    rows = np.zeros(len(rel) - 1, dtype=bool)
    lead = np.flatnonzero((raw == 0xC2) | ((raw >= 0xE1) & (raw <= 0xE3)))
    if not lead.size:
        return rows
    last = raw.size - 1
    b0 = raw[lead]
    b1 = raw[np.minimum(lead + 1, last)]
    b2 = raw[np.minimum(lead + 2, last)]
    e2 = (b0 == 0xE2) & (
        ((b1 == 0x80) & (((b2 >= 0x80) & (b2 <= 0x8A)) | np.isin(b2, (0xA8, 0xA9, 0xAF))))
        | ((b1 == 0x81) & (b2 == 0x9F))
    )
    hit = (
        ((b0 == 0xC2) & ((b1 == 0x85) | (b1 == 0xA0)))
        | ((b0 == 0xE1) & (b1 == 0x9A) & (b2 == 0x80))
        | e2
        | ((b0 == 0xE3) & (b1 == 0x80) & (b2 == 0x80))
    )
    rows[np.searchsorted(rel, lead[hit], side="right") - 1] = True
    return rows


def _word_counts_arrow(text: Any) -> np.ndarray:
    """Words per caption (``len(s.split())``) of a null-free Arrow large string array.

    Counted on the UTF-8 bytes: a word starts at a non-space byte after a space (``str.split()``'s
    ASCII whitespace: bytes 9-13 and 28-32; no byte of a multi-byte character is one) or at the
    start of its row. The rare rows holding a non-ASCII whitespace character are counted by
    ``str.split()`` itself.
    """
    n = len(text)
    if not n:
        return np.zeros(0, dtype=np.int64)
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int64)[text.offset : text.offset + n + 1]
    o0, o1 = int(offsets[0]), int(offsets[-1])
    if o1 == o0:
        return np.zeros(n, dtype=np.int64)
    raw = np.frombuffer(text.buffers()[2], dtype=np.uint8)[o0:o1]
    rel = offsets - o0
    top, low = int(raw.max()), int(raw.min())
    space = raw <= 32
    if low < 28:  # control bytes 0-8 and 14-27 are not whitespace for str.split()
        space &= ~((raw < 9) | ((raw > 13) & (raw < 28)))
    start = np.empty(raw.size, dtype=bool)
    start[0] = not space[0]
    np.greater(space[:-1], space[1:], out=start[1:])  # space, then non-space
    row_start = rel[:-1][rel[1:] > rel[:-1]]  # non-empty rows' first byte
    start[row_start] = ~space[row_start]
    firsts = np.flatnonzero(start)  # byte positions where a word starts, ascending
    counts = np.diff(np.searchsorted(firsts, rel, side="left"))
    if top >= 0x80:
        odd = _rows_with_unicode_space(raw, rel)
        if odd.any():
            counts[odd] = [len(t.split()) for t in text.filter(odd).to_pylist()]
    return counts


def _samples(
    df: pd.DataFrame, picks: Mapping[Any, tuple[np.ndarray, np.ndarray]], k: int
) -> dict[Any, list[dict[str, Any]]]:
    """``{name: records}``: for each ``name -> (sel, prio)`` the ``k`` rows of ``df[sel]`` with
    the smallest ``(prio, key)``, as sample records (one gather per column for all names)."""
    chosen: dict[Any, np.ndarray] = {}
    for name, (sel, prio) in picks.items():
        rows = np.flatnonzero(sel)
        if rows.size > k:  # the k smallest priorities, ties at the k-th one included
            p = prio[rows]
            rows = rows[p <= np.partition(p, k - 1)[k - 1]]
        chosen[name] = rows
    every = np.unique(np.concatenate([np.zeros(0, np.intp), *chosen.values()]))
    keys = df[schema.KEY].iloc[every].astype("string").fillna("").to_numpy(dtype=object)
    for name, rows in chosen.items():  # exact (prio, key) order
        key_sel = keys[np.searchsorted(every, rows)]
        chosen[name] = rows[np.lexsort((key_sel, picks[name][1][rows]))[:k]]
    every = np.unique(np.concatenate([np.zeros(0, np.intp), *chosen.values()]))
    names = (schema.KEY, schema.SHARD, schema.TEXT, schema.URL, schema.LANGUAGE)
    # tolist(): the same scalars ``iloc`` gives, NA included
    cols = {c: df[c].iloc[every].tolist() for c in (*names, schema.SIMILARITY)}
    out: dict[Any, list[dict[str, Any]]] = {}
    for name, rows in chosen.items():
        prio = picks[name][1]
        recs = []
        for i in rows:
            j = int(np.searchsorted(every, i))
            sim = cols[schema.SIMILARITY][j]
            recs.append(
                {
                    "key": str(cols[schema.KEY][j]),
                    "shard": str(cols[schema.SHARD][j]),
                    "text": str(cols[schema.TEXT][j])[:200],
                    "url": str(cols[schema.URL][j]),
                    "language": str(cols[schema.LANGUAGE][j]),
                    "similarity": None if pd.isna(sim) else float(sim),
                    "prio": float(prio[i]),
                }
            )
        out[name] = recs
    return out


def _str_array(s: pd.Series) -> Any:
    """``s`` as one contiguous Arrow (large) string array (nulls kept)."""
    import pyarrow as pa

    arr = _arrow_strings(s)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    return arr.cast(pa.large_string()) if not pa.types.is_large_string(arr.type) else arr


def _encode(arr: Any, fill: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes and labels of a string array whose nulls count as ``fill``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    enc = pc.dictionary_encode(arr)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks() if enc.num_chunks != 1 else enc.chunk(0)
    labels = [str(v) for v in enc.dictionary.to_pylist()]
    idx = enc.indices
    if idx.null_count:
        if fill not in labels:
            labels.append(fill)
        idx = idx.fill_null(labels.index(fill))
    return np.asarray(idx.to_numpy(zero_copy_only=False)), labels  # int32: half of intp


def _col_codes(s: pd.Series, fill: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``(codes, labels, valid)`` of a string column, its nulls coded as ``fill``.

    A categorical column (what :func:`_read_part` reads low-cardinality columns as: Parquet's
    own dictionary) gives its codes without hashing a string; any other goes through
    :func:`_encode`.
    """
    if isinstance(s.dtype, pd.CategoricalDtype):
        codes = s.cat.codes.to_numpy()  # int8 for a few categories: kept small (no copy)
        labels = [str(v) for v in s.cat.categories]
        valid = codes >= 0
        if len(labels) >= np.iinfo(codes.dtype).max:  # room for the fill label's code
            codes = codes.astype(np.int32)
        if not valid.all():
            codes = codes.copy()
            if fill not in labels:
                labels.append(fill)
            codes[~valid] = labels.index(fill)
        if len(set(labels)) != len(labels):  # non-string categories that print alike
            arr = _str_array(s.astype("string"))
            return (*_encode(arr, fill), np.asarray(arr.is_valid()))
        return codes, labels, valid
    arr = _str_array(s)
    return (*_encode(arr, fill), np.asarray(arr.is_valid()))


def _domain_codes(urls: pd.Series) -> tuple[np.ndarray, list[str]]:
    """:func:`_encode` of :func:`_domains`, lower-casing each distinct host once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    codes, raw = _encode(_raw_hosts(urls), "")
    lowered = pc.utf8_lower(pa.array(raw, type=pa.large_string())).to_pylist()
    labels, inverse = np.unique(
        np.array([v if v else "<none>" for v in lowered], dtype=object), return_inverse=True
    )
    return np.asarray(inverse, dtype=np.int32).reshape(-1)[codes], [str(v) for v in labels]


def _code_counts(
    codes: np.ndarray,
    labels: Sequence[str],
    mask: np.ndarray | None = None,
    ws: Workspace | None = None,
) -> dict[str, int]:
    """``{label: n}`` of the rows under ``mask``, most frequent first (as ``value_counts``;
    ties by label), labels with no row left out."""
    n = bincount(codes, len(labels), mask, ws)
    items = sorted(((labels[i], int(n[i])) for i in np.flatnonzero(n)), key=lambda t: (-t[1], t[0]))
    return dict(items)


def _fast_filter_codes(
    df: pd.DataFrame,
    cfg: FilterConfig,
    gcodes: np.ndarray,
    glabels: Sequence[str],
    chars: np.ndarray,
    sim32: np.ndarray,
) -> np.ndarray:
    """Index into ``FILTER_REASONS`` (``len(FILTER_REASONS)`` = passes) per row: a vectorized
    :func:`laion_dask.filters.add_filter_reason` (the same rules, same order, same dtypes)."""
    n = len(df)
    if cfg.min_side or cfg.max_aspect_ratio:  # float64 sizes only for a rule that reads them
        w, h = _num(df, schema.ORIGINAL_WIDTH), _num(df, schema.ORIGINAL_HEIGHT)
    thr_of = np.array(
        [
            cfg.similarity_en
            if g == "en"
            else cfg.similarity_multi
            if g == "multi"
            else cfg.similarity_nolang
            for g in glabels
        ]
        or [0.0],
        dtype="float32",
    )
    thr = thr_of[gcodes]
    scored = ~np.isnan(sim32)
    zeros = np.zeros(n, dtype=bool)

    def above(col: str, limit: float | None) -> np.ndarray:
        if limit is None:
            return zeros
        return np.nan_to_num(_num(df, col), nan=-np.inf) > limit

    with np.errstate(divide="ignore", invalid="ignore"):
        rules = {
            "text_too_short": chars < cfg.min_text_chars,
            "low_similarity": sim32 < thr,
            "unsafe": above(schema.PUNSAFE, cfg.max_punsafe),
            "watermark": above(schema.PWATERMARK, cfg.max_pwatermark),
            "small_image": np.fmin(w, h) < cfg.min_side if cfg.min_side else zeros,
            "extreme_aspect_ratio": (
                np.fmax(w, h) / np.fmax(np.fmin(w, h), 1) > cfg.max_aspect_ratio
                if cfg.max_aspect_ratio
                else zeros
            ),
        }
    code = np.full(n, len(FILTER_REASONS), dtype=np.int8)
    for i in range(len(FILTER_REASONS) - 1, -1, -1):  # first failing rule wins
        code[np.asarray(rules[FILTER_REASONS[i]], dtype=bool) & scored] = i
    return code


def _final_codes(
    drop: tuple[np.ndarray, list[str], np.ndarray],
    status: tuple[np.ndarray, list[str], np.ndarray],
    sstat: tuple[np.ndarray, list[str], np.ndarray],
    filter_codes: np.ndarray,
    near: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str]]:
    """:func:`laion_dask.filters.final_reason` on codes, ``"kept"`` for none: the rule reason,
    else a failed download status, else ``unscorable_image``, else ``near_duplicate`` (where
    ``near`` is True), else the filter reason.

    ``drop``, ``status`` and ``sstat`` are ``(codes, labels, valid)`` of those columns (see
    :func:`_encode`); the result's labels are the union of the labels that can occur.
    """
    index: dict[str, int] = {}

    def ids(labels: Sequence[str]) -> np.ndarray:
        return np.array([index.setdefault(v, len(index)) for v in labels] or [0], dtype=np.int32)

    kept_id = int(ids(["kept"])[0])
    out = np.append(ids(FILTER_REASONS), kept_id)[filter_codes]
    if near is not None and near.any():
        out[near] = int(ids([NEAR_DUPLICATE])[0])
    for (codes, labels, valid), fixed in ((sstat, "unscorable_image"), (status, None)):
        bad = valid & (codes != labels.index("success") if "success" in labels else True)
        out[bad] = int(ids([fixed])[0]) if fixed else ids(labels)[codes[bad]]
    codes, labels, valid = drop
    out[valid] = ids(labels)[codes[valid]]
    return out, list(index)


def _near_mask(df: pd.DataFrame) -> np.ndarray | None:
    """The ``near_duplicate`` flags joined from ``RUN/neardup``, when there are any."""
    if NEAR_DUPLICATE not in df.columns:
        return None
    return df[NEAR_DUPLICATE].astype("boolean").fillna(False).to_numpy(dtype=bool)


def fast_final_reason(df: pd.DataFrame, cfg: FilterConfig) -> pd.Series:
    """``add_final_reason(df, cfg)[FINAL_REASON]`` computed the way :func:`partition_summary`
    does (Arrow + NumPy, no pandas string ops); ``df`` needs :data:`COLUMNS`."""
    import pyarrow.compute as pc

    gcodes, glabels, _ = _col_codes(df[schema.LANGUAGE_GROUP], "nolang")
    text = _str_array(df[schema.TEXT])
    chars = pc.utf8_length(text).fill_null(0).to_numpy(zero_copy_only=False).astype("float64")
    sim32 = df[schema.SIMILARITY].astype("float32").to_numpy(dtype="float32", na_value=np.nan)
    fcodes = _fast_filter_codes(
        df,
        cfg,
        gcodes,
        glabels,
        chars,
        sim32,
    )
    cols = {
        c: _col_codes(df[c], "") for c in (schema.DROP_REASON, schema.STATUS, schema.SCORE_STATUS)
    }
    codes, labels = _final_codes(
        cols[schema.DROP_REASON],
        cols[schema.STATUS],
        cols[schema.SCORE_STATUS],
        fcodes,
        _near_mask(df),
    )
    final = np.array([None if v == "kept" else v for v in labels], dtype=object)[codes]
    return pd.Series(final, index=df.index, dtype="string", name=FINAL_REASON)


def _domain_sketches(
    codes: np.ndarray,
    labels: Sequence[str],
    masks: Mapping[str, np.ndarray | None],
    capacity: int,
    distinct_k: int,
    ws: Workspace | None = None,
) -> dict[str, Any]:
    """Per population: a Misra-Gries summary of rows per domain and (``distinct_<name>``) a
    k-minimum-values sketch of the distinct domains (see :mod:`laion_dask.sketches`)."""
    out: dict[str, Any] = {}
    for name, mask in masks.items():
        counts = bincount(codes, len(labels), mask, ws)
        out[name] = heavy_hitters(labels, counts, capacity)
        if name in DISTINCT_DOMAINS:
            present = np.flatnonzero(counts)
            out[f"distinct_{name}"] = distinct_sketch([labels[i] for i in present], distinct_k)
    return out


_WORKSPACES = threading.local()


def _workspace(rows: int) -> Workspace:
    """This thread's scratch arrays (a cache: a worker reuses them for every partition, so
    their pages are faulted in once, not once per partition; about 60 bytes per row)."""
    ws = getattr(_WORKSPACES, "ws", None)
    if ws is None or ws.rows < rows:
        ws = _WORKSPACES.ws = Workspace(rows)
    return ws


def partition_summary(
    df: pd.DataFrame,
    cfg: FilterConfig,
    *,
    samples: int = SAMPLES_PER_GROUP,
    domain_capacity: int = DOMAIN_CAPACITY,
    distinct_k: int = DISTINCT_K,
) -> dict[str, Any]:
    """One scores partition -> a small mergeable summary (see :mod:`laion_dask.sketches`).

    Parameters
    ----------
    df : pandas.DataFrame
        Rows of ``RUN/scores`` (every candidate row), at least :data:`COLUMNS`; string columns
        may be plain strings or categoricals (what :func:`_read_part` reads).
    cfg : FilterConfig
        The thresholds that decide ``kept`` (as ``materialize`` applies them).
    samples : int
        Sample records kept per language group (random and at the threshold).
    domain_capacity : int
        Counters of each domain heavy-hitter summary (exact below that many distinct domains).
    distinct_k : int
        Hashes of each distinct-domain sketch (exact below that many distinct domains).

    Returns
    -------
    dict
        Counts, histograms, sketches and samples; merge with :func:`laion_dask.sketches.merge`.

    Notes
    -----
    One pass of Arrow / NumPy kernels: every string column is coded once (Parquet's own
    dictionary for the low-cardinality ones) and every count is a ``bincount`` of codes;
    integer histograms are one ``bincount`` of the values. The final reason is
    :func:`laion_dask.filters.add_final_reason` vectorized (``tests/test_report.py`` checks they
    agree). Few full-length temporaries: Dask workers fix glibc's mmap threshold (the Nanny sets
    ``MALLOC_TRIM_THRESHOLD_``), so each large temporary costs fresh pages there.
    """
    import pyarrow.compute as pc

    df = df.reset_index(drop=True)
    n = len(df)
    ws = _workspace(n)  # scratch arrays shared by the counting kernels
    gcodes, glabels, _ = _col_codes(df[schema.LANGUAGE_GROUP], "nolang")
    gidx = {g: i for i, g in enumerate(glabels)}
    in_group = {
        g: (gcodes == gidx[g]) if g in gidx else np.zeros(n, dtype=bool)
        for g in schema.LANGUAGE_GROUPS
    }
    text = _str_array(df[schema.TEXT])
    text = text.fill_null("") if text.null_count else text
    chars_i = np.asarray(pc.utf8_length(text).to_numpy(zero_copy_only=False), dtype=np.int64)
    words = _word_counts_arrow(text)
    sim32 = df[schema.SIMILARITY].astype("float32").to_numpy(dtype="float32", na_value=np.nan)
    fcodes = _fast_filter_codes(df, cfg, gcodes, glabels, chars_i, sim32)
    rule_codes, rule_labels, rule_valid = _col_codes(df[schema.DROP_REASON], "kept")
    st_codes, st_labels, status_ok = _col_codes(df[schema.STATUS], "<NA>")
    ss_codes, ss_labels, ss_valid = _col_codes(df[schema.SCORE_STATUS], "<none>")
    final_codes, final_labels = _final_codes(
        (rule_codes, rule_labels, rule_valid),
        (st_codes, st_labels, status_ok),
        (ss_codes, ss_labels, ss_valid),
        fcodes,
        _near_mask(df),
    )
    kept = final_codes == final_labels.index("kept")
    attempted = ~rule_valid & status_ok
    downloaded = (
        (st_codes == st_labels.index("success")) & status_ok
        if "success" in st_labels
        else np.zeros(n, dtype=bool)
    )
    scored = (
        (ss_codes == ss_labels.index("success")) & ss_valid
        if "success" in ss_labels
        else np.zeros(n, dtype=bool)
    ) & ~np.isnan(sim32)
    failed = attempted & ~downloaded
    dom_codes, dom_labels = _domain_codes(df[schema.URL])
    lang_codes, lang_labels, _ = _col_codes(df[schema.LANGUAGE], "<none>")
    cols = {
        name: _col_values(df, col)
        for name, col in (
            ("original_width", schema.ORIGINAL_WIDTH),
            ("original_height", schema.ORIGINAL_HEIGHT),
            ("stored_width", schema.WIDTH),
            ("stored_height", schema.HEIGHT),
            ("original_bytes", schema.ORIGINAL_BYTES),
        )
    }
    values = {
        "punsafe": (_f32(df, schema.PUNSAFE), None),
        "pwatermark": (_f32(df, schema.PWATERMARK), None),
        **cols,
        "aspect_ratio": (
            _aspect(cols["original_width"], cols["original_height"], downloaded),
            None,
        ),
        "caption_chars": (chars_i, None),
        "caption_words": (words, None),
        "caption_chars_kept": (chars_i, None),
        "caption_words_kept": (words, None),
    }
    populations = {"scored": scored, "downloaded": downloaded, "kept": kept, "candidates": None}
    hists = {}
    for name, (pop, spec) in HISTOGRAMS.items():
        if pop.startswith("scored_"):
            hists[name] = histogram(sim32, spec, scored & in_group[pop[7:]], None, ws)
        else:
            mask = None if name == "aspect_ratio" else populations[pop]  # aspect: downloaded
            hists[name] = _hist(*values[name], spec, mask, ws)
    above = {}
    for col, ref in REFERENCE_CUTOFFS.items():
        cut = getattr(cfg, f"max_{col}")
        cut = ref if cut is None else cut
        # compared in float64 (as filters), NaN > cut is False
        above[col] = int(np.count_nonzero(values[col][0][scored] > np.float64(cut)))
    # samples: random among kept downloaded rows; nearest the threshold among scored ones
    # random order = LAION's row hash (mmh3 of url + text): uniform, stable, already stored
    prio = df[schema.HASH].astype("Int64").to_numpy(dtype="float64", na_value=0.0) / 2.0**63
    thr_of = np.array([cfg.similarity_for(g) for g in glabels] or [0.0], dtype="float32").astype(
        "float64"
    )  # as filters.similarity_threshold: float32
    has_image = downloaded & df[schema.SHARD].notna().to_numpy(dtype=bool)
    dist = np.abs(sim32.astype("float64") - thr_of[gcodes])
    picks = {}
    for g in schema.LANGUAGE_GROUPS:
        picks["random", g] = (in_group[g] & kept & has_image, prio)
        picks["threshold", g] = (in_group[g] & scored & has_image, dist)
    picked = _samples(df, picks, samples)
    random_s = {g: picked["random", g] for g in schema.LANGUAGE_GROUPS}
    thresh_s = {g: picked["threshold", g] for g in schema.LANGUAGE_GROUPS}
    # final reasons by group: one bincount of (group, reason) pairs
    nf = len(final_labels)
    pair = bincount(gcodes.astype(np.int32) * nf + final_codes, len(glabels) * nf, None, ws)
    final = {}
    for g in schema.LANGUAGE_GROUPS:
        row = pair[gidx[g] * nf : (gidx[g] + 1) * nf] if g in gidx else np.zeros(nf, np.intp)
        final[g] = {final_labels[i]: int(row[i]) for i in np.flatnonzero(row)}
    http_values, http_valid = _col_values(df, schema.HTTP_STATUS)
    http = http_values[failed]
    missing_http = np.isnan(http) if http_valid is None else ~http_valid[failed]
    codes_http, counts_http = np.unique(http[~missing_http], return_counts=True)
    http_counts = {str(int(c)): int(k) for c, k in zip(codes_http, counts_http, strict=True)}
    if missing_http.any():
        http_counts["none"] = int(missing_http.sum())
    filter_labels = [*FILTER_REASONS, "passed"]
    domain_pops = {"candidates": None, "images": downloaded, "kept": kept, "failed": failed}
    return {
        "rows": n,
        "partitions": 1,
        "final": final,
        "stages": {
            "rules": _code_counts(rule_codes, rule_labels, ws=ws),
            "download": _code_counts(st_codes, st_labels, attempted, ws=ws),
            "score": _code_counts(ss_codes, ss_labels, downloaded, ws=ws),
            "filters": _code_counts(fcodes, filter_labels, scored, ws=ws),
        },
        "languages": {
            "all": _code_counts(lang_codes, lang_labels, ws=ws),
            "kept": _code_counts(lang_codes, lang_labels, kept, ws=ws),
        },
        "groups": {
            "all": _code_counts(gcodes, glabels, ws=ws),
            "kept": _code_counts(gcodes, glabels, kept, ws=ws),
        },
        "http_status": http_counts,
        "domains": _domain_sketches(
            dom_codes, dom_labels, domain_pops, domain_capacity, distinct_k, ws
        ),
        "hist": hists,
        "above": above,
        "scored": int(np.count_nonzero(scored)),
        "samples": {"random": random_s, "threshold": thresh_s},
    }


#: low-cardinality string columns read as Parquet's own dictionary (pandas categoricals)
DICTIONARY_COLUMNS = [
    schema.LANGUAGE,
    schema.LANGUAGE_GROUP,
    schema.DROP_REASON,
    schema.STATUS,
    schema.SCORE_STATUS,
    schema.SHARD,
]


def _read_part(run: RunDir, path: str) -> pd.DataFrame:
    """:data:`COLUMNS` of one scores part; :data:`DICTIONARY_COLUMNS` as categoricals (no string
    is built or hashed for them); columns an older run lacks are added as missing values."""
    import pyarrow.parquet as pq

    with run.fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh, read_dictionary=DICTIONARY_COLUMNS)
        present = set(pf.schema_arrow.names)
        table = pf.read(columns=[c for c in COLUMNS if c in present])
    df = table.to_pandas()
    missing = [c for c in COLUMNS if c not in present]
    if missing:  # an older run: report what is there, counted as missing values
        log.warning("%s lacks columns %s: counted as missing", path, missing)
        dtypes = {
            **schema.CANDIDATES_DTYPES,
            **schema.DOWNLOAD_DTYPES,
            **schema.SHARD_DTYPES,
            **schema.SCORE_DTYPES,
        }
        nullable = {"int64": "Int64", "int32": "Int32"}
        df = df.assign(
            **{
                c: pd.Series(None, index=df.index, dtype=nullable.get(dtypes[c], dtypes[c]))
                for c in missing
            }
        )
    return df


def _summarize_part(
    part: int, run: RunDir, cfg: FilterConfig, samples: int, options: Mapping[str, int]
) -> dict[str, Any]:
    from .knn import join_part_near_duplicates

    df = join_part_near_duplicates(run, part, _read_part(run, run.part_path("scores", part)))
    return partition_summary(df, cfg, samples=samples, **options)


def _merge_batch(*summaries: dict[str, Any], k: int = SAMPLES_PER_GROUP) -> dict[str, Any]:
    return merge_all(summaries, k)


def summarize_run(
    run: RunDir | str,
    cfg: FilterConfig,
    *,
    client: Any | None = None,
    samples: int = SAMPLES_PER_GROUP,
    fan_in: int = 8,
    domain_capacity: int = DOMAIN_CAPACITY,
    distinct_k: int = DISTINCT_K,
) -> dict[str, Any]:
    """Merged :func:`partition_summary` of every scores partition: one task per partition on
    the cluster, then a tree reduce (``fan_in`` summaries per merge task)."""
    from .pipeline import _get_client

    run = run if isinstance(run, RunDir) else RunDir(run)
    parts = sorted(run.markers("scores"))
    if not parts:
        raise FileNotFoundError(f"{run.path}: no scores; run the score stage first")
    client = _get_client(client)
    options = {"domain_capacity": domain_capacity, "distinct_k": distinct_k}
    futures = [
        client.submit(_summarize_part, p, run, cfg, samples, options, pure=False, retries=1)
        for p in parts
    ]
    while len(futures) > 1:
        futures = [
            client.submit(_merge_batch, *futures[i : i + fan_in], k=samples, pure=False)
            for i in range(0, len(futures), fan_in)
        ]
    return futures[0].result()


# --- final statistics -----------------------------------------------------------------------------


def _thresholds(run: RunDir) -> tuple[FilterConfig, str]:
    path = run.join("dataset", "thresholds.toml")
    if run.exists(path):
        return load_thresholds(path), "RUN/dataset/thresholds.toml"
    return run.read_config().filters, "config"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in (
        "laion-dask",
        "dask",
        "distributed",
        "pandas",
        "pyarrow",
        "torch",
        "transformers",
        "bokeh",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _stage_facts(run: RunDir) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for stage, folder in (("extract", "extract"), ("download", "downloads"), ("score", "scores")):
        markers = run.markers(folder)
        if not markers:
            continue
        rows = sum(int(m.get("rows", 0)) for m in markers.values())
        seconds = sum(float(m.get("seconds", 0.0)) for m in markers.values())
        facts: dict[str, Any] = {"partitions": len(markers), "rows": rows, "seconds": seconds}
        facts["rows_per_second"] = rows / seconds if seconds else None
        if stage == "download":
            nbytes = sum(int((m.get("stats") or {}).get("bytes") or 0) for m in markers.values())
            facts["bytes"] = nbytes
            facts["bytes_per_second"] = nbytes / seconds if seconds else None
        out[stage] = facts
    return out


def _run_facts(run: RunDir) -> dict[str, Any]:
    with run.fs.open(run.config_path, "rb") as fh:
        raw = tomllib.load(fh)
    extra = raw.get("run", {})
    cfg = run.read_config()
    return {
        "path": run.path,
        "input_files": list(cfg.input.paths),
        "config": config_to_dict(cfg),
        "model": cfg.clip.model,
        "clip_resolved": extra.get("clip_resolved", {}),
        "versions": _versions(),
        "stages": _stage_facts(run),
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def finalize(summary: Mapping[str, Any], cfg: FilterConfig) -> dict[str, Any]:
    """Merged summary -> the statistics part of ``stats.json`` (top-k, quantiles, shares)."""
    rows = int(summary["rows"])
    by_group = {g: dict(summary["final"].get(g, {})) for g in schema.LANGUAGE_GROUPS}
    kept = {g: int(by_group[g].get("kept", 0)) for g in schema.LANGUAGE_GROUPS}
    dropped: dict[str, int] = {}
    for counts in by_group.values():
        for reason, n in counts.items():
            if reason != "kept":
                dropped[reason] = dropped.get(reason, 0) + int(n)
    dropped = dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])))
    hists = {}
    for name, (pop, spec) in HISTOGRAMS.items():
        hst = dict(summary["hist"][name])
        entry: dict[str, Any] = {"population": pop, "edges": spec.edges.tolist(), **hst}
        entry["mean"] = hst["sum"] / hst["n"] if hst["n"] else None
        qv = quantiles(hst, spec, QUANTILES)
        entry["quantiles"] = {
            f"p{round(q * 100):02d}": v for q, v in zip(QUANTILES, qv, strict=True)
        }
        entry["quantile_error"] = spec.quantile_error
        if pop.startswith("scored_"):
            entry["threshold"] = cfg.similarity_for(pop[7:])
        hists[name] = entry
    scored = int(summary["scored"])
    above = {}
    for col, ref in REFERENCE_CUTOFFS.items():
        cut = getattr(cfg, f"max_{col}")
        n = int(summary["above"][col])
        above[col] = {
            "cutoff": ref if cut is None else cut,
            "source": "reference" if cut is None else "filters",
            "rows": n,
            "scored": scored,
            "share": n / scored if scored else None,
        }
    langs = summary["languages"]
    top, rest = top_k(langs["all"], TOP_LANGUAGES)
    ktop, krest = top_k(langs["kept"], TOP_LANGUAGES)
    doms = summary["domains"]
    domains: dict[str, Any] = {}
    undercount: dict[str, int] = {}
    exact_distinct: dict[str, bool] = {}
    for name in ("candidates", "images", "kept"):
        sk = doms[name]
        t, _ = top_k(sk["counts"], TOP_DOMAINS)
        domains[f"top_{name}"] = t
        domains[f"rest_{name}"] = int(sk["n"]) - sum(c for _, c in t)
        domains[f"distinct_{name}"], exact_distinct[name] = distinct_estimate(
            doms[f"distinct_{name}"]
        )
        undercount[name] = int(sk["error"])
    fsk = doms["failed"]
    fdom, _ = top_k(fsk["counts"], TOP_FAILED_DOMAINS)
    frest = int(fsk["n"]) - sum(c for _, c in fdom)
    undercount["failed"] = int(fsk["error"])
    domains["sketch"] = {
        "kind": "misra_gries",
        "capacity": int(fsk["capacity"]),
        "max_undercount": undercount,
        "exact": {k: v == 0 for k, v in undercount.items()},
        "distinct_kind": "kmv",
        "distinct_k": int(doms["distinct_candidates"]["k"]),
        "distinct_exact": exact_distinct,
    }
    stages = {k: dict(sorted(v.items())) for k, v in summary["stages"].items()}
    dup = int(stages["rules"].get("duplicate", 0))
    known = [*schema.EXTRACT_DROP_REASONS, *schema.DOWNLOAD_STATUSES]
    known += list(getattr(schema, "CONSENT_STATUSES", ()))
    consent = {r: int(dropped.get(r, 0)) for r in sorted({*known, *dropped}) if is_consent(r)}
    return {
        "rows": rows,
        "partitions": int(summary["partitions"]),
        "consent": {
            "reasons": consent,
            "rows": sum(consent.values()),
            "share": sum(consent.values()) / rows if rows else 0.0,
        },
        "final": {
            "rows_in": rows,
            "kept": kept,
            "dropped": dropped,
            "adds_up": rows == sum(kept.values()) + sum(dropped.values()),
        },
        "by_group": by_group,
        "stages": stages,
        "languages": {
            "top": top,
            "rest": rest,
            "distinct": len(langs["all"]),
            "groups": {g: int(summary["groups"]["all"].get(g, 0)) for g in schema.LANGUAGE_GROUPS},
            "kept_top": ktop,
            "kept_rest": krest,
            "kept_groups": {
                g: int(summary["groups"]["kept"].get(g, 0)) for g in schema.LANGUAGE_GROUPS
            },
        },
        "histograms": hists,
        "above_cutoff": above,
        "domains": domains,
        "download_failures": {
            "by_status": {k: v for k, v in stages["download"].items() if k != "success"},
            "by_http_status": dict(sorted(summary["http_status"].items())),
            "by_domain": fdom,
            "rest_by_domain": frest,
        },
        "duplicates": {"rows": dup, "rate": dup / rows if rows else 0.0},
        "samples": summary["samples"],
    }


def build_stats(
    run: RunDir | str, *, client: Any | None = None, thresholds: FilterConfig | None = None
) -> dict[str, Any]:
    """Everything ``stats.json`` holds (schema in the module docstring)."""
    from .stats import check_funnel, funnel

    run = run if isinstance(run, RunDir) else RunDir(run)
    if thresholds is None:
        cfg, source = _thresholds(run)
    else:
        cfg, source = thresholds, "argument"
    summary = summarize_run(run, cfg, client=client)
    body = finalize(summary, cfg)
    table = funnel(run)
    final = body.pop("final")
    by_group = body.pop("by_group")
    return {
        "schema_version": SCHEMA_VERSION,
        "run": _run_facts(run),
        "thresholds": {"source": source, "values": dataclasses.asdict(cfg)},
        "rows": body.pop("rows"),
        "partitions": body.pop("partitions"),
        "funnel": {
            "table": [
                {"stage": r.stage, "outcome": r.outcome, "rows": int(r.rows)}
                for r in table.itertuples()
            ],
            "checks": check_funnel(table),
            "final": final,
            "by_group": by_group,
            "consent": body.pop("consent"),
        },
        **body,
    }


# --- thumbnails -----------------------------------------------------------------------------------


def _thumbnails(shard_path: str, keys: list[str], size: int = 160) -> dict[str, str]:
    """``{key: data URI}`` of small JPEG thumbnails of ``keys`` in one shard (missing: left out)."""
    from PIL import Image

    from .shards import read_shard_images

    out: dict[str, str] = {}
    for key, data in read_shard_images(shard_path, keys).items():
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("RGB")
                img.thumbnail((size, size))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=80)
        except Exception as err:  # noqa: BLE001 - an unreadable image is shown as missing
            log.warning("thumbnail %s in %s: %s", key, shard_path, err)
            continue
        out[key] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return out


def collect_thumbnails(
    run: RunDir | str, stats: Mapping[str, Any], *, client: Any | None = None
) -> dict[str, str]:
    """Thumbnails of every sample in ``stats`` (one task per shard): ``{shard/key: data URI}``."""
    from .pipeline import _get_client

    run = run if isinstance(run, RunDir) else RunDir(run)
    wanted: dict[str, set[str]] = {}
    for kind in stats["samples"].values():
        for recs in kind.values():
            for r in recs:
                wanted.setdefault(r["shard"], set()).add(r["key"])
    if not wanted:
        return {}
    client = _get_client(client)
    futures = {
        shard: client.submit(_thumbnails, run.join("images", shard), sorted(keys), pure=False)
        for shard, keys in sorted(wanted.items())
    }
    out = {}
    for shard, fut in futures.items():
        try:
            out.update({f"{shard}/{k}": v for k, v in fut.result().items()})
        except Exception as err:  # noqa: BLE001 - a missing shard leaves blanks, not a crash
            log.warning("thumbnails of %s: %s", shard, err)
    return out


# --- rendering ------------------------------------------------------------------------------------


def _by_count(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """Items by descending count, ties by name (stats.json itself is written with sorted keys)."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}"
    return html.escape(str(v))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _hist_figure(name: str, entry: Mapping[str, Any], title: str, *, log_x: bool = False) -> Any:
    from bokeh.models import Span
    from bokeh.plotting import figure

    edges = np.asarray(entry["edges"])
    counts = np.asarray(entry["counts"])
    step = -(-len(counts) // PLOT_BINS)
    if step > 1:  # fine bins (for quantiles) are summed into at most PLOT_BINS bars
        starts = np.arange(0, len(counts), step)
        counts = np.add.reduceat(counts, starts)
        edges = np.append(edges[starts], edges[-1])
    fig = figure(
        title=f"{title} (n={entry['n']:,})",
        height=260,
        width=420,
        x_axis_type="log" if log_x else "linear",
        tools="pan,wheel_zoom,box_zoom,reset,hover,save",
        name=f"plot-{name}",
    )
    fig.quad(top=counts, bottom=0, left=edges[:-1], right=edges[1:], fill_alpha=0.7)
    fig.y_range.start = 0
    marks = [entry[k] for k in ("threshold", "cutoff") if entry.get(k) is not None]
    if entry.get("min") is not None and not log_x:  # zoom on the data (and the marks)
        lo, hi = min([entry["min"], *marks]), max([entry["max"], *marks])
        pad = max((hi - lo) * 0.05, float(edges[1] - edges[0]))
        fig.x_range.start, fig.x_range.end = lo - pad, hi + pad
    for key in ("threshold", "cutoff"):
        if entry.get(key) is not None:
            fig.add_layout(
                Span(location=entry[key], dimension="height", line_color="red", line_width=2)
            )
    return fig


def _bar_figure(name: str, items: Sequence[Sequence[Any]], title: str, *, horizontal: bool) -> Any:
    from bokeh.models import ColumnDataSource
    from bokeh.plotting import figure

    labels = [str(k) for k, _ in items] or ["(none)"]
    counts = [int(v) for _, v in items] or [0]
    src = ColumnDataSource({"label": labels, "count": counts})
    tools = "hover,save,reset"
    if horizontal:
        fig = figure(
            y_range=labels[::-1],
            title=title,
            height=max(200, 18 * len(labels) + 60),
            width=560,
            tools=tools,
            tooltips="@label: @count",
            name=f"plot-{name}",
        )
        fig.hbar(y="label", right="count", height=0.8, source=src)
        fig.x_range.start = 0
    else:
        fig = figure(
            x_range=labels,
            title=title,
            height=280,
            width=max(320, 22 * len(labels) + 80),
            tools=tools,
            tooltips="@label: @count",
            name=f"plot-{name}",
        )
        fig.vbar(x="label", top="count", width=0.8, source=src)
        fig.y_range.start = 0
        fig.xaxis.major_label_orientation = 0.9
    return fig


def _figures(stats: Mapping[str, Any]) -> dict[str, Any]:
    """Plot name -> Bokeh figure, in page order."""
    h = stats["histograms"]
    final = stats["funnel"]["final"]
    figs: dict[str, Any] = {}
    items = [(f"kept ({g})", n) for g, n in final["kept"].items()] + _by_count(final["dropped"])
    figs["funnel"] = _bar_figure("funnel", items, "Final fate of every candidate", horizontal=True)
    langs = stats["languages"]
    figs["languages"] = _bar_figure(
        "languages",
        [*langs["top"], ["(rest)", langs["rest"]]],
        f"Languages of candidates (top {TOP_LANGUAGES} + rest)",
        horizontal=False,
    )
    for g in schema.LANGUAGE_GROUPS:
        figs[f"similarity_{g}"] = _hist_figure(
            f"similarity_{g}", h[f"similarity_{g}"], f"Similarity, {g} (red: threshold)"
        )
    for col in ("punsafe", "pwatermark"):
        cut = stats["above_cutoff"][col]
        figs[col] = _hist_figure(
            col,
            {**h[col], "cutoff": cut["cutoff"]},
            f"{col} (red: {cut['source']} cut-off {cut['cutoff']})",
        )
    for name, title in (
        ("original_width", "Original width (px)"),
        ("original_height", "Original height (px)"),
        ("aspect_ratio", "Aspect ratio w/h (original)"),
        ("stored_width", "Stored width (px)"),
        ("stored_height", "Stored height (px)"),
        ("caption_chars", "Caption characters (candidates)"),
        ("caption_words", "Caption words (candidates)"),
        ("caption_chars_kept", "Caption characters (kept)"),
        ("caption_words_kept", "Caption words (kept)"),
    ):
        figs[name] = _hist_figure(name, h[name], title)
    figs["original_bytes"] = _hist_figure(
        "original_bytes", h["original_bytes"], "Original bytes", log_x=True
    )
    doms = stats["domains"]
    figs["domains"] = _bar_figure(
        "domains",
        doms["top_images"],
        f"Downloaded images per domain (top {TOP_DOMAINS})",
        horizontal=True,
    )
    fails = stats["download_failures"]
    figs["failures_status"] = _bar_figure(
        "failures_status",
        _by_count(fails["by_status"]),
        "Download failures by status",
        horizontal=False,
    )
    figs["failures_domain"] = _bar_figure(
        "failures_domain",
        fails["by_domain"],
        f"Download failures by domain (top {TOP_FAILED_DOMAINS})",
        horizontal=True,
    )
    return figs


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.6em} h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left} th{background:#f3f3f3}
.plots{display:flex;flex-wrap:wrap;gap:12px} .ok{color:#070} .bad{color:#b00;font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:8px} .grid figure{margin:0;width:150px;font-size:.75em}
.grid img{max-width:145px;max-height:145px;display:block} .missing{color:#999}
"""


def _samples_html(stats: Mapping[str, Any], thumbs: Mapping[str, str]) -> str:
    parts = []
    for kind, title in (("random", "Random kept samples"), ("threshold", "At the threshold")):
        for g in schema.LANGUAGE_GROUPS:
            recs = stats["samples"][kind].get(g, [])
            thr = stats["histograms"][f"similarity_{g}"].get("threshold")
            cells = []
            for r in recs:
                uri = thumbs.get(f"{r['shard']}/{r['key']}")
                img = (
                    f'<img src="{uri}" alt="{html.escape(r["key"])}">'
                    if uri
                    else '<div class="missing">(image missing)</div>'
                )
                cap = html.escape(r["text"][:80])
                sim = "–" if r["similarity"] is None else f"{r['similarity']:.3f}"
                cells.append(
                    f"<figure>{img}<figcaption>{html.escape(r['language'])} · sim {sim}"
                    f"<br>{cap}</figcaption></figure>"
                )
            body = "".join(cells) or '<p class="missing">no rows</p>'
            parts.append(
                f'<h3>{title}: {g} (threshold {thr})</h3><div class="grid samples-{kind}-{g}">'
                f"{body}</div>"
            )
    return "".join(parts)


def _inline_js() -> str:
    """Bokeh's JavaScript, inline only.

    When Panel has been imported in the same process (a notebook, the dashboard), Bokeh's
    resources also list Panel's extension files by relative URL; a self-contained report must not
    reference files it does not carry, and its plots need none of them.
    """
    from bokeh.resources import INLINE

    return "\n".join(f'<script type="text/javascript">\n{raw}\n</script>' for raw in INLINE.js_raw)


def render_html(stats: Mapping[str, Any], thumbs: Mapping[str, str] | None = None) -> str:
    """One self-contained HTML page: Bokeh JS/CSS inline, images as data URIs, no server."""
    from bokeh.embed import components
    from bokeh.resources import INLINE

    figs = _figures(stats)
    script, divs = components(figs)
    fn = stats["funnel"]
    checks = fn["checks"]
    final = fn["final"]
    check_rows = [
        (s, "counts add up" if ok else "COUNTS DO NOT ADD UP") for s, ok in checks.items()
    ]
    check_rows.append(
        ("final reasons (this report)", "counts add up" if final["adds_up"] else "NO")
    )
    run = stats["run"]
    thr = stats["thresholds"]
    quant = [
        (
            name,
            e["population"],
            e["n"],
            e["mean"],
            *e["quantiles"].values(),
            _error_text(e["quantile_error"]),
        )
        for name, e in stats["histograms"].items()
    ]
    qheads = list(next(iter(stats["histograms"].values()))["quantiles"])
    stage_rows = [
        (
            s,
            f["partitions"],
            f["rows"],
            f["seconds"],
            f["rows_per_second"],
            f.get("bytes"),
            f.get("bytes_per_second"),
        )
        for s, f in run["stages"].items()
    ]
    reasons = [r for r, _ in _by_count(final["dropped"])]
    plot_div = "".join(f'<div class="plot" data-plot="{n}">{d}</div>' for n, d in divs.items())
    names = ",".join(divs)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>laion-dask report: {html.escape(run["path"])}</title>
<meta name="laion-dask-plots" content="{names}">
<style>{_CSS}</style>
{INLINE.render_css()}
{_inline_js()}
</head><body>
<h1>Dataset report</h1>
<p>Run <code>{html.escape(run["path"])}</code>; {stats["rows"]:,} candidate rows in
{stats["partitions"]} partitions; generated {html.escape(run["generated_at"])}.</p>
<h2 id="funnel">Funnel</h2>
{_table(check_rows, ["stage", "check"])}
{_table([(r["stage"], r["outcome"], r["rows"]) for r in fn["table"]], ["stage", "outcome", "rows"])}
<h3 id="consent">Consent and safety</h3>
<p>Rows removed because a page, a host or a list opted them out, or the downloader refused the
address: {fn["consent"]["rows"]:,} ({fn["consent"]["share"]:.2%} of candidates).</p>
{_table(list(fn["consent"]["reasons"].items()), ["reason", "rows"])}
<h3>Final fate by language group</h3>
{
        _table(
            [
                (g, *(fn["by_group"][g].get(k, 0) for k in ["kept", *reasons]))
                for g in fn["by_group"]
            ],
            ["group", "kept", *reasons],
        )
    }
<h2 id="key-numbers">Key numbers</h2>
{_table(_key_rows(stats), ["", "value"])}
<h2 id="plots">Plots</h2>
<div class="plots">{plot_div}</div>
<h2>Distributions (quantiles from merged fixed-bin histograms)</h2>
{_table(quant, ["name", "population", "n", "mean", *qheads, "quantile error"])}
{_sketch_note(stats)}
<h2 id="samples">Samples</h2>
{_samples_html(stats, thumbs or {})}
<h2 id="run-facts">Run facts</h2>
{
        _table(
            [
                ("input files", len(run["input_files"])),
                ("model", run["model"]),
                *[(f"clip {k}", v) for k, v in run["clip_resolved"].items()],
                ("thresholds from", thr["source"]),
                *[(f"threshold {k}", v) for k, v in thr["values"].items()],
                *[(f"version {k}", v) for k, v in run["versions"].items()],
            ],
            ["", "value"],
        )
    }
{_table(stage_rows, ["stage", "partitions", "rows", "seconds", "rows/s", "bytes", "bytes/s"])}
<details><summary>input files</summary><pre>{html.escape(chr(10).join(run["input_files"]))}</pre>
</details>
<details><summary>resolved config</summary><pre>{
        html.escape(json.dumps(run["config"], indent=1))
    }</pre></details>
<div id="render-status" data-expected="{len(divs)}">pending</div>
{script}
<script>
(function () {{
  var expected = {len(divs)}, tries = 0;
  function check() {{
    var done = 0;
    document.querySelectorAll("div.plot").forEach(function (el) {{
      var view = el.querySelector("[data-root-id] > *");
      var shadow = view && view.shadowRoot;
      if (shadow && shadow.querySelector(".bk-Canvas, canvas")) {{
        el.setAttribute("data-rendered", "yes");
        done += 1;
      }}
    }});
    var el = document.getElementById("render-status");
    if (done >= expected) {{ el.textContent = "rendered " + done; return; }}
    if (++tries < 200) setTimeout(check, 50); else el.textContent = "incomplete " + done;
  }}
  window.addEventListener("load", function () {{ setTimeout(check, 50); }});
}})();
</script>
</body></html>
"""
    return page


def _error_text(err: Mapping[str, float]) -> str:
    return f"± {err['abs']:.4g}" if "abs" in err else f"± {err['rel']:.2%}"


def _sketch_note(stats: Mapping[str, Any]) -> str:
    sk = stats["domains"]["sketch"]
    under = sk["max_undercount"]
    if not any(under.values()) and all(sk["distinct_exact"].values()):
        text = "Domain counts are exact (fewer distinct domains than the sketch capacity)."
    else:
        text = (
            f"Domain counts are Misra-Gries lower bounds (capacity {sk['capacity']:,}); "
            "each is at most this far below the true count: "
            + ", ".join(f"{k} {v:,}" for k, v in under.items())
            + f". Distinct counts: k-minimum-values sketches (k = {sk['distinct_k']:,}), "
            + ", ".join(
                f"{k} {'exact' if v else 'estimated'}" for k, v in sk["distinct_exact"].items()
            )
            + "."
        )
    return f'<p class="note">{html.escape(text)}</p>'


def _key_rows(stats: Mapping[str, Any]) -> list[tuple[str, Any]]:
    final = stats["funnel"]["final"]
    h = stats["histograms"]
    rows: list[tuple[str, Any]] = [
        ("candidate rows", stats["rows"]),
        ("kept rows", sum(final["kept"].values())),
        *[(f"kept {g}", n) for g, n in final["kept"].items()],
        ("duplicate rate", round(stats["duplicates"]["rate"], 4)),
        ("distinct languages", stats["languages"]["distinct"]),
        ("distinct domains (downloaded)", stats["domains"]["distinct_images"]),
    ]
    for g in schema.LANGUAGE_GROUPS:
        e = h[f"similarity_{g}"]
        rows.append((f"median similarity {g} (threshold {e['threshold']})", e["quantiles"]["p50"]))
    for col, a in stats["above_cutoff"].items():
        rows.append(
            (f"share {col} > {a['cutoff']}", None if a["share"] is None else round(a["share"], 4))
        )
    for name in ("original_width", "original_height", "caption_chars_kept"):
        rows.append((f"median {name}", h[name]["quantiles"]["p50"]))
    return rows


def render_markdown(stats: Mapping[str, Any]) -> str:
    """A README-ready markdown summary: key numbers, funnel, top languages."""

    def md(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v).replace("|", "\\|")

    final = stats["funnel"]["final"]
    lines = ["| | value |", "|---|---:|"]
    lines += [f"| {md(k)} | {md(v)} |" for k, v in _key_rows(stats)]
    lines += ["", "| outcome | rows | share |", "|---|---:|---:|"]
    rows = max(stats["rows"], 1)
    for g, n in final["kept"].items():
        lines.append(f"| kept ({g}) | {n:,} | {n / rows:.1%} |")
    for reason, n in _by_count(final["dropped"]):
        lines.append(f"| {md(reason)} | {n:,} | {n / rows:.1%} |")
    ok = "yes" if final["adds_up"] else "NO"
    lines.append(f"| **candidates** (adds up: {ok}) | {stats['rows']:,} | 100% |")
    consent = stats["funnel"]["consent"]
    lines += ["", "| consent and safety | rows | share |", "|---|---:|---:|"]
    for reason, n in consent["reasons"].items():
        lines.append(f"| {md(reason)} | {n:,} | {n / rows:.1%} |")
    lines.append(f"| **all consent and safety** | {consent['rows']:,} | {consent['share']:.1%} |")
    lines += ["", "| language | candidates |", "|---|---:|"]
    lines += [f"| {md(k)} | {n:,} |" for k, n in stats["languages"]["top"][:10]]
    return "\n".join(lines) + "\n"


def write_report(
    run: RunDir | str,
    stats: Mapping[str, Any],
    *,
    formats: Sequence[str] = ("html",),
    out: str | None = None,
    client: Any | None = None,
) -> dict[str, str]:
    """Write ``stats.json`` and each of ``formats`` (``html``, ``md``; ``json`` = stats only)
    into ``out`` (default ``RUN/report``); returns ``{format: path}``."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    out = out or run.join("report")
    fs, _ = __import__("fsspec").core.url_to_fs(out)
    fs.makedirs(out, exist_ok=True)
    paths = {"json": f"{out}/stats.json"}
    run.write_json_atomic(paths["json"], dict(stats))
    if "html" in formats:
        thumbs = collect_thumbnails(run, stats, client=client)
        paths["html"] = f"{out}/report.html"
        run.write_bytes_atomic(paths["html"], render_html(stats, thumbs).encode("utf-8"))
    if "md" in formats:
        paths["md"] = f"{out}/report.md"
        run.write_bytes_atomic(paths["md"], render_markdown(stats).encode("utf-8"))
    return paths


# --- command line ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``laion-dask report RUN [--format html|md|json] [--out DIR]``; prints the written path."""
    from .rundir import open_run

    parser = argparse.ArgumentParser(
        prog="laion-dask report", description="Dataset statistics of a run directory."
    )
    parser.add_argument("run", help="run directory")
    parser.add_argument("--format", choices=("html", "md", "json"), default="html")
    parser.add_argument("--out", default=None, help="output folder (default RUN/report)")
    parser.add_argument("--scheduler", default=None, help="tcp://host:8786 of a running cluster")
    args = parser.parse_args(argv)
    try:
        run, cfg = open_run(args.run)
    except FileNotFoundError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    from distributed import Client, get_client

    from .cluster import close_client, make_client

    own = None
    try:
        client = get_client()
    except ValueError:
        if args.scheduler:
            own = Client(args.scheduler)
        else:
            own = make_client(dataclasses.replace(cfg.cluster, dashboard_address=None))
        client = own
    try:
        stats = build_stats(run, client=client)
        paths = write_report(run, stats, formats=(args.format,), out=args.out, client=client)
    except FileNotFoundError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    finally:
        if own is not None:
            close_client(own)
    sys.stdout.write(paths[args.format] + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
