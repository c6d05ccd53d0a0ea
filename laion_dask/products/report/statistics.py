"""The statistics of ``stats.json``: one summary per scores partition, merged, then finished.

:func:`partition_summary` is a plain function over one partition (pandas, numpy and
``pyarrow.compute``) returning a small mergeable dict (:mod:`laion_dask.ground.sketches`);
:func:`summarize_run` maps it over the run's parts and merges the results with
:func:`laion_dask.orchestration.reduce.map_reduce` (a tree reduction: rows never travel to the
client). Each row's fate comes from the one final-reason engine
(:func:`laion_dask.stages.filters.decide`), as ``materialize`` and ``explore`` get it.

- Histograms have fixed bins (:data:`HISTOGRAMS`); quantiles come from the merged counts and are
  within ``quantile_error`` (one bin width; a factor for log bins) of the exact order statistic.
- Counts of low-cardinality values (languages, groups, rule reasons, statuses, final reasons)
  are exact; a value no list knows is counted under its own name, never dropped.
- Domains are heavy-hitter summaries (:data:`DOMAIN_CAPACITY` counters, exact while a run has
  fewer distinct domains) and distinct-count sketches (exact below :data:`DISTINCT_K`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import re
import sys
import tomllib
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion_dask.ground import schema
from laion_dask.ground.config import FilterConfig, config_to_dict
from laion_dask.ground.sketches import (
    HistSpec,
    distinct_estimate,
    distinct_sketch,
    heavy_hitters,
    histogram,
    merge_all,
    quantiles,
    top_k,
)
from laion_dask.orchestration.reduce import map_reduce
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.neardup import join_part_near_duplicates
from laion_dask.products.stats import check_funnel, funnel
from laion_dask.stages.filters import (
    FILTER_REASONS,
    decide,
    fate_columns,
    load_thresholds,
    similarity_threshold,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
TOP_LANGUAGES = 30
TOP_DOMAINS = 30
TOP_FAILED_DOMAINS = 20
SAMPLES_PER_GROUP = 8
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
#: reference cut-offs when the filters keep punsafe / pwatermark as tags only (LAION-5B's)
REFERENCE_CUTOFFS = {"punsafe": 0.5, "pwatermark": 0.8}
#: counters per domain heavy-hitter summary, and hashes per distinct-domain sketch
DOMAIN_CAPACITY = 4096
DISTINCT_K = 4096
DISTINCT_DOMAINS = ("candidates", "images", "kept")

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
#: numeric columns behind the histograms that read one
_HIST_COLUMNS = {
    "original_width": schema.ORIGINAL_WIDTH,
    "original_height": schema.ORIGINAL_HEIGHT,
    "stored_width": schema.WIDTH,
    "stored_height": schema.HEIGHT,
    "original_bytes": schema.ORIGINAL_BYTES,
}

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
#: low-cardinality string columns read as Parquet's own dictionary (pandas categoricals)
DICTIONARY_COLUMNS = [
    schema.LANGUAGE,
    schema.LANGUAGE_GROUP,
    schema.DROP_REASON,
    schema.STATUS,
    schema.SCORE_STATUS,
    schema.SHARD,
]

#: the host of a URL (what every domain count uses)
DOMAIN_RE = "^" + schema.URL_SCHEME + r"://(?:[^@/?#]*@)?(?P<host>\[[^\]]*\]|[^/:?#]*)"
#: the authority of a URL: what follows ``scheme://`` up to the first of ``/?#``
_AUTHORITY_RE = "^" + schema.URL_SCHEME + r"://(?P<authority>[^/?#]*)"
#: ASCII whitespace as ``str.split()`` sees it; the non-ASCII kind is found by
#: :data:`_UNICODE_SPACE` and those rows counted by ``str.split()`` itself
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[[*range(9, 14), *range(28, 33)]] = True
_UNICODE_SPACE = "[\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


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


# --- reading a part -------------------------------------------------------------------------------


def _arrow_strings(t: pa.DataType) -> pd.ArrowDtype | None:
    # URLs and captions stay Arrow-backed (no Python strings); the rest: pandas' defaults
    return pd.ArrowDtype(t) if pa.types.is_string(t) or pa.types.is_large_string(t) else None


def read_part(run: RunDir, path: str) -> pd.DataFrame:
    """:data:`COLUMNS` of one scores part; columns an older run lacks are missing values."""
    with run.fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh, read_dictionary=DICTIONARY_COLUMNS)
        present = set(pf.schema_arrow.names)
        table = pf.read(columns=[c for c in COLUMNS if c in present])
    df = table.to_pandas(types_mapper=_arrow_strings)
    missing = [c for c in COLUMNS if c not in present]
    if missing:
        log.warning("%s lacks columns %s: counted as missing", path, missing)
        df = df.assign(**{c: pd.Series(None, index=df.index, dtype=object) for c in missing})
    return df[COLUMNS]


# --- per partition --------------------------------------------------------------------------------


def _strings(s: pd.Series) -> pa.LargeStringArray:
    """A string column as one Arrow large string array (nulls kept)."""
    arr = pa.array(s.astype("string[pyarrow]") if s.dtype == object else s)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr.cast(pa.large_string())


def _bytes_of(arr: pa.LargeStringArray) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of a large string array and its row offsets into them (from 0)."""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    data = arr.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return raw[offsets[0] : offsets[-1]], offsets - offsets[0]


