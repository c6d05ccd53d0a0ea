"""Dataset statistics of a run: ``RUN/report/stats.json``, ``report.html`` and ``report.md``.

Statistics are computed per scores partition by :func:`partition_summary` (a plain function over
one pandas frame, returning a small mergeable dict, see :mod:`laion_dask.ground.sketches`), run on
the
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

from laion_dask.ground import schema
from laion_dask.ground.config import FilterConfig, config_to_dict
from laion_dask.ground.sketches import (
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
from laion_dask.orchestration.rundir import RunDir
from laion_dask.stages.filters import (
    FILTER_REASONS,
    FINAL_REASON,
    NEAR_DUPLICATE,
    load_thresholds,
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
    "release_workspaces",
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


def _pa_is_integer(t: Any) -> bool:
    """Whether an Arrow type is an integer type."""
    import pyarrow as pa

    return bool(pa.types.is_integer(t))


def _arrow_of(s: pd.Series) -> Any | None:
    """The Arrow array behind a ``pandas.ArrowDtype`` column (what :func:`_read_part` gives:
    no conversion at read time), one contiguous chunk; None for any other dtype."""
    if not isinstance(s.dtype, pd.ArrowDtype):
        return None
    import pyarrow as pa

    arr = s.array.__arrow_array__()
    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks == 1:
            arr = arr.chunk(0)
        elif pa.types.is_dictionary(arr.type):  # one dictionary for every chunk
            arr = arr.unify_dictionaries().combine_chunks()
        else:
            arr = arr.combine_chunks()
    return arr


def _arrow_strings(s: pd.Series) -> Any:
    """The Arrow string array behind ``s`` (zero-copy for pandas' Arrow-backed strings)."""
    import pyarrow as pa

    arr = _arrow_of(s)
    if arr is not None:
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            arr = arr.cast(pa.large_string())
        return arr
    arr = pa.array(s.astype("string"))
    return (
        arr
        if pa.types.is_large_string(arr.type) or pa.types.is_string(arr.type)
        else (arr.cast(pa.large_string()))
    )


def _rows_with_bytes(arr: Any, chars: bytes, ws: Workspace | None = None) -> np.ndarray:
    """Which rows of a large string array contain any of the bytes ``chars`` (on the buffer;
    in ``ws``'s scratch buffers when given, else in 32 KB slices)."""
    n = len(arr)
    out = np.zeros(n, dtype=bool)
    if not n or arr.buffers()[2] is None:
        return out
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    raw = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    if ws is not None:
        hit, eq = ws.get(bool, raw.size, 20), ws.get(bool, raw.size, 21)
        np.equal(raw, chars[0], out=hit)
        for c in chars[1:]:
            np.logical_or(hit, np.equal(raw, c, out=eq), out=hit)
        if hit.any():
            pos = np.flatnonzero(hit) + offsets[0]
            out[np.searchsorted(offsets, pos, side="right") - 1] = True
        if arr.null_count:
            out &= _valid_of(arr)
        return out
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
        out &= _valid_of(arr)
    return out


def _bitmap(raw: np.ndarray, chars: bytes, ws: Workspace) -> np.ndarray:
    """``uint64`` words whose bit ``j`` of word ``w`` tells whether ``raw[64 * w + j]`` is one of
    the bytes ``chars`` (two zero words of padding at the end)."""
    hit = ws.get(bool, raw.size, 20)  # (the word counts' byte buffers: done by now)
    eq = ws.get(bool, raw.size, 21)
    np.equal(raw, chars[0], out=hit)
    for c in chars[1:]:
        np.logical_or(hit, np.equal(raw, c, out=eq), out=hit)
    bits = np.packbits(hit, bitorder="little")
    words = ws.get(np.uint8, (bits.size // 8 + 2) * 8, 40)
    words[: bits.size] = bits
    words[bits.size :] = 0
    return words.view(np.uint64)


def _first_set_bit(
    words: np.ndarray, start: np.ndarray, stop: np.ndarray, ws: Workspace
) -> np.ndarray:
    """Per row, the first position ``p`` in ``[start, stop)`` whose bit is set in ``words``
    (see :func:`_bitmap`: two zero words of padding), else ``stop``.

    Vectorized over rows: the first step reads the word holding ``start`` and the next one
    (128 bits, in scratch buffers), and the rare rows with no set bit there go on a word at a
    time.
    """
    one = np.uint64(1)
    n = len(start)
    w = np.right_shift(start, 6, out=ws.get(np.int64, n, 20))
    low = np.bitwise_and(start, 63, out=ws.get(np.int64, n, 21)).view(np.uint64)
    np.left_shift(one, low, out=low)
    np.negative(low, out=low)  # bits from start & 63 up (2**64 - 2**k)
    bits = np.take(words, w, out=ws.get(np.uint64, n, 20), mode="clip")
    np.bitwise_and(bits, low, out=bits)
    np.add(w, 1, out=w)
    nxt = np.take(words, w, out=ws.get(np.uint64, n, 21), mode="clip")
    first_empty = np.equal(bits, 0, out=ws.get(bool, n, 22))
    np.multiply(nxt, first_empty, out=nxt)  # the next word only where the first has no bit
    np.bitwise_or(bits, nxt, out=bits)
    np.negative(bits, out=low)
    np.bitwise_and(low, bits, out=low)  # the lowest set bit alone
    np.subtract(low, one, out=low)  # its trailing zeros as ones (64 of them when none)
    hit = np.left_shift(w, 6, out=ws.get(np.int64, n, 22))  # the next word's first position
    np.subtract(hit, 64, out=hit)
    shift = np.left_shift(first_empty, 6, out=ws.get(np.int64, n, 23), dtype=np.int64)
    np.add(hit, shift, out=hit)
    np.add(hit, _popcount(low, ws.get(np.uint8, n, 21)), out=hit)
    # rows with no set bit in either word have hit = the start of the word after them
    none = np.equal(bits, 0, out=ws.get(bool, n, 23))
    np.logical_and(none, np.less(hit, stop, out=ws.get(bool, n, 24)), out=none)
    todo = np.flatnonzero(none)
    out = np.minimum(hit, stop, out=ws.get(np.int64, n, 47))
    out[todo] = stop[todo]  # until a set bit turns up
    pos = hit[todo]
    while todo.size:  # hosts running past 128 bits: one word at a time
        wt = pos >> 6
        b = words[wt] & ~((one << (pos & 63).astype(np.uint64)) - one)
        found = b != 0
        lowest = b[found] & (~b[found] + one)
        at = (wt[found] << 6) + _popcount(lowest - one).astype(np.int64)
        out[todo[found]] = np.minimum(at, stop[todo[found]])
        pos = (wt + 1) << 6
        more = ~found & (pos < stop[todo])
        todo, pos = todo[more], pos[more]
    return out


def _fast_host_spans(arr: Any, ws: Workspace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(start, end, ok)``: byte offsets of each URL's host in ``arr``'s data buffer, for the
    rows (``ok``) starting ``http://`` or ``https://`` with neither ``@`` nor ``[`` anywhere
    (no userinfo, no IPv6 literal): there the host :data:`_DOMAIN_RE` captures is the bytes up
    to the first of ``/:?#`` (or the end of the URL). Found on a bitmap of those bytes, no
    regex; other rows have ``start == end`` (an empty span at the row's start). ``start`` and
    ``end`` are scratch buffers of ``ws``."""
    import pyarrow.compute as pc

    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    https = _bools_of(pc.starts_with(arr, "https://"), ws, 10)
    ok = np.logical_or(
        _bools_of(pc.starts_with(arr, "http://"), ws, 11), https, out=ws.get(bool, n, 12)
    )
    odd = _rows_with_bytes(arr, b"@[", ws)
    ok &= np.logical_not(odd, out=odd)
    o0 = int(offsets[0])
    raw = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[o0 : int(offsets[-1])]
    start = np.subtract(offsets[:-1], o0, out=ws.get(np.int64, n, 44))  # within raw
    stop = np.subtract(offsets[1:], o0, out=ws.get(np.int64, n, 45))
    host = np.add(start, 7, out=ws.get(np.int64, n, 46))
    np.add(host, https, out=host, casting="unsafe")  # after "http://" or "https://"
    np.copyto(start, host, where=ok)
    not_ok = np.logical_not(ok, out=ws.get(bool, n, 44))
    np.copyto(stop, start, where=not_ok)  # an empty span: nothing to search
    end = _first_set_bit(_bitmap(raw, b"/:?#", ws), start, stop, ws)
    start += o0
    end += o0
    return start, end, ok


def _raw_hosts(urls: pd.Series, ws: Workspace | None = None) -> Any:
    """Host of each URL as :data:`_DOMAIN_RE` captures it (null when it does not match).

    Fast path (:func:`_fast_host_spans`): ``http(s)://`` URLs with neither ``@`` nor ``[`` (no
    userinfo, no IPv6 literal), whose host is the bytes before the first of ``/:?#``, cut out
    of the URL buffer with no regex; the other rows take :data:`_DOMAIN_RE` itself.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = _str_array(urls)
    n = len(arr)
    if not n or arr.buffers()[2] is None:
        return pc.struct_field(pc.extract_regex(arr, pattern=_DOMAIN_RE), [0])
    ws = ws or Workspace(n)
    start, end, ok = _fast_host_spans(arr, ws)
    # one string array whose element 2i is row i's host and 2i+1 the bytes up to the next
    # host (offsets interleaved, the URL buffer shared), then its even elements
    inter = ws.get(np.int64, 2 * n, 48)
    inter[0::2] = start
    inter[1::2] = end
    spans = pa.LargeStringArray.from_buffers(
        2 * n - 1, pa.py_buffer(inter), arr.buffers()[2], null_count=0
    )
    host = spans.take(pa.array(ws.arange(n, 2)))
    if not ok.all():
        slow = pc.struct_field(pc.extract_regex(arr.filter(~ok), pattern=_DOMAIN_RE), [0])
        host = pc.replace_with_mask(host, pa.array(~ok), slow.cast(host.type))
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


#: byte value -> its 8 bits (least significant first) as 8 bytes of 0/1, one ``uint64`` each
_BYTE_UNPACKED = (
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    .view(np.uint64)
    .reshape(256)
)


def _unpack_bits(bitmap: Any, offset: int, n: int, ws: Workspace, slot: int) -> np.ndarray:
    """Bits ``offset .. offset + n`` of an Arrow bitmap (least significant bit first) as bools,
    in ``ws``'s scratch buffer ``slot``: one lookup of 8 bools per byte, no fresh array."""
    nb = (offset + n + 7) // 8
    idx = ws.get(np.intp, nb, 92)
    np.copyto(idx, np.frombuffer(bitmap, dtype=np.uint8)[:nb], casting="unsafe")
    out = ws.get(np.uint8, 8 * nb, 100 + slot).view(np.uint64)
    np.take(_BYTE_UNPACKED, idx, out=out, mode="clip")
    return out.view(bool)[offset : offset + n]


def _valid_of(arr: Any, ws: Workspace | None = None, slot: int = 0) -> np.ndarray:
    """Which rows of an Arrow array (a dictionary array: its indices) hold a value: its
    validity bitmap unpacked to bools (in ``ws``'s scratch buffer ``slot`` when given: a
    lookup of 8 bools per bitmap byte, no fresh array)."""
    n = len(arr)
    bitmap = arr.buffers()[0] if arr.null_count else None
    if bitmap is None:
        return np.asarray(arr.is_valid()) if arr.null_count else np.ones(n, dtype=bool)
    if ws is not None:
        return _unpack_bits(bitmap, arr.offset, n, ws, slot)
    bits = np.unpackbits(
        np.frombuffer(bitmap, dtype=np.uint8), count=arr.offset + n, bitorder="little"
    )
    return bits[arr.offset :].view(bool)


def _has_value(s: pd.Series, ws: Workspace | None = None, slot: int = 0) -> np.ndarray:
    """``s.notna().to_numpy(dtype=bool)``; an Arrow-backed column's validity bitmap read
    directly (a dictionary column's when its dictionary has no null; see :func:`_valid_of`
    for ``ws`` and ``slot``)."""
    import pyarrow as pa

    arr = _arrow_of(s)
    if arr is None or (pa.types.is_dictionary(arr.type) and arr.dictionary.null_count):
        return s.notna().to_numpy(dtype=bool)
    return _valid_of(arr, ws, slot)


def _bools_of(arr: Any, ws: Workspace | None = None, slot: int = 0) -> np.ndarray:
    """An Arrow boolean array as NumPy bools, null = False (its bits unpacked; without nulls
    in ``ws``'s scratch buffer ``slot`` when given, see :func:`_unpack_bits`)."""
    n = len(arr)
    if not n or arr.buffers()[1] is None:
        return np.zeros(n, dtype=bool)
    if ws is not None and not arr.null_count:
        return _unpack_bits(arr.buffers()[1], arr.offset, n, ws, slot)
    bits = np.unpackbits(
        np.frombuffer(arr.buffers()[1], dtype=np.uint8), count=arr.offset + n, bitorder="little"
    )
    out = bits[arr.offset :].view(bool)
    return out & _valid_of(arr) if arr.null_count else out


def _values_of(arr: Any) -> np.ndarray:
    """The value buffer of a fixed-width Arrow array (integers, floats), no copy; values under
    nulls are arbitrary."""
    dtype = np.dtype(arr.type.to_pandas_dtype())
    return np.frombuffer(arr.buffers()[1], dtype=dtype)[arr.offset : arr.offset + len(arr)]


def _arrow_numbers(arr: Any, dtype: str) -> np.ndarray:
    """A numeric Arrow array as ``dtype`` floats, NaN for nulls."""
    import pyarrow as pa

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        arr = arr.cast(pa.float64())
    out = arr.to_numpy(zero_copy_only=False)  # nulls: NaN (integers become float64)
    return out if out.dtype == np.dtype(dtype) else out.astype(dtype)


def _num(df: pd.DataFrame, col: str) -> np.ndarray:
    s = df[col]
    arr = _arrow_of(s)
    if arr is not None:
        return _arrow_numbers(arr, "float64")
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype="float64", na_value=np.nan)  # no Float64 copy in between
    return s.astype("Float64").to_numpy(dtype="float64", na_value=np.nan)


def _f32(df: pd.DataFrame, col: str) -> np.ndarray:
    """A float column as float32 (NaN = missing) when it is float32 already, else float64."""
    s = df[col]
    if s.dtype == np.float32:
        return s.to_numpy()
    arr = _arrow_of(s)
    if arr is not None and str(arr.type) == "float":
        return _arrow_numbers(arr, "float32")
    return _num(df, col)


def _float_values(
    df: pd.DataFrame, col: str, ws: Workspace | None = None, slot: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(values, valid)`` of a float column: an Arrow-backed one as its own value buffer (no
    copy; values under nulls are arbitrary) and its validity (None without nulls; in ``ws``'s
    scratch buffer ``slot`` when given), any other as :func:`_f32` (NaN = missing, ``valid``
    None)."""
    arr = _arrow_of(df[col])
    if arr is None or str(arr.type) not in ("float", "double"):
        return _f32(df, col), None
    dtype = np.float32 if str(arr.type) == "float" else np.float64
    values = np.frombuffer(arr.buffers()[1], dtype=dtype)[arr.offset : arr.offset + len(arr)]
    return values, (_valid_of(arr, ws, slot) if arr.null_count else None)


def _fill_where_invalid(
    codes: np.ndarray, valid: np.ndarray, fill: int, out: np.ndarray | None = None
) -> np.ndarray:
    """``numpy.where(valid, codes, fill)`` for integer ``codes`` (into ``out``, else a new
    array), as ``(codes - fill) * valid + fill``: no branch per row (``numpy.where`` over a
    random mask costs ten times more). Values under ``valid == False`` are arbitrary and never
    read out."""
    # (wraps for garbage under nulls: times 0)
    out = np.subtract(codes, codes.dtype.type(fill), out=out)
    np.multiply(out, valid, out=out)
    np.add(out, codes.dtype.type(fill), out=out)
    return out


def _nan_where_invalid(
    values: np.ndarray,
    valid: np.ndarray,
    out: np.ndarray | None = None,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """``numpy.where(valid, values, nan)`` for a float32 array, on the bits: ``values & m |
    NAN & ~m`` with ``m`` all ones where ``valid``, no branch per row. The values under
    ``valid == False`` are arbitrary (whatever bits: never read out). ``out`` and ``scratch``
    (``uint32``, when given) hold the result and ``m``."""
    bits = values.view(np.uint32)
    # 0xFFFFFFFF where valid, else 0
    m = np.subtract(np.uint32(0), valid, out=scratch, dtype=np.uint32)
    out = np.bitwise_and(bits, m, out=out)
    np.bitwise_not(m, out=m)
    np.bitwise_and(m, np.float32(np.nan).view(np.uint32), out=m)
    np.bitwise_or(out, m, out=out)
    return out.view(np.float32)


def _float32(s: pd.Series, ws: Workspace | None = None, slot: int = 0) -> np.ndarray:
    """``s.astype("float32").to_numpy(dtype="float32", na_value=np.nan)``, without the copies
    for an Arrow-backed column (one with nulls: written to ``ws``'s scratch buffers ``slot``
    and ``slot + 1`` when given)."""
    arr = _arrow_of(s)
    if arr is not None and str(arr.type) == "float":
        values = _values_of(arr)
        if not arr.null_count:
            return values
        n = len(values)
        bufs = (ws.get(np.uint32, n, slot), ws.get(np.uint32, n, slot + 1)) if ws else ()
        return _nan_where_invalid(values, _valid_of(arr, ws, slot), *bufs)
    if arr is not None:
        return _arrow_numbers(arr, "float32")
    return s.astype("float32").to_numpy(dtype="float32", na_value=np.nan)


def _hash_prio(s: pd.Series, rows: np.ndarray, ws: Workspace | None = None) -> np.ndarray:
    """LAION's int64 row hash of ``rows`` as float64 in [-1, 1) (missing = 0): the samples'
    random order (an Arrow-backed column's: in ``ws``'s scratch buffers when given)."""
    arr = _arrow_of(s)
    if arr is not None and str(arr.type) == "int64":
        values = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr)]
        if ws is None:
            x = values[rows] / 2.0**63
        else:
            m = rows.size
            h = np.take(values, rows, out=ws.get(np.int64, m, 91), mode="clip")
            x = np.divide(h, 2.0**63, out=ws.get(np.float64, m, 91))  # (widened, then divided)
        if arr.null_count:
            x[~_valid_of(arr)[rows]] = 0.0
        return x
    x = s.iloc[rows].astype("Int64").to_numpy(dtype="float64", na_value=0.0)
    return x / 2.0**63


def _col_values(
    df: pd.DataFrame, col: str, ws: Workspace | None = None, slot: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(values, valid)``: an integer column as its own integers (missing rows 0) and which rows
    have a value; any other as float64 with NaN for missing (``valid`` None). No float64 copy of
    an integer column: a large temporary costs fresh pages in a Dask worker (an Arrow-backed
    column's ``valid``: in ``ws``'s scratch buffer ``slot`` when given)."""
    s = df[col]
    dtype = s.dtype
    arr = _arrow_of(s)
    if arr is not None and _pa_is_integer(arr.type):
        # its own value buffer (no copy; values under nulls are arbitrary, read only where
        # ``valid``) and its validity bitmap as bools
        values = np.frombuffer(arr.buffers()[1], dtype=arr.type.to_pandas_dtype())
        values = values[arr.offset : arr.offset + len(arr)]
        if arr.null_count:
            return values, _valid_of(arr, ws, slot)
        return values, np.ones(len(arr), dtype=bool)
    if arr is not None:
        return _arrow_numbers(arr, "float64"), None
    if pd.api.types.is_integer_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
        arr = s.array
        data, mask = getattr(arr, "_data", None), getattr(arr, "_mask", None)
        if isinstance(data, np.ndarray) and isinstance(mask, np.ndarray):
            # a nullable integer column: its own buffers, no copy (values under the mask are
            # arbitrary, and only read where ``valid``)
            return data, np.logical_not(mask)
        native = getattr(dtype, "numpy_dtype", dtype)
        return s.to_numpy(dtype=native, na_value=0), s.notna().to_numpy(dtype=bool)
    return _num(df, col), None


def _gather(
    values: np.ndarray, valid: np.ndarray | None, rows: np.ndarray | None, ws: Workspace
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(values[rows], valid[rows])`` in scratch buffers (``rows`` None: all rows, no copy);
    ``valid`` becomes None when every gathered row is valid.

    (Every ``numpy.take`` into a scratch buffer here says ``mode="clip"``: its indices are in
    range by construction, and the default ``"raise"`` with ``out=`` first writes the whole
    result to a fresh array.)"""
    if rows is not None:
        values = np.take(values, rows, out=ws.get(values.dtype, rows.size, 31), mode="clip")
        if valid is not None:
            valid = np.take(valid, rows, out=ws.get(bool, rows.size, 31), mode="clip")
    if valid is not None and np.count_nonzero(valid) == valid.size:
        valid = None
    return values, valid


def _aspect(
    w: tuple[np.ndarray, np.ndarray | None],
    h: tuple[np.ndarray, np.ndarray | None],
    rows: np.ndarray,
    ws: Workspace,
) -> np.ndarray:
    """Width / height (float64, NaN without a positive height or a width) of ``rows``."""
    m = rows.size
    wf = ws.get(np.float64, m, 32)
    hf = ws.get(np.float64, m, 33)
    for (vals, valid), out in ((w, wf), (h, hf)):
        np.copyto(
            out, np.take(vals, rows, out=ws.get(vals.dtype, m, 34), mode="clip"), casting="unsafe"
        )
        if valid is not None:
            bad = np.logical_not(np.take(valid, rows, out=ws.get(bool, m, 32), mode="clip"))
            out[bad] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(wf, hf, out=wf)
    wf[~(hf > 0)] = np.nan
    return wf


def _hist(
    values: np.ndarray,
    valid: np.ndarray | None,
    spec: HistSpec,
    mask: np.ndarray | None,
    ws: Workspace,
) -> dict[str, Any]:
    """Histogram of ``values[mask]``: integer values (``valid`` marks the rows that have one)
    on integer edges by ``bincount`` (:func:`~laion_dask.ground.sketches.int_histogram`), any
    other as
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


def _char_counts(text: Any, ws: Workspace | None = None) -> np.ndarray:
    """Characters per row of a null-free Arrow large string array (``utf8_length``); the byte
    lengths themselves when every byte is ASCII (in ``ws``'s scratch buffers when given)."""
    import pyarrow.compute as pc

    n = len(text)
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int64)[text.offset : text.offset + n + 1]
    data = text.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    raw = raw[int(offsets[0]) : int(offsets[-1])] if n else raw[:0]
    if not raw.size or int(raw.max()) < 0x80:
        out = ws.get(np.int32, n, 105) if ws is not None else None
        return np.subtract(offsets[1:], offsets[:-1], out=out, dtype=np.int32)
    return np.asarray(pc.utf8_length(text).to_numpy(zero_copy_only=False))


#: set bits per byte value (popcount without ``numpy.bitwise_count``, NumPy < 2)
_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Set bits of each element of a ``uint64`` array (``uint8``)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x, out=out)
    per_byte = _BYTE_BITS[x.view(np.uint8)].reshape(x.size, 8)
    return per_byte.sum(axis=1, dtype=np.uint8, out=out)


def _word_counts_arrow(text: Any, ws: Workspace | None = None) -> np.ndarray:
    """Words per caption (``len(s.split())``) of a null-free Arrow large string array.

    Counted on the UTF-8 bytes: a word starts at a non-space byte after a space (``str.split()``'s
    ASCII whitespace: bytes 9-13 and 28-32; no byte of a multi-byte character is one) or at the
    start of its row. The rare rows holding a non-ASCII whitespace character are counted by
    ``str.split()`` itself.

    The word starts are packed into a bitmap; a row's count is the difference of two prefix
    popcounts (per 64-bit word, cumulated, plus the bits of the row's first and last word), so
    no per-byte position array is built. Temporaries live in ``ws`` (scratch arrays).
    """
    n = len(text)
    if not n:
        return np.zeros(0, dtype=np.int32)
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int64)[text.offset : text.offset + n + 1]
    o0, o1 = int(offsets[0]), int(offsets[-1])
    if o1 == o0:
        return np.zeros(n, dtype=np.int32)
    ws = ws or Workspace(n)
    raw = np.frombuffer(text.buffers()[2], dtype=np.uint8)[o0:o1]
    size = raw.size
    rel = np.subtract(offsets, o0, out=ws.get(np.int64, n + 1, 20))
    top, low = int(raw.max()), int(raw.min())
    space = ws.get(bool, size + 1, 20)  # one byte past the end: row starts may point there
    np.less_equal(raw, 32, out=space[:size])
    space[size] = True
    if low < 28:  # control bytes 0-8 and 14-27 are not whitespace for str.split()
        space[:size] &= ~((raw < 9) | ((raw > 13) & (raw < 28)))
    start = ws.get(bool, size + 1, 21)
    start[0] = not space[0]
    np.greater(space[:-2], space[1:-1], out=start[1:size])  # space, then non-space
    start[size] = False
    # every row's first byte starts a word when it is not a space (an empty row's "first byte"
    # is the next row's, or the one past the end: the same value is written there)
    first = rel[:-1]
    flag = np.take(space, first, out=ws.get(bool, n, 22), mode="clip")
    start[first] = np.logical_not(flag, out=flag)
    bits = np.packbits(start, bitorder="little")  # bit j of byte b: position 8 * b + j
    words = ws.get(np.uint8, (bits.size // 8 + 2) * 8, 20)
    words[: bits.size] = bits
    words[bits.size :] = 0
    words = words.view(np.uint64)  # bit j of word w: position 64 * w + j
    cum = ws.get(np.int64, words.size + 1, 21)
    cum[0] = 0
    np.cumsum(_popcount(words), out=cum[1:])  # set bits before each word
    # prefix(p) = set bits before position p = cum[p >> 6] + popcount(word[p >> 6] below p & 63)
    w = np.right_shift(rel, 6, out=ws.get(np.int64, n + 1, 22))
    low_bits = np.bitwise_and(rel, 63, out=ws.get(np.int64, n + 1, 23)).view(np.uint64)
    np.left_shift(np.uint64(1), low_bits, out=low_bits)
    np.subtract(low_bits, np.uint64(1), out=low_bits)
    part = np.take(words, w, out=ws.get(np.uint64, n + 1, 20), mode="clip")
    np.bitwise_and(part, low_bits, out=part)
    prefix = np.take(cum, w, out=ws.get(np.int64, n + 1, 24), mode="clip")
    np.add(prefix, _popcount(part, ws.get(np.uint8, n + 1, 21)), out=prefix)
    counts = np.subtract(prefix[1:], prefix[:-1], out=ws.get(np.int32, n, 106), dtype=np.int32)
    if top >= 0x80:
        odd = _rows_with_unicode_space(raw, rel)
        if odd.any():
            counts[odd] = [len(t.split()) for t in text.filter(odd).to_pylist()]
    return counts


def _values_at(s: pd.Series, rows: np.ndarray) -> list[Any]:
    """``s.iloc[rows].tolist()``, a missing string as ``pd.NA`` whatever the column's dtype
    (an Arrow-backed column is read from its buffers, with no pandas Series in between)."""
    import pyarrow as pa

    arr = _arrow_of(s)
    if arr is None:
        return s.iloc[rows].tolist()
    arr = arr.take(pa.array(rows, type=pa.int64()))
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    values = arr.to_pylist()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return [pd.NA if v is None else v for v in values]  # as pandas' string columns
    return values


def _candidates_by_group(
    rows: np.ndarray,
    prio: np.ndarray,
    gcodes: np.ndarray,
    gidx: Mapping[str, int],
    k: int,
    ws: Workspace | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per language group, ``(rows, prio)`` holding every row of the group whose priority is
    among its ``k`` smallest (ties included), as :func:`_samples` picks them.

    Only the rows under a cut (the ``64 k``-th smallest priority of all) are split by group;
    a group with fewer than ``k`` of its rows under the cut is taken whole (then its k-th
    smallest may lie above the cut), so the picks are those of the whole group either way.
    The full-length temporaries go to ``ws``'s scratch buffers when given.
    """
    m = rows.size
    if ws is None:
        groups = gcodes[rows]
    else:
        groups = np.take(gcodes, rows, out=ws.get(gcodes.dtype, m, 108), mode="clip")
    cut_rows, cut_prio, cut_groups = rows, prio, groups
    wide = m > 64 * k
    if wide:
        if ws is None:
            cut = np.partition(prio, 64 * k - 1)[64 * k - 1]
        else:  # the same value, partitioned in place in a scratch copy
            tmp = ws.get(prio.dtype, m, 108)
            np.copyto(tmp, prio)
            tmp.partition(64 * k - 1)
            cut = tmp[64 * k - 1]
        under = np.less_equal(prio, cut, out=ws.get(bool, m, 108) if ws is not None else None)
        cut_rows, cut_prio, cut_groups = rows[under], prio[under], groups[under]
    out = {}
    for g in schema.LANGUAGE_GROUPS:
        code = gidx.get(g, -1)
        mine = cut_groups == code
        if wide and np.count_nonzero(mine) < k:
            whole = groups == code
            out[g] = (rows[whole], prio[whole])
        else:
            out[g] = (cut_rows[mine], cut_prio[mine])
    return out


def _samples(
    df: pd.DataFrame, picks: Mapping[Any, tuple[np.ndarray, np.ndarray]], k: int
) -> dict[Any, list[dict[str, Any]]]:
    """``{name: records}``: for each ``name -> (rows, prio)`` (row positions and their
    priorities) the ``k`` rows with the smallest ``(prio, key)``, as sample records (one gather
    per column for all names)."""
    chosen: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
    for name, (rows, prio) in picks.items():
        if rows.size > k:  # the k smallest priorities, ties at the k-th one included
            near = prio <= np.partition(prio, k - 1)[k - 1]
            rows, prio = rows[near], prio[near]
        chosen[name] = (rows, prio)
    every = np.unique(np.concatenate([np.zeros(0, np.intp), *(r for r, _ in chosen.values())]))
    keys = np.array(
        ["" if pd.isna(v) else str(v) for v in _values_at(df[schema.KEY], every)], dtype=object
    )
    for name, (rows, prio) in chosen.items():  # exact (prio, key) order
        order = np.lexsort((keys[np.searchsorted(every, rows)], prio))[:k]
        chosen[name] = (rows[order], prio[order])
    every = np.unique(np.concatenate([np.zeros(0, np.intp), *(r for r, _ in chosen.values())]))
    names = (schema.KEY, schema.SHARD, schema.TEXT, schema.URL, schema.LANGUAGE)
    # tolist(): the same scalars ``iloc`` gives, NA included
    cols = {c: _values_at(df[c], every) for c in (*names, schema.SIMILARITY)}
    out: dict[Any, list[dict[str, Any]]] = {}
    for name, (rows, prio) in chosen.items():
        recs = []
        for i, p in zip(rows, prio, strict=True):
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
                    "prio": float(p),
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


def _col_codes(
    s: pd.Series, fill: str, ws: Workspace | None = None, slot: int = 0
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``(codes, labels, valid)`` of a string column, its nulls coded as ``fill`` (codes that
    need filling are written to ``ws``'s scratch buffer ``slot`` when given, else a new array).

    A categorical column (what :func:`_read_part` reads low-cardinality columns as: Parquet's
    own dictionary) gives its codes without hashing a string; any other goes through
    :func:`_encode`.
    """
    arr = _arrow_of(s)
    if arr is not None:
        import pyarrow as pa

        if not pa.types.is_dictionary(arr.type):
            arr = _arrow_strings(s)
            return (*_encode(arr, fill), _valid_of(arr))
        labels = [str(v) for v in arr.dictionary.to_pylist()]
        if len(set(labels)) != len(labels) or None in arr.dictionary.to_pylist():
            arr = arr.dictionary_decode().cast(pa.large_string())
            return (*_encode(arr, fill), _valid_of(arr))
        idx = arr.indices
        codes = _values_of(idx)  # Parquet's dictionary indices, no copy
        valid = _valid_of(idx, ws, slot)
        if idx.null_count:
            if fill not in labels:
                labels.append(fill)
            out = ws.get(codes.dtype, len(codes), slot) if ws is not None else None
            codes = _fill_where_invalid(codes, valid, labels.index(fill), out)
        return codes, labels, valid
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
            return (*_encode(arr, fill), _valid_of(arr))
        return codes, labels, valid
    arr = _str_array(s)
    return (*_encode(arr, fill), _valid_of(arr))


def _domain_codes(urls: pd.Series, ws: Workspace | None = None) -> tuple[np.ndarray, list[str]]:
    """:func:`_encode` of :func:`_domains`, lower-casing each distinct host once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    codes, raw = _encode(_raw_hosts(urls, ws), "")
    lowered = pc.utf8_lower(pa.array(raw, type=pa.large_string())).to_pylist()
    labels, inverse = np.unique(
        np.array([v if v else "<none>" for v in lowered], dtype=object), return_inverse=True
    )
    inverse = np.asarray(inverse, dtype=np.int32).reshape(-1)
    if ws is None:
        return inverse[codes], [str(v) for v in labels]
    idx = ws.get(np.intp, len(codes), 70)  # (int32 indices would be copied to intp anyway)
    np.copyto(idx, codes, casting="unsafe")
    out = np.take(inverse, idx, out=ws.get(np.int32, len(codes), 83), mode="clip")
    return out, [str(v) for v in labels]


def _code_counts(
    codes: np.ndarray,
    labels: Sequence[str],
    mask: np.ndarray | None = None,
    ws: Workspace | None = None,
) -> dict[str, int]:
    """``{label: n}`` of the rows under ``mask``, most frequent first (as ``value_counts``;
    ties by label), labels with no row left out."""
    return _counts_dict(bincount(codes, len(labels), mask, ws), labels)


def _counts_dict(n: np.ndarray, labels: Sequence[str]) -> dict[str, int]:
    """``{label: n}`` of per-label counts, most frequent first (ties by label), zeros left out."""
    items = sorted(((labels[i], int(n[i])) for i in np.flatnonzero(n)), key=lambda t: (-t[1], t[0]))
    return dict(items)


def _fast_filter_codes(
    df: pd.DataFrame,
    cfg: FilterConfig,
    gcodes: np.ndarray,
    glabels: Sequence[str],
    chars: np.ndarray,
    sim32: np.ndarray,
    ws: Workspace | None = None,
) -> np.ndarray:
    """Index into ``FILTER_REASONS`` (``len(FILTER_REASONS)`` = passes) per row: a vectorized
    :func:`laion_dask.stages.filters.add_filter_reason` (the same rules, same order, same
    dtypes)."""
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
    ws = ws or Workspace(n)
    thr = _lookup(thr_of, gcodes, ws)
    scored = np.logical_not(np.isnan(sim32, out=ws.get(bool, n, 60)), out=ws.get(bool, n, 60))

    def above(col: str, limit: float | None, out: np.ndarray) -> np.ndarray | None:
        if limit is None:
            return None
        return np.greater(np.nan_to_num(_num(df, col), nan=-np.inf), limit, out=out)

    def sizes(out: np.ndarray, rule: str) -> np.ndarray | None:
        if rule == "small_image":
            return np.less(np.fmin(w, h), cfg.min_side, out=out) if cfg.min_side else None
        if not cfg.max_aspect_ratio:
            return None
        return np.greater(np.fmax(w, h) / np.fmax(np.fmin(w, h), 1), cfg.max_aspect_ratio, out=out)

    rules = {  # each writes its rows into ``out``; None = the rule is off
        "text_too_short": lambda out: np.less(chars, cfg.min_text_chars, out=out),
        "low_similarity": lambda out: np.less(sim32, thr, out=out),
        "unsafe": lambda out: above(schema.PUNSAFE, cfg.max_punsafe, out),
        "watermark": lambda out: above(schema.PWATERMARK, cfg.max_pwatermark, out),
        "small_image": lambda out: sizes(out, "small_image"),
        "extreme_aspect_ratio": lambda out: sizes(out, "extreme_aspect_ratio"),
    }
    code = np.full(n, len(FILTER_REASONS), dtype=np.int8)
    hit = ws.get(bool, n, 61)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(len(FILTER_REASONS) - 1, -1, -1):  # first failing rule wins
            if rules[FILTER_REASONS[i]](hit) is not None:
                _put(code, np.logical_and(hit, scored, out=hit), i, ws)
    return code


def _put(out: np.ndarray, flag: np.ndarray, value: Any, ws: Workspace) -> None:
    """``out[flag] = value`` for small integers, as ``out += flag * (value - out)``: no branch
    per row (a masked write over a random mask costs several times more)."""
    step = np.subtract(value, out, out=ws.get(out.dtype, len(out), 71))
    np.multiply(step, flag, out=step)
    np.add(out, step, out=out)


def _lookup(table: np.ndarray, codes: np.ndarray, ws: Workspace) -> np.ndarray:
    """``table[codes]`` in a scratch buffer (``numpy.take`` would first copy small integer
    codes to a fresh ``intp`` array). ``codes`` must index ``table``."""
    idx = ws.get(np.intp, len(codes), 70)
    np.copyto(idx, codes, casting="unsafe")
    return np.take(table, idx, out=ws.get(table.dtype, len(codes), 70), mode="clip")


def _final_codes(
    drop: tuple[np.ndarray, list[str], np.ndarray],
    status: tuple[np.ndarray, list[str], np.ndarray],
    sstat: tuple[np.ndarray, list[str], np.ndarray],
    filter_codes: np.ndarray,
    near: np.ndarray | None = None,
    ws: Workspace | None = None,
) -> tuple[np.ndarray, list[str]]:
    """:func:`laion_dask.stages.filters.final_reason` on codes, ``"kept"`` for none: the rule
    reason,
    else a failed download status, else ``unscorable_image``, else ``near_duplicate`` (where
    ``near`` is True), else the filter reason.

    ``drop``, ``status`` and ``sstat`` are ``(codes, labels, valid)`` of those columns (see
    :func:`_encode`); the result's labels are the union of the labels that can occur.
    """
    index: dict[str, int] = {}

    def ids(labels: Sequence[str]) -> np.ndarray:
        return np.array([index.setdefault(v, len(index)) for v in labels] or [0], dtype=np.int32)

    n = len(filter_codes)
    own_ws = ws is not None  # the result in its scratch buffer (else a new array)
    ws = ws or Workspace(n)
    kept_id = int(ids(["kept"])[0])
    table = np.append(ids(FILTER_REASONS), kept_id)
    out = ws.get(table.dtype, n, 90) if own_ws else np.empty(n, dtype=table.dtype)
    np.copyto(out, _lookup(table, filter_codes, ws))  # (out of _lookup's buffer, reused below)
    if near is not None and near.any():
        _put(out, near, int(ids([NEAR_DUPLICATE])[0]), ws)
    flag = ws.get(bool, n, 50)
    for (codes, labels, valid), fixed in ((sstat, "unscorable_image"), (status, None)):
        if "success" in labels:  # valid and not success
            np.logical_and(valid, np.not_equal(codes, labels.index("success"), out=flag), out=flag)
        else:
            np.copyto(flag, valid)
        _put(out, flag, int(ids([fixed])[0]) if fixed else _lookup(ids(labels), codes, ws), ws)
    codes, labels, valid = drop
    _put(out, valid, _lookup(ids(labels), codes, ws), ws)
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
    sim32 = _float32(df[schema.SIMILARITY])
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
    k-minimum-values sketch of the distinct domains (see :mod:`laion_dask.ground.sketches`)."""
    out: dict[str, Any] = {}
    for name, mask in masks.items():
        counts = bincount(codes, len(labels), mask, ws)
        out[name] = heavy_hitters(labels, counts, capacity)
        if name in DISTINCT_DOMAINS:
            present = np.flatnonzero(counts)
            out[f"distinct_{name}"] = distinct_sketch([labels[i] for i in present], distinct_k)
    return out


#: thread id -> that thread's scratch arrays (see :func:`_workspace`)
_WORKSPACES: dict[int, Workspace] = {}
_WORKSPACES_LOCK = threading.Lock()


def _workspace(rows: int) -> Workspace:
    """This thread's scratch arrays: a cache, so that a worker faults their pages in once, not
    once per partition. About 360 bytes per row of the largest partition seen (not all of it
    ever touched), plus 2 bytes per byte of its longest text column (URLs or captions; ~85 MB
    per 200,000 rows of short captions); :func:`summarize_run` releases them when it is done
    (:func:`release_workspaces`). :func:`partition_summary` keeps the columns it reads in named
    slots of them (its codes, validity, float32 similarity, counts): no slot number is shared
    by two arrays of one dtype that are alive at once.
    """
    key = threading.get_ident()
    ws = _WORKSPACES.get(key)
    if ws is None or ws.rows < rows:
        ws = Workspace(rows)
        with _WORKSPACES_LOCK:
            _WORKSPACES[key] = ws
    return ws


def release_workspaces() -> int:
    """Drop every thread's scratch arrays in this process (what a worker keeps from
    :func:`partition_summary`); returns how many bytes they held."""
    with _WORKSPACES_LOCK:
        held = sum(ws.nbytes for ws in _WORKSPACES.values())
        _WORKSPACES.clear()
    return held


def partition_summary(
    df: pd.DataFrame,
    cfg: FilterConfig,
    *,
    samples: int = SAMPLES_PER_GROUP,
    domain_capacity: int = DOMAIN_CAPACITY,
    distinct_k: int = DISTINCT_K,
) -> dict[str, Any]:
    """One scores partition -> a small mergeable summary (see :mod:`laion_dask.ground.sketches`).

    Parameters
    ----------
    df : pandas.DataFrame
        Rows of ``RUN/scores`` (every candidate row), at least :data:`COLUMNS`, with pandas'
        own dtypes (string columns as strings or categoricals) or ``pandas.ArrowDtype`` ones
        (what :func:`_read_part` reads); both give the same summary.
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
        Counts, histograms, sketches and samples; merge with
        :func:`laion_dask.ground.sketches.merge`.

    Notes
    -----
    One pass of Arrow / NumPy kernels: every string column is coded once (Parquet's own
    dictionary for the low-cardinality ones) and every count is a ``bincount`` of codes;
    integer histograms are one ``bincount`` of the values. The final reason is
    :func:`laion_dask.stages.filters.add_final_reason` vectorized (``tests/test_report.py`` checks
    they
    agree). Hosts and word counts are read off the UTF-8 bytes (bitmaps of delimiter and
    word-start bytes, prefix popcounts per row); the URLs the fast host rule cannot read
    (userinfo, IPv6 literals, schemes other than http(s)) take the regex.

    Arrow-backed columns are read from their buffers (no pandas conversion), and the
    full-length temporaries go to this thread's scratch arrays (:func:`_workspace`): Dask's
    Nanny sets ``MALLOC_TRIM_THRESHOLD_``, which pins glibc's mmap threshold at 128 KiB, so in
    a worker each fresh large array costs page faults (see
    ``ClusterConfig.malloc_mmap_threshold``). That goes for the per-column arrays too (codes,
    validity bitmaps unpacked by a byte lookup, the float32 similarity, counts): each has a
    slot of its own. Nulls are filled with no branch per row (``(codes - fill) * valid + fill``,
    NaN by bit masks): ``numpy.where`` over a random mask costs ten times more.
    """
    df = df.reset_index(drop=True)
    n = len(df)
    ws = _workspace(n)  # scratch arrays shared by the counting kernels
    gcodes, glabels, _ = _col_codes(df[schema.LANGUAGE_GROUP], "nolang", ws, 93)
    gidx = {g: i for i, g in enumerate(glabels)}
    in_group = {
        g: (gcodes == gidx[g]) if g in gidx else np.zeros(n, dtype=bool)
        for g in schema.LANGUAGE_GROUPS
    }
    text = _str_array(df[schema.TEXT])
    text = text.fill_null("") if text.null_count else text
    chars_i = _char_counts(text, ws)
    words = _word_counts_arrow(text, ws)
    sim32 = _float32(df[schema.SIMILARITY], ws, 87)
    fcodes = _fast_filter_codes(df, cfg, gcodes, glabels, chars_i, sim32, ws)
    rule_codes, rule_labels, rule_valid = _col_codes(df[schema.DROP_REASON], "kept", ws, 84)
    st_codes, st_labels, status_ok = _col_codes(df[schema.STATUS], "<NA>", ws, 85)
    ss_codes, ss_labels, ss_valid = _col_codes(df[schema.SCORE_STATUS], "<none>", ws, 86)
    final_codes, final_labels = _final_codes(
        (rule_codes, rule_labels, rule_valid),
        (st_codes, st_labels, status_ok),
        (ss_codes, ss_labels, ss_valid),
        fcodes,
        _near_mask(df),
        ws,
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
    dom_codes, dom_labels = _domain_codes(df[schema.URL], ws)
    lang_codes, lang_labels, _ = _col_codes(df[schema.LANGUAGE], "<none>", ws, 94)
    cols = {
        name: _col_values(df, col, ws, slot)
        for name, col, slot in (
            ("original_width", schema.ORIGINAL_WIDTH, 95),
            ("original_height", schema.ORIGINAL_HEIGHT, 96),
            ("stored_width", schema.WIDTH, 97),
            ("stored_height", schema.HEIGHT, 98),
            ("original_bytes", schema.ORIGINAL_BYTES, 99),
        )
    }
    values = {
        "punsafe": _float_values(df, schema.PUNSAFE, ws, 102),
        "pwatermark": _float_values(df, schema.PWATERMARK, ws, 103),
        **cols,
        "caption_chars": (chars_i, None),
        "caption_words": (words, None),
        "caption_chars_kept": (chars_i, None),
        "caption_words_kept": (words, None),
    }
    # each population's rows once; a histogram gathers its column's values of those rows into
    # scratch buffers (no fresh full-length selection per histogram)
    rows_of = {
        "scored": np.flatnonzero(scored),
        "downloaded": np.flatnonzero(downloaded),
        "kept": np.flatnonzero(kept),
    }
    for g in schema.LANGUAGE_GROUPS:
        in_g = np.logical_and(scored, in_group[g], out=ws.get(bool, n, 30))
        rows_of[f"scored_{g}"] = np.flatnonzero(in_g)
    hists = {}
    above = {}
    for name, (pop, spec) in HISTOGRAMS.items():
        if pop.startswith("scored_"):
            x, ok = _gather(sim32, None, rows_of[pop], ws)
        elif name == "aspect_ratio":
            x, ok = _aspect(cols["original_width"], cols["original_height"], rows_of[pop], ws), None
        else:
            x, ok = _gather(*values[name], rows_of.get(pop), ws)
        hists[name] = _hist(x, ok, spec, None, ws)
        if name in REFERENCE_CUTOFFS:
            cut = getattr(cfg, f"max_{name}")
            cut = REFERENCE_CUTOFFS[name] if cut is None else cut
            # compared in float64 (as filters), NaN > cut is False
            hit = np.greater(x, np.float64(cut), out=ws.get(bool, x.size, 30))
            above[name] = int(np.count_nonzero(hit if ok is None else np.logical_and(hit, ok)))
    # samples: random among kept downloaded rows; nearest the threshold among scored ones
    # random order = LAION's row hash (mmh3 of url + text): uniform, stable, already stored
    thr_of = np.array([cfg.similarity_for(g) for g in glabels] or [0.0], dtype="float32").astype(
        "float64"
    )  # as filters.similarity_threshold: float32
    has_image = downloaded & _has_value(df[schema.SHARD], ws, 104)
    # the candidates' rows only: random order = LAION's row hash (uniform, stable, stored)
    r_rows = np.flatnonzero(np.logical_and(kept, has_image, out=ws.get(bool, n, 30)))
    r_prio = _hash_prio(df[schema.HASH], r_rows, ws)
    t_rows = np.flatnonzero(np.logical_and(scored, has_image, out=ws.get(bool, n, 30)))
    # |similarity - threshold| in float64 (float32 values widened: exact), in scratch buffers
    m = t_rows.size
    t_sim = np.take(sim32, t_rows, out=ws.get(sim32.dtype, m, 80), mode="clip")
    t_thr = _lookup(
        thr_of, np.take(gcodes, t_rows, out=ws.get(gcodes.dtype, m, 80), mode="clip"), ws
    )
    t_dist = np.subtract(t_sim, t_thr, out=ws.get(np.float64, m, 80), dtype=np.float64)
    np.abs(t_dist, out=t_dist)
    picks = {}
    for kind, rows, prio in (("random", r_rows, r_prio), ("threshold", t_rows, t_dist)):
        for g, pick in _candidates_by_group(rows, prio, gcodes, gidx, samples, ws).items():
            picks[kind, g] = pick
    picked = _samples(df, picks, samples)
    random_s = {g: picked["random", g] for g in schema.LANGUAGE_GROUPS}
    thresh_s = {g: picked["threshold", g] for g in schema.LANGUAGE_GROUPS}
    # final reasons by group: one bincount of (group, reason) pairs
    nf = len(final_labels)
    pair = ws.get(np.intp, n, 51)
    np.copyto(pair, gcodes, casting="unsafe")
    np.multiply(pair, nf, out=pair)
    np.add(pair, final_codes, out=pair, casting="unsafe")
    pair = np.bincount(pair, minlength=len(glabels) * nf)
    final = {}
    for g in schema.LANGUAGE_GROUPS:
        row = pair[gidx[g] * nf : (gidx[g] + 1) * nf] if g in gidx else np.zeros(nf, np.intp)
        final[g] = {final_labels[i]: int(row[i]) for i in np.flatnonzero(row)}
    # groups of all rows and of kept ones from the same counts; languages from one bincount
    by_group = pair[: len(glabels) * nf].reshape(len(glabels), nf)
    lang_kept = ws.get(np.intp, n, 51)
    np.copyto(lang_kept, lang_codes, casting="unsafe")
    np.left_shift(lang_kept, 1, out=lang_kept)
    np.add(lang_kept, kept, out=lang_kept, casting="unsafe")
    lang_kept = np.bincount(lang_kept, minlength=2 * len(lang_labels))
    http_values, http_valid = _col_values(df, schema.HTTP_STATUS, ws, 101)
    f_rows = np.flatnonzero(failed)
    http = np.take(http_values, f_rows, out=ws.get(http_values.dtype, f_rows.size, 81), mode="clip")
    if http_valid is None:
        missing_http = np.isnan(http)
    else:
        missing_http = np.take(http_valid, f_rows, out=ws.get(bool, f_rows.size, 81), mode="clip")
        np.logical_not(missing_http, out=missing_http)
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
            "all": _counts_dict(lang_kept[0::2] + lang_kept[1::2], lang_labels),
            "kept": _counts_dict(lang_kept[1::2], lang_labels),
        },
        "groups": {
            "all": _counts_dict(by_group.sum(axis=1), glabels),
            "kept": _counts_dict(by_group[:, final_labels.index("kept")], glabels),
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


#: low-cardinality string columns read as Parquet's own dictionary (Arrow dictionary arrays)
DICTIONARY_COLUMNS = [
    schema.LANGUAGE,
    schema.LANGUAGE_GROUP,
    schema.DROP_REASON,
    schema.STATUS,
    schema.SCORE_STATUS,
    schema.SHARD,
]


def _read_part(run: RunDir, path: str) -> pd.DataFrame:
    """:data:`COLUMNS` of one scores part as ``pandas.ArrowDtype`` columns (zero-copy), with
    :data:`DICTIONARY_COLUMNS` dictionary-encoded (Parquet's own dictionary: no string is built
    or hashed for them); columns an older run lacks are added as missing values."""
    import pyarrow.parquet as pq

    with run.fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh, read_dictionary=DICTIONARY_COLUMNS)
        present = set(pf.schema_arrow.names)
        table = pf.read(columns=[c for c in COLUMNS if c in present])
    # Arrow-backed columns: no conversion here (pandas' own costs ~15 ms per 200k rows);
    # partition_summary reads their Arrow buffers
    df = table.to_pandas(types_mapper=pd.ArrowDtype)
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
    from laion_dask.products.knn import join_part_near_duplicates

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
    from laion_dask.orchestration.runner import get_client

    run = run if isinstance(run, RunDir) else RunDir(run)
    parts = sorted(run.markers("scores"))
    if not parts:
        raise FileNotFoundError(f"{run.path}: no scores; run the score stage first")
    client = get_client(client)
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
    try:
        return futures[0].result()
    finally:  # the workers' scratch arrays are a cache for this pass only
        try:
            client.run(release_workspaces)
        except Exception as err:  # a worker gone: its memory went with it
            log.warning("could not release the report's scratch arrays on workers: %s", err)


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
    from laion_dask.products.stats import check_funnel, funnel

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

    from laion_dask.ground.shards import read_shard_images

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
    from laion_dask.orchestration.runner import get_client

    run = run if isinstance(run, RunDir) else RunDir(run)
    wanted: dict[str, set[str]] = {}
    for kind in stats["samples"].values():
        for recs in kind.values():
            for r in recs:
                wanted.setdefault(r["shard"], set()).add(r["key"])
    if not wanted:
        return {}
    client = get_client(client)
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
    from laion_dask.orchestration.rundir import open_run

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

    from laion_dask.orchestration.cluster import close_client, make_client

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
