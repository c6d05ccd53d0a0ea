"""Counts that add up, read from a run's checkpoints (cheap: markers only, no data scan).

``funnel(run)`` gives one row per (stage, outcome) with the rows each stage saw, so a user (and
the demo) can check: rows in = rows kept + sum of rows dropped per reason, at every stage.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pandas as pd

from laion_dask.ground import schema
from laion_dask.orchestration.rundir import RunDir

__all__ = ["funnel", "format_funnel", "check_funnel", "consent_summary"]

#: extraction drop reasons that record a page's own opt-out (the rest are quality rules)
PAGE_OPTOUT_REASONS = ("page_robots_meta", "page_tdm_reservation")


def _extract_counts(run: RunDir) -> tuple[int, Counter[str], dict[str, int]]:
    counts: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    found = 0
    for _, m in run.iter_markers("candidates"):
        counts.update(m["drop_reasons"])
    for _, m in run.iter_markers("extract"):
        found += int(m["summary"]["pairs_found"])
        bad.update(m["summary"].get("bad_records", {}))
    return found, counts, dict(bad)


def funnel(run: RunDir | str) -> pd.DataFrame:
    """Rows per stage and outcome: columns ``stage, outcome, rows`` (``kept`` = passed on)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    rows: list[dict[str, Any]] = []
    found, ext, _ = _extract_counts(run)
    if found or ext:
        rows.append({"stage": "extract", "outcome": "pairs_found", "rows": found})
        rows += [{"stage": "extract", "outcome": k, "rows": v} for k, v in sorted(ext.items())]
    dl: Counter[str] = Counter()
    for _, m in run.iter_markers("downloads"):
        dl.update({k: v for k, v in m["status"].items() if k != "not_attempted"})
    if dl:
        rows.append({"stage": "download", "outcome": "attempted", "rows": sum(dl.values())})
        rows += [{"stage": "download", "outcome": k, "rows": v} for k, v in sorted(dl.items())]
    sc: Counter[str] = Counter()
    for _, m in run.iter_markers("scores"):
        sc.update(m["score_status"])
    if sc:
        rows.append({"stage": "score", "outcome": "attempted", "rows": sum(sc.values())})
        rows += [{"stage": "score", "outcome": k, "rows": v} for k, v in sorted(sc.items())]
    path = run.join("dataset", "funnel.json")
    if run.exists(path):
        with run.fs.open(path, "rb") as fh:
            mat = json.load(fh)
        rows.append({"stage": "materialize", "outcome": "rows_in", "rows": mat["rows_in"]})
        rows += [
            {"stage": "materialize", "outcome": f"kept_{g}", "rows": n}
            for g, n in mat["kept"].items()
        ]
        rows += [
            {"stage": "materialize", "outcome": k, "rows": v} for k, v in mat["dropped"].items()
        ]
    return pd.DataFrame(rows, columns=["stage", "outcome", "rows"])


def consent_summary(run: RunDir | str) -> dict[str, int]:
    """Rows removed by each opt-out signal and blocklist, every one listed (0 when none).

    Page-level opt-outs come from the extraction drop reasons, the rest from the download
    statuses (``schema.CONSENT_STATUSES``); the same rows are counted in :func:`funnel`, this is
    the view of them a report's consent section shows.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    _, ext, _ = _extract_counts(run)
    dl: Counter[str] = Counter()
    for _, m in run.iter_markers("downloads"):
        dl.update(m["status"])
    out = {r: int(ext.get(r, 0)) for r in PAGE_OPTOUT_REASONS}
    out.update({s: int(dl.get(s, 0)) for s in schema.CONSENT_STATUSES})
    return out


_TOTALS = {"pairs_found", "attempted", "rows_in"}


def check_funnel(table: pd.DataFrame) -> dict[str, bool]:
    """Per stage: does the total equal the sum of its outcomes?"""
    out = {}
    for stage, grp in table.groupby("stage", sort=False):
        total = grp.loc[grp["outcome"].isin(_TOTALS), "rows"].sum()
        parts = grp.loc[~grp["outcome"].isin(_TOTALS), "rows"].sum()
        out[str(stage)] = bool(total == parts)
    return out


def format_funnel(table: pd.DataFrame) -> str:
    """A plain-text funnel for terminals, with the add-up check per stage."""
    checks = check_funnel(table)
    lines = []
    for stage, grp in table.groupby("stage", sort=False):
        ok = "counts add up" if checks[str(stage)] else "COUNTS DO NOT ADD UP"
        lines.append(f"{stage}  ({ok})")
        for _, r in grp.iterrows():
            indent = "  " if r["outcome"] in _TOTALS else "      "
            lines.append(f"{indent}{r['outcome']:<26}{r['rows']:>10,}")
    return "\n".join(lines)