def url_hosts(urls: pd.Series) -> pa.Array:
    """Host of each URL as :data:`DOMAIN_RE` captures it (null where it does not match).

    Plain pyarrow.compute: the authority (after ``scheme://``, up to the first of ``/?#``) is cut
    with a regex that cannot backtrack and taken up to its first ``:``; only authorities holding
    userinfo (``@``) or an IPv6 literal (``[``), rare, go through :data:`DOMAIN_RE` itself. On
    200k URLs of the report benchmark (one part): 41 ms, against 117 ms for DOMAIN_RE on every
    row and 54 ms for the numpy byte-table pass this replaces.
    """
    arr = _strings(urls)
    authority = pc.struct_field(pc.extract_regex(arr, pattern=_AUTHORITY_RE), [0])
    hosts = pc.list_element(pc.split_pattern(authority, ":", max_splits=1), 0)
    odd = pc.or_(pc.match_substring(authority, "@"), pc.match_substring(authority, "["))
    odd = odd.fill_null(False)
    if not pc.any(odd).as_py():
        return hosts
    slow = pc.struct_field(pc.extract_regex(arr.filter(odd), pattern=DOMAIN_RE), [0])
    return pc.replace_with_mask(hosts, odd, slow.cast(hosts.type))


def url_domain(urls: pd.Series) -> pd.Series:
    """Lower-cased host of each URL (``<none>`` when there is none)."""
    codes, labels = _domain_codes(urls)
    return pd.Series(np.asarray(labels, dtype=object)[codes], index=urls.index, dtype="string")


def _domain_codes(urls: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Codes and labels of :func:`url_domain` (each distinct host lower-cased once)."""
    enc = pc.dictionary_encode(url_hosts(urls).fill_null(""))
    lowered = pc.utf8_lower(enc.dictionary).to_pylist()
    labels, inverse = np.unique(
        np.array([h or "<none>" for h in lowered], dtype=object), return_inverse=True
    )
    codes = inverse.reshape(-1)[enc.indices.to_numpy(zero_copy_only=False)]
    return codes, [str(v) for v in labels]


def caption_words(text: pd.Series) -> np.ndarray:
    """Words per caption as ``len(s.split())`` counts them (0 when missing).

    A word starts at a non-space byte after a space or at its row's start, counted on the UTF-8
    bytes (no byte of a multi-byte character is an ASCII space); the rare captions holding a
    non-ASCII space are counted by ``str.split()``.
    """
    arr = _strings(text).fill_null("")
    raw, offsets = _bytes_of(arr)
    space = _ASCII_SPACE[raw]
    after_space = np.empty(raw.size, dtype=bool)
    after_space[1:] = space[:-1]
    after_space[offsets[:-1][offsets[:-1] < raw.size]] = True  # a row's first byte
    starts = np.flatnonzero(~space & after_space)  # word starts, in byte order
    words = np.diff(np.searchsorted(starts, offsets)).astype(np.int32)
    if raw.size and raw.max() >= 0x80:
        odd = pc.match_substring_regex(arr, _UNICODE_SPACE).to_numpy(zero_copy_only=False)
        words[odd] = [len(t.split()) for t in arr.filter(pa.array(odd)).to_pylist()]
    return words


def _counts(values: pd.Series, fill: str, mask: np.ndarray | None = None) -> dict[str, int]:
    """``{value: rows}`` (missing as ``fill``), most frequent first, ties by value.

    One bincount over the column's codes: the categoricals :func:`read_part` gives keep theirs,
    other strings get Arrow's dictionary codes (one part of the report benchmark: 3 ms for the
    five columns, against 19 ms through ``Series.value_counts``).
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes, names = values.cat.codes.to_numpy(), [str(c) for c in values.cat.categories]
    else:
        enc = pc.dictionary_encode(_strings(values))
        codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False)
        names = enc.dictionary.to_pylist()
    n = np.bincount((codes if mask is None else codes[mask]) + 1, minlength=len(names) + 1)
    out = {fill: int(n[0])} if n[0] else {}
    for i in np.flatnonzero(n[1:]):
        out[names[i]] = out.get(names[i], 0) + int(n[i + 1])
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def _code_counts(codes: np.ndarray, labels: list[str], mask: np.ndarray) -> dict[str, int]:
    n = np.bincount(codes[mask], minlength=len(labels))
    return {labels[i]: int(n[i]) for i in np.flatnonzero(n)}


