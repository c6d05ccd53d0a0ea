"""Size against quality of a run's evaluated candidates (``laion-dask evaluate``), for the
dashboard's tab and the notebooks.

:func:`quality_plot` is the HoloViews element (no Panel, no server): one point per candidate at
(rows kept, measure), a 95 % interval bar, the candidate's name beside it, and a dashed line at
the baseline's value. :func:`evaluate_view` wraps it in a Panel layout with a measure selector,
the table behind it and the caveat. :class:`EvaluateTab` is the dashboard's tab: it poses
candidates (the thresholds the sliders set, "keep top X"), trains them on the dashboard's
cluster and redraws that view with the results.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn

from laion_dask.ground.config import ConfigError, FilterConfig
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.evaluate import (
    BASELINE,
    EvaluateConfig,
    EvaluateError,
    evaluate,
    read_results,
)

__all__ = ["KIND_COLORS", "quality_plot", "results_table", "evaluate_view", "EvaluateTab"]

log = logging.getLogger(__name__)

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


class EvaluateTab:
    """Pose candidates, train them at equal compute on the dashboard's cluster, see the result.

    Candidates: the baseline (always), the thresholds the dashboard's sliders set now (named
    ``dashboard``, when ticked) and each "keep top X" share typed in. The budget's steps and
    seeds can be set here; the rest is :class:`EvaluateConfig`'s. ``thresholds()`` gives the
    sliders' thresholds, ``client()`` the dashboard's ``distributed.Client`` (made on first use),
    ``where`` names it for the status line.
    """

    def __init__(
        self,
        run: RunDir,
        thresholds: Callable[[], FilterConfig],
        client: Callable[[], Any],
        where: Callable[[], str],
    ) -> None:
        self.run = run
        self._thresholds, self._client, self._where = thresholds, client, where
        budget = EvaluateConfig()
        self.use_sliders = pn.widgets.Checkbox(
            label="the thresholds set above (candidate 'dashboard')", value=True
        )
        self.fractions = pn.widgets.TextInput(
            label="keep top shares (space-separated)",
            value="0.3 0.1",
            width=220,
            css_classes=["evaluate-fractions"],
        )
        self.steps = pn.widgets.IntInput(
            label="steps", value=budget.steps, start=1, width=90, css_classes=["evaluate-steps"]
        )
        self.seeds = pn.widgets.IntInput(
            label="seeds", value=budget.seeds, start=1, width=90, css_classes=["evaluate-seeds"]
        )
        self.heldout = pn.widgets.TextInput(
            label="held-out folder (CLASS/IMAGE files; a demo run draws its own)",
            width=420,
            css_classes=["evaluate-heldout"],
        )
        self.button = pn.widgets.Button(
            label="evaluate", color="primary", css_classes=["evaluate-button"]
        )
        self.progress = pn.indicators.Progress(active=False, visible=False, value=-1, width=280)
        self.status = pn.pane.Markdown("", css_classes=["evaluate-status"], width=900)
        self.results = pn.Column(evaluate_view(run))
        self.button.on_click(self._on_click)
        self.layout = pn.Column(
            "### Which thresholds train the better model?",
            pn.Row(self.use_sliders, self.fractions, self.steps, self.seeds),
            pn.Row(self.heldout, self.button),
            self.progress,
            self.status,
            self.results,
        )

    def request(self) -> dict[str, Any]:
        """What :func:`evaluate` is asked, from the widgets; a one-line error for what cannot
        be meant (:class:`EvaluateError` or :class:`ConfigError`)."""
        text = self.fractions.value.replace(",", " ").split()
        try:
            fractions = [float(x) for x in text]
        except ValueError:
            fractions = [-1.0]
        if not all(0 < x <= 1 for x in fractions):
            raise EvaluateError(
                f"keep top shares must be numbers in (0, 1], got {self.fractions.value!r}"
            )
        filters = {"dashboard": self._thresholds()} if self.use_sliders.value else {}
        return {
            "fractions": fractions,
            "filters": filters,
            "cfg": EvaluateConfig(steps=self.steps.value or 0, seeds=self.seeds.value or 0),
            "heldout": self.heldout.value.strip() or None,
        }

    def run_evaluation(self, asked: dict[str, Any] | None = None) -> dict[str, Any]:
        """Evaluate ``asked`` (default: what the widgets pose) on the dashboard's client, on
        this thread."""
        asked = asked or self.request()  # checked before a cluster starts
        client = self._client()
        with client.as_current():
            return evaluate(self.run, client=client, **asked)

    async def _on_click(self, event: Any = None) -> None:
        self.button.disabled = True
        self.progress.param.update(visible=True, active=True)
        self.status.object = f"training each candidate … on {html.escape(self._where())}"
        t0 = time.perf_counter()
        try:
            # the trainings run on the cluster; this session's loop stays free meanwhile
            asked = self.request()  # the widgets read on the session's thread
            results = await asyncio.to_thread(self.run_evaluation, asked)
        except (EvaluateError, ConfigError) as err:  # asked for what cannot be meant
            self.status.object = f"**cannot evaluate**: {html.escape(str(err))}"
        except Exception as err:  # noqa: BLE001 - shown to the user, logged
            log.exception("dashboard: evaluate failed")
            self.status.object = f"**evaluate failed**: {html.escape(str(err))}"
        else:
            self.results.objects = [evaluate_view(self.run)]
            win = results["winner"]
            self.status.object = (
                f"evaluated {len(results['candidates'])} candidates in "
                f"{time.perf_counter() - t0:.0f} s; best by {win['measure']}: **{win['name']}**"
            )
        finally:
            self.progress.param.update(visible=False, active=False)
            self.button.disabled = False
