"""Counts that add up, read from a run's checkpoints (cheap: markers only, no data scan).

``funnel(run)`` gives one row per (stage, outcome) with the rows each stage saw, so a user (and
the demo) can check: rows in = rows kept + sum of rows dropped per reason, at every stage.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pandas as pd

from laion_dask.ground import schema
from laion_dask.orchestration.rundir import RunDir

__all__ = ["funnel", "format_funnel", "check_funnel", "consent_summary"]

#: extraction drop reasons that record a page's own opt-out (the rest are quality rules)
PAGE_OPTOUT_REASONS = ("page_robots_meta", "page_tdm_reservation")


def _counts(run: RunDir, stage: str, field: str) -> Counter[str]:
    """The ``field`` counts of every finished partition of ``stage``, summed."""
    total: Counter[str] = Counter()
    for _, m in run.iter_markers(stage):
        total.update(m[field])
    return total


def funnel(run: RunDir | str) -> pd.DataFrame:
    """Rows per stage and outcome: columns ``stage, outcome, rows`` (``kept`` = passed on)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    rows: list[tuple[str, str, int]] = []

    def add(stage: str, total: str, rows_in: int, outcomes: Iterable[tuple[str, int]]) -> None:
        rows.append((stage, total, rows_in))
        rows.extend((stage, k, v) for k, v in outcomes)

    found = sum(int(m["summary"]["pairs_found"]) for _, m in run.iter_markers("extract"))
    ext = _counts(run, "candidates", "drop_reasons")
    if found or ext:
        add("extract", "pairs_found", found, sorted(ext.items()))
    dl = _counts(run, "downloads", "status")
    del dl["not_attempted"]  # rows no download was tried for are not the stage's input
    sc = _counts(run, "scores", "score_status")
    for stage, counts in (("download", dl), ("score", sc)):
        if counts:
            add(stage, "attempted", counts.total(), sorted(counts.items()))
    path = run.join("dataset", "funnel.json")
    if run.exists(path):
        mat = run.read_json(path)
        kept = [(f"kept_{g}", n) for g, n in mat["kept"].items()]
        add("materialize", "rows_in", mat["rows_in"], [*kept, *mat["dropped"].items()])
    return pd.DataFrame(rows, columns=["stage", "outcome", "rows"])


def consent_summary(run: RunDir | str) -> dict[str, int]:
    """Rows removed by each opt-out signal and blocklist, every one listed (0 when none).

    Page-level opt-outs come from the extraction drop reasons, the rest from the download
    statuses (``schema.CONSENT_STATUSES``); the same rows are counted in :func:`funnel`, this is
    the view of them a report's consent section shows.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    ext = _counts(run, "candidates", "drop_reasons")
    dl = _counts(run, "downloads", "status")
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