_SAMPLE_COLUMNS = (
    schema.KEY,
    schema.SHARD,
    schema.TEXT,
    schema.URL,
    schema.LANGUAGE,
    schema.SIMILARITY,
)


def _text(value: Any) -> str:
    return "<NA>" if value is None or pd.isna(value) else str(value)


def _samples(
    df: pd.DataFrame, wanted: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]], k: int
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """For each ``(kind, group): (rows, prio)``, the ``k`` rows with the smallest ``(prio, key)``
    as sample records: ``{kind: {group: records}}``.

    The candidate rows of every request are read from ``df`` in one take per column (one part of
    the report benchmark: 6 ms, against 21 ms for a take per request and column).
    """
    near = {}
    for name, (rows, prio) in wanted.items():
        if rows.size > k:  # the k smallest priorities, ties at the k-th one included
            keep = prio <= np.partition(prio, k - 1)[k - 1]
            rows, prio = rows[keep], prio[keep]
        near[name] = (rows, prio)
    every = np.unique(np.concatenate([rows for rows, _ in near.values()]))
    values = {c: df[c].iloc[every].tolist() for c in _SAMPLE_COLUMNS}
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for (kind, group), (rows, prio) in near.items():
        at = np.searchsorted(every, rows)
        keys = ["" if pd.isna(v := values[schema.KEY][i]) else str(v) for i in at]
        order = np.lexsort((np.asarray(keys, dtype=object), prio))[:k]
        out.setdefault(kind, {})[group] = [
            {
                "key": _text(values[schema.KEY][i]),
                "shard": _text(values[schema.SHARD][i]),
                "text": _text(values[schema.TEXT][i])[:200],
                "url": _text(values[schema.URL][i]),
                "language": _text(values[schema.LANGUAGE][i]),
                "similarity": None if pd.isna(sim := values[schema.SIMILARITY][i]) else float(sim),
                "prio": float(p),
            }
            for i, p in zip(at[order], prio[order], strict=True)
        ]
    return out


