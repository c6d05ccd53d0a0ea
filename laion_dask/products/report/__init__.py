"""Dataset statistics of a run: ``RUN/report/stats.json``, ``report.html`` and ``report.md``.

Two halves: :mod:`.statistics` (one mergeable summary per scores partition, mapped and merged
by :mod:`laion_dask.orchestration.reduce`, then finished into the numbers below) and
:mod:`.rendering` (HTML with inline Bokeh plots, markdown). ``laion-dask report RUN``
(:mod:`laion_dask.faces.cli`) calls :func:`build_stats` then :func:`write_report`.

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
    tags             source ("zero-shot"|"head"), model, head, caveat (why punsafe / pwatermark
                     may mean little: the demo model, or no calibrated tag head; null when a
                     learned head made them)
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

from laion_dask.products.report.rendering import (
    collect_thumbnails,
    render_html,
    render_markdown,
    write_report,
)
from laion_dask.products.report.statistics import (
    COLUMNS,
    CONSENT_PATTERN,
    DISTINCT_K,
    DOMAIN_CAPACITY,
    HISTOGRAMS,
    SCHEMA_VERSION,
    build_stats,
    finalize,
    is_consent,
    partition_summary,
    read_part,
    summarize_run,
    tag_provenance,
    url_domain,
)

__all__ = [
    "COLUMNS",
    "CONSENT_PATTERN",
    "DISTINCT_K",
    "DOMAIN_CAPACITY",
    "HISTOGRAMS",
    "SCHEMA_VERSION",
    "build_stats",
    "collect_thumbnails",
    "finalize",
    "is_consent",
    "partition_summary",
    "read_part",
    "render_html",
    "render_markdown",
    "summarize_run",
    "tag_provenance",
    "url_domain",
    "write_report",
]
