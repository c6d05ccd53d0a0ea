"""Size against quality of a run's evaluated candidates (``laion-dask evaluate``), for the
dashboard's tab and the notebooks.

:func:`quality_plot` is the HoloViews element (no Panel, no server): one point per candidate at
(rows kept, measure), a 95 % interval bar, the candidate's name beside it, and a dashed line at
the baseline's value. :func:`evaluate_view` wraps it in a Panel layout with a measure selector,
the table behind it and the caveat.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn

from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.evaluate import BASELINE, read_results

__all__ = ["KIND_COLORS", "quality_plot", "results_table", "evaluate_view"]

#: one colour per kind of candidate
KIND_COLORS = {"baseline": "#555555", "thresholds": "#1f77b4", "top_fraction": "#d62728"}


def quality_plot(
    frame: pd.DataFrame, measure: str, *, width: int = 640, height: int = 380
) -> hv.Overlay:
    """Rows kept (x) against ``measure`` (y) with interval bars, one labelled point per candidate.

    ``frame`` is ``RUN/evaluate/results.parquet`` (one row per candidate and measure).
    """
    if "bokeh" not in hv.Store.renderers:  # the plot needs a backend to take options
        hv.extension("bokeh", logo=False)
    rows = frame[frame["measure"] == measure].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"no results for measure {measure!r}")
    data = rows.assign(
        err_low=rows["mean"] - rows["ci_low"],
        err_high=rows["ci_high"] - rows["mean"],
        color=rows["kind"].map(KIND_COLORS).fillna("#777777"),
    )
    points = hv.Points(
        data, kdims=["rows", "mean"], vdims=["candidate", "ci_low", "ci_high", "color"]
    ).opts(color="color", size=11, tools=["hover"])
    bars = hv.ErrorBars(
        data, kdims=["rows"], vdims=["mean", "err_low", "err_high"], horizontal=False
    ).opts(line_width=2, color="#333333")
    labels = hv.Labels(data, kdims=["rows", "mean"], vdims=["candidate"]).opts(
        xoffset=0, yoffset=0, text_font_size="9pt", text_align="left", text_baseline="bottom"
    )
    layers: list[Any] = [bars, points, labels]
    base = data[data["candidate"] == BASELINE]
    if len(base):
        layers.insert(
            0, hv.HLine(float(base["mean"].iloc[0])).opts(color="#999999", line_dash="dashed")
        )
    lo = float(np.nanmin(data["ci_low"]))
    hi = float(np.nanmax(data["ci_high"]))
    pad = max((hi - lo) * 0.15, 0.01)
    return hv.Overlay(layers).opts(
        title=f"{measure} against subset size (95 % interval)",
        width=width,
        height=height,
        xlabel="rows kept (training pairs)",
        ylabel=measure,
        ylim=(lo - pad, hi + pad),
        xlim=(0, float(data["rows"].max()) * 1.25),
        show_legend=False,
    )


def results_table(frame: pd.DataFrame, measure: str) -> pd.DataFrame:
    """The numbers behind :func:`quality_plot`: size, value, interval, difference to baseline."""
    rows = frame[frame["measure"] == measure]
    out = rows[["candidate", "source", "rows", "mean", "ci_low", "ci_high", "vs_baseline"]].copy()
    out["vs_baseline 95 %"] = [
        "" if np.isnan(lo) else f"[{lo:+.3f}, {hi:+.3f}]"
        for lo, hi in zip(rows["vs_baseline_low"], rows["vs_baseline_high"], strict=True)
    ]
    return out.set_index("candidate").round(4)


def evaluate_view(run_path: str | Path | RunDir) -> pn.viewable.Viewable:
    """A Panel layout of ``RUN/evaluate``: size against quality, the table, the caveat.

    Without results it says how to make them.
    """
    pn.extension(sizing_mode="fixed")
    try:
        results, frame = read_results(run_path)
    except FileNotFoundError as err:
        return pn.pane.Markdown(f"**No evaluation yet.** {html.escape(str(err))}")
    measures = list(dict.fromkeys(frame["measure"]))
    select = pn.widgets.Select(label="measure", options=measures, value=results["primary"])
    winner = results["winner"]
    vs = next(
        (
            c["measures"][winner["measure"]].get("vs_baseline")
            for c in results["candidates"]
            if c["name"] == winner["name"]
        ),
        None,
    )
    line = f"**Best by {winner['measure']}: {winner['name']}** ({winner['mean']:.3f}"
    if vs and winner["name"] != BASELINE:
        line += (
            f"; {vs['difference']:+.3f} against {BASELINE}, 95 % interval "
            f"[{vs['ci_low']:+.3f}, {vs['ci_high']:+.3f}]"
        )
    held = results["heldout"]
    budget = results["budget"]
    facts = (
        f"{line}). Held-out: {held['images']} images, {held['classes']} classes "
        f"({held['source']}); every candidate trained {budget['steps']} steps of "
        f"{budget['batch_size']} pairs, seeds {budget['seed']}."
    )
    return pn.Column(
        pn.pane.Markdown(f"### Candidate filters, trained at equal compute\n\n{facts}"),
        select,
        pn.pane.HoloViews(
            pn.bind(lambda m: quality_plot(frame, m), select), css_classes=["evaluate-plot"]
        ),
        pn.pane.DataFrame(pn.bind(lambda m: results_table(frame, m), select), width=900),
        pn.pane.Markdown(f"*{results['caveat']}*", width=900),
    )