def partition_summary(
    df: pd.DataFrame,
    cfg: FilterConfig,
    *,
    samples: int = SAMPLES_PER_GROUP,
    domain_capacity: int = DOMAIN_CAPACITY,
    distinct_k: int = DISTINCT_K,
) -> dict[str, Any]:
    """One scores partition -> a small mergeable summary (merge with
    :func:`laion_dask.ground.sketches.merge_all`).

    Parameters
    ----------
    df : pandas.DataFrame
        Rows of ``RUN/scores`` (every candidate row) with at least :data:`COLUMNS`.
    cfg : FilterConfig
        The thresholds that decide ``kept`` (as ``materialize`` applies them).
    samples : int
        Sample records kept per language group (random and at the threshold).
    domain_capacity, distinct_k : int
        Size of each domain heavy-hitter summary and distinct-domain sketch (exact below).
    """
    df = df.reset_index(drop=True)
    n = len(df)
    cols = fate_columns(df)
    fate = decide(cols, cfg)
    group = cols.group
    kept = fate.final == 0
    sim = cols.similarity
    rules = df[schema.DROP_REASON]
    status = df[schema.STATUS]
    sstatus = df[schema.SCORE_STATUS]
    attempted = (rules.isna() & status.notna()).to_numpy(dtype=bool)
    downloaded = status.eq("success").to_numpy(dtype=bool, na_value=False)
    scored = sstatus.eq("success").to_numpy(dtype=bool, na_value=False) & ~np.isnan(sim)
    failed = attempted & ~downloaded
    in_group = [group == i for i in range(len(schema.LANGUAGE_GROUPS))]
    pops = {"candidates": None, "scored": scored, "downloaded": downloaded, "kept": kept}
    pops.update({f"scored_{g}": scored & in_group[i] for i, g in enumerate(schema.LANGUAGE_GROUPS)})

    def column(name: str) -> np.ndarray:
        if df[name].dtype.kind in "fi":  # numpy numbers (Arrow's nullable ints come as floats)
            return df[name].to_numpy(dtype="float64")
        return df[name].to_numpy(dtype="float64", na_value=np.nan)

    width, height = cols.width, cols.height
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(height > 0, width / height, np.nan)
    words = caption_words(df[schema.TEXT])
    values = {
        "punsafe": cols.punsafe,
        "pwatermark": cols.pwatermark,
        "aspect_ratio": aspect,
        "caption_chars": cols.text_len,
        "caption_words": words,
        "caption_chars_kept": cols.text_len,
        "caption_words_kept": words,
        **{name: column(c) for name, c in _HIST_COLUMNS.items()},
    }
    hists, above = {}, {}
    for name, (pop, spec) in HISTOGRAMS.items():
        x = sim if pop.startswith("scored_") else values[name]
        hists[name] = histogram(x, spec, pops[pop])
    for name, ref in REFERENCE_CUTOFFS.items():
        cut = getattr(cfg, f"max_{name}")
        with np.errstate(invalid="ignore"):  # NaN > cut is False
            above[name] = int(
                np.count_nonzero(scored & (values[name] > (ref if cut is None else cut)))
            )
    # final reasons per language group: one bincount of (group, final code) pairs
    names = ["kept", *fate.reasons]
    pair = np.bincount(group.astype(np.intp) * len(names) + fate.final, minlength=3 * len(names))
    pair = pair.reshape(len(schema.LANGUAGE_GROUPS), len(names))
    final = {
        g: {names[j]: int(pair[i, j]) for j in np.flatnonzero(pair[i])}
        for i, g in enumerate(schema.LANGUAGE_GROUPS)
    }
    # samples: random = LAION's row hash (uniform, stable, stored) among kept rows with an
    # image; at the threshold = nearest the group's similarity cut among scored ones
    has_image = downloaded & df[schema.SHARD].notna().to_numpy(dtype=bool)
    hashes = np.nan_to_num(
        column(schema.HASH) if df[schema.HASH].dtype != np.int64 else df[schema.HASH].to_numpy(),
        nan=0.0,
    )
    random_prio = hashes / 2.0**63
    thr = similarity_threshold(group, cfg).astype("float64")
    dist = np.abs(sim.astype("float64") - thr)
    wanted = {}
    for i, g in enumerate(schema.LANGUAGE_GROUPS):
        r_rows = np.flatnonzero(kept & has_image & in_group[i])
        t_rows = np.flatnonzero(scored & has_image & in_group[i])
        wanted["random", g] = (r_rows, random_prio[r_rows])
        wanted["threshold", g] = (t_rows, dist[t_rows])
    picked = _samples(df, wanted, samples)
    http = column(schema.HTTP_STATUS)[failed]
    http_counts = {
        str(int(c)): int(k)
        for c, k in zip(*np.unique(http[~np.isnan(http)], return_counts=True), strict=True)
    }
    if np.isnan(http).any():
        http_counts["none"] = int(np.isnan(http).sum())
    dom_codes, dom_labels = _domain_codes(df[schema.URL])
    domains: dict[str, Any] = {}
    for name, mask in (
        ("candidates", np.ones(n, bool)),
        ("images", downloaded),
        ("kept", kept),
        ("failed", failed),
    ):
        counts = np.bincount(dom_codes[mask], minlength=len(dom_labels))
        domains[name] = heavy_hitters(dom_labels, counts, domain_capacity)
        if name in DISTINCT_DOMAINS:
            present = [dom_labels[i] for i in np.flatnonzero(counts)]
            domains[f"distinct_{name}"] = distinct_sketch(present, distinct_k)
    filters = [*FILTER_REASONS, "passed"]
    language = df[schema.LANGUAGE]
    gnames = list(schema.LANGUAGE_GROUPS)
    return {
        "rows": n,
        "partitions": 1,
        "final": final,
        "stages": {
            "rules": _counts(rules, "kept"),
            "download": _counts(status, "<NA>", attempted),
            "score": _counts(sstatus, "<none>", downloaded),
            "filters": _code_counts(fate.filtered.astype(np.intp), filters, scored),
        },
        "languages": {
            "all": _counts(language, "<none>"),
            "kept": _counts(language, "<none>", kept),
        },
        "groups": {
            "all": _code_counts(group.astype(np.intp), gnames, np.ones(n, bool)),
            "kept": _code_counts(group.astype(np.intp), gnames, kept),
        },
        "http_status": http_counts,
        "domains": domains,
        "hist": hists,
        "above": above,
        "scored": int(np.count_nonzero(scored)),
        "samples": picked,
    }


# --- the run --------------------------------------------------------------------------------------


def _summarize_part(
    part: int, run: RunDir, cfg: FilterConfig, samples: int, options: Mapping[str, int]
) -> dict[str, Any]:
    df = join_part_near_duplicates(run, part, read_part(run, run.part_path("scores", part)))
    return partition_summary(df, cfg, samples=samples, **options)


def _merge(summaries: list[dict[str, Any]], k: int = SAMPLES_PER_GROUP) -> dict[str, Any]:
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
    """Merged :func:`partition_summary` of every scores partition: one task per partition,
    merged ``fan_in`` at a time (:func:`~laion_dask.orchestration.reduce.map_reduce`)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    parts = sorted(run.markers("scores"))
    if not parts:
        raise FileNotFoundError(f"{run.path}: no scores; run the score stage first")
    options = {"domain_capacity": domain_capacity, "distinct_k": distinct_k}
    func = functools.partial(_summarize_part, run=run, cfg=cfg, samples=samples, options=options)
    merge = functools.partial(_merge, k=samples)
    return map_reduce(func, parts, merge, client=client, fan_in=fan_in)


# --- final statistics -----------------------------------------------------------------------------


def _thresholds(run: RunDir) -> tuple[FilterConfig, str]:
    path = run.join("dataset", "thresholds.toml")
    if run.exists(path):
        return load_thresholds(path), "RUN/dataset/thresholds.toml"
    return run.read_config().filters, "config"


def _versions() -> dict[str, str]:
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


#: the model ``laion-dask demo`` scores with (a small CLIP trained on the generated corpus)
DEMO_MODEL_NAME = "demo-clip"


def tag_provenance(run: RunDir) -> dict[str, Any]:
    """Where the run's punsafe / pwatermark come from, and why they may mean little.

    Tags are calibrated probabilities only from a learned tag head (``clip.tags = "head"``,
    trained on labelled images as LAION's punsafe detector is); zero-shot tags are prompt
    similarities soft-maxed, and the demo's tiny CLIP has never seen unsafe or watermarked
    images at all, so its tags (e.g. 0.99998 for "a blue house on a white background") carry
    no information.
    """
    clip = run.read_config().clip
    demo = PurePosixPath(str(clip.model).rstrip("/")).name == DEMO_MODEL_NAME
    if demo:
        caveat = (
            "tags come from the demo model, a tiny CLIP trained on a generated corpus without "
            "unsafe or watermarked images: its punsafe / pwatermark are not meaningful"
        )
    elif clip.tags != "head":
        caveat = (
            "zero-shot tags (prompt similarities) from an uncalibrated model: no learned tag "
            "head was used, so treat these shares as rough"
        )
    else:
        caveat = None
    return {"source": clip.tags, "model": clip.model, "head": clip.tag_head, "caveat": caveat}


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
        "kind": fsk["sketch"],
        "capacity": int(fsk["capacity"]),
        "max_undercount": undercount,
        "exact": {k: v == 0 for k, v in undercount.items()},
        "distinct_kind": doms["distinct_candidates"]["sketch"],
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
    """Everything ``stats.json`` holds (schema in the package docstring)."""
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
        "tags": tag_provenance(run),
        **body,
    }
