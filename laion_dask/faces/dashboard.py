"""The Panel threshold dashboard: tune a run's thresholds on its stored scores, then materialize.

``build_dashboard(RUN)`` returns the Panel layout; ``main`` serves it (``laion-dask dashboard RUN``)
and ``dashboards/thresholds.py`` is the same app for ``panel serve``. The run's scores are read
once (:func:`laion_dask.products.explore.open_run`, cached per path); every widget change after
that is
answered from memory: the funnel is :meth:`~laion_dask.products.explore.RunView.kept_at` (one
numpy pass),
histograms are drawn once from the view's precomputed bins (HoloViews, rendered once per
session) and only their threshold lines (Bokeh ``Span``) and the funnel bars' counts update in
place; nothing is rescored. Thumbnails follow a slider while it is dragged, throttled to one
refresh per :data:`SAMPLES_INTERVAL_MS` on a worker thread (the last position always shows);
precision/recall refresh when a slider is released.

Views: similarity histogram per language group with a slider per group and a "keep top X %"
input that moves them, the live funnel (kept per group, dropped per reason), images with captions
and scores just either side of the selected cut-off (similarity of a language group, punsafe or
pwatermark), the language mix, width x height density, caption length, punsafe / pwatermark with
their own thresholds, precision/recall when ``RUN/corpus/ground_truth.parquet`` exists, a button
writing ``RUN/thresholds.toml`` and one running
:func:`laion_dask.products.materialize.materialize` with a
progress bar that moves as each partition finishes. Materialize runs where the run's
``[cluster]`` config says (:func:`laion_dask.orchestration.cluster.make_client`: its scheduler
address, else a
local cluster started on first use and closed with the session).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import html
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import holoviews as hv
import panel as pn
import param
from bokeh.document import without_document_lock

from laion_dask.faces import plots
from laion_dask.faces.serving import add_serve_arguments, serve, set_log_level
from laion_dask.ground import schema
from laion_dask.ground.config import ClusterConfig, ConfigError, FilterConfig
from laion_dask.orchestration.cluster import close_client, make_client
from laion_dask.products.explore import ALL, TEXT_LENGTH, Funnel, RunView, open_run, samples_html
from laion_dask.products.materialize import materialize

log = logging.getLogger(__name__)

__all__ = ["ThresholdDashboard", "build_dashboard", "load_view", "main"]

#: how many samples on each side of the threshold
N_SAMPLES = 6
#: while a slider is dragged, the samples refresh at most this often (the server stays free)
SAMPLES_INTERVAL_MS = 250
#: cut-offs the sample grid can follow: label -> column
SAMPLE_CUTOFFS = {
    "similarity": schema.SIMILARITY,
    "punsafe": schema.PUNSAFE,
    "pwatermark": schema.PWATERMARK,
}
_FRACTION_OFF = 1.0  # a punsafe / pwatermark slider at 1.0 means "tag only" (None)


@functools.lru_cache(maxsize=4)
def _cached_view(path: str) -> RunView:
    return open_run(path)


def load_view(run: str | Path | RunView) -> RunView:
    """The :class:`RunView` of ``run`` (opened once per path and process, then reused)."""
    if isinstance(run, RunView):
        return run
    return _cached_view(str(run))


#: where a run's thresholds are saved (the dashboard's button) and applied (materialize)
SAVED_THRESHOLDS = "thresholds.toml"
APPLIED_THRESHOLDS = ("dataset", "thresholds.toml")


def start_thresholds(view: RunView) -> tuple[FilterConfig, str]:
    """The thresholds a new session starts at, and the file they come from.

    The newer of ``RUN/thresholds.toml`` (saved by the dashboard) and
    ``RUN/dataset/thresholds.toml`` (what the last ``materialize`` applied, from the dashboard or
    ``laion-dask materialize --thresholds``); keys they lack come from the run's
    ``config.toml`` ``[filters]``, which is also the answer when neither exists. A file that
    cannot be read raises :class:`~laion_dask.ground.config.ConfigError` naming it.
    """
    run = view.run
    found = [
        path
        for path in (run.join(SAVED_THRESHOLDS), run.join(*APPLIED_THRESHOLDS))
        if run.exists(path)
    ]
    if not found:
        return view.thresholds, f"{run.config_path} [filters]"
    # the last one written wins: a materialize after a save applied what the user chose last
    newest = max(found, key=lambda path: run.fs.modified(path).timestamp())
    return view.load_thresholds(newest), newest


class ThresholdDashboard:
    """Widgets, plots and actions of the dashboard for one :class:`RunView`.

    Parameters
    ----------
    view
        The opened run.
    client
        A ``distributed.Client`` for materialize (left open by :meth:`close`). None: on the first
        click, :func:`laion_dask.orchestration.cluster.make_client` of ``cluster`` connects to its
        scheduler or
        starts a local cluster, which :meth:`close` closes.
    cluster
        Where materialize runs when no ``client`` is given; None reads the run's ``[cluster]``
        (``RUN/config.toml``; the defaults when the run has none).
    thresholds
        Where the widgets start; None: the thresholds last saved or applied to this run
        (:func:`start_thresholds`), so a new session continues where the last one left off.
    """

    def __init__(
        self,
        view: RunView,
        *,
        client: Any | None = None,
        cluster: ClusterConfig | None = None,
        thresholds: FilterConfig | None = None,
    ) -> None:
        if "bokeh" not in hv.Store.renderers:  # the plots need a backend to take options
            hv.extension("bokeh", logo=False)
        self.view = view
        self._client = client
        self._own_client = False
        self._cluster = cluster
        self._lock = threading.Lock()
        self._last_funnel: tuple[FilterConfig, Funnel] | None = None
        self._samples_running = False  # a throttled refresh is scheduled or in flight
        self._samples_stale = False  # the widgets moved since the grid was last computed
        self._samples_last = 0.0
        #: wall time of each samples refresh, seconds (the benchmark reads it)
        self.samples_seconds: list[float] = []
        #: the threshold lines drawn on the histograms, by (column, group)
        self.spans: dict[tuple[str, str], Any] = {}
        problem = ""
        if thresholds is None:
            try:
                thresholds, source = start_thresholds(view)
            except ConfigError as err:  # edited by hand since main() checked it: say so, go on
                log.warning("dashboard: %s", err)
                problem = f"**ignored a thresholds file**: {html.escape(str(err))}"
                thresholds, source = view.thresholds, f"{view.run.config_path} [filters]"
        else:
            source = "given"
        #: the thresholds the widgets started at, and where they came from
        self.base, self.base_source = thresholds, source
        base = thresholds
        lo, hi = self._range(schema.SIMILARITY)
        self.similarity = {
            g: pn.widgets.FloatSlider(
                label=f"similarity {g}",
                start=min(lo, base.similarity_for(g)),
                end=max(hi, base.similarity_for(g)),
                step=0.001,
                value=float(base.similarity_for(g)),
                format="0.000",
                width=280,
            )
            for g in view.groups
        }
        self.keep_top = pn.widgets.FloatInput(
            label="keep top X % (per group, moves the similarity sliders)",
            value=None,
            start=0.0,
            end=100.0,
            step=1.0,
            width=280,
        )
        self.max_punsafe = pn.widgets.FloatSlider(
            label="max punsafe (1 = tag only)",
            start=0.0,
            end=1.0,
            step=0.01,
            value=_FRACTION_OFF if base.max_punsafe is None else base.max_punsafe,
            width=280,
        )
        self.max_pwatermark = pn.widgets.FloatSlider(
            label="max pwatermark (1 = tag only)",
            start=0.0,
            end=1.0,
            step=0.01,
            value=_FRACTION_OFF if base.max_pwatermark is None else base.max_pwatermark,
            width=280,
        )
        self.min_text_chars = pn.widgets.IntSlider(
            label="min caption chars",
            start=0,
            end=max(200, base.min_text_chars),
            value=base.min_text_chars,
            width=280,
        )
        self.min_side = pn.widgets.IntSlider(
            label="min image side (px)",
            start=0,
            end=max(1024, base.min_side),
            step=8,
            value=base.min_side,
            width=280,
        )
        self.max_aspect_ratio = pn.widgets.FloatInput(
            label="max aspect ratio (empty = off)",
            value=base.max_aspect_ratio,
            start=1.0,
            step=0.5,
            width=280,
        )
        self.sample_cutoff = pn.widgets.RadioButtonGroup(
            label="samples at", options=list(SAMPLE_CUTOFFS), value="similarity"
        )
        self.sample_group = pn.widgets.Select(
            label="samples: language group", options=list(view.groups), value=view.groups[0]
        )
        self.samples_pane = pn.pane.HTML("", width=900)
        self.write_button = pn.widgets.Button(label="write thresholds.toml", color="primary")
        self.materialize_button = pn.widgets.Button(label="materialize", color="success")
        self.progress = pn.widgets.Progress(
            label="materialize", value=0, max=1, active=False, visible=False, width=280
        )
        # the controls column is 320 px wide: wider text here spilled over the funnel beside it
        # (issue 15); long paths break anywhere instead of overflowing
        wrap = {"overflow-wrap": "anywhere"}
        self.progress_text = pn.pane.Markdown(
            "", width=300, styles=wrap, css_classes=["materialize-progress"]
        )
        self.status = pn.pane.Markdown("", width=300, styles=wrap, css_classes=["dashboard-status"])
        self.result = pn.pane.Markdown(
            "", width=300, styles=wrap, css_classes=["materialize-result"]
        )
        self.status.object = problem
        self.write_button.on_click(self._on_write)
        self.materialize_button.on_click(self._on_materialize)
        self.keep_top.param.watch(self._on_keep_top, "value")
        # the samples follow the sliders while they move (throttled), not only on release
        for w in (
            *self.similarity.values(),
            self.max_punsafe,
            self.max_pwatermark,
            self.sample_group,
            self.sample_cutoff,
        ):
            w.param.watch(self._schedule_samples, "value")
        self.refresh_samples()
        self.layout = self._build_layout()

    # --- state ------------------------------------------------------------------------------
    def _range(self, column: str) -> tuple[float, float]:
        _, edges = self.view.histogram(column, ALL)
        return round(float(edges[0]), 3), round(float(edges[-1]), 3)

    def config(self) -> FilterConfig:
        """The thresholds the widgets show now."""
        punsafe = self.max_punsafe.value
        pwatermark = self.max_pwatermark.value
        return dataclasses.replace(
            self.base,
            **{f"similarity_{g}": float(s.value) for g, s in self.similarity.items()},
            max_punsafe=None if punsafe >= _FRACTION_OFF else float(punsafe),
            max_pwatermark=None if pwatermark >= _FRACTION_OFF else float(pwatermark),
            min_text_chars=int(self.min_text_chars.value),
            min_side=int(self.min_side.value),
            max_aspect_ratio=(
                None if self.max_aspect_ratio.value is None else float(self.max_aspect_ratio.value)
            ),
        )

    def funnel(self) -> Funnel:
        """The funnel at :meth:`config` (``RunView.kept_at``: no Dask job; the last one reused)."""
        cfg = self.config()
        last = self._last_funnel
        if last is None or last[0] != cfg:
            last = self._last_funnel = (cfg, self.view.kept_at(cfg))
        return last[1]

    def set_keep_top(self, percent: float) -> dict[str, float]:
        """Move every group's similarity slider to keep its top ``percent`` %; returns them."""
        moved = {}
        for g, slider in self.similarity.items():
            try:
                t = self.view.threshold_for_fraction(g, float(percent) / 100.0)
            except ValueError:  # a group without scored rows keeps its threshold
                continue
            slider.start, slider.end = min(slider.start, t), max(slider.end, t)
            slider.value = t
            with param.edit_constant(slider):  # as a released drag: samples, P/R refresh
                slider.value_throttled = t
            moved[g] = t
        return moved

    def write_thresholds(self) -> str:
        """Write :meth:`config` to ``RUN/thresholds.toml``; returns the path."""
        path = self.view.save_thresholds(self.config())
        log.info("dashboard: wrote %s", path)
        return path

    def run_materialize(self, progress: Any | None = None) -> Any:
        """Write ``RUN/thresholds.toml`` then ``materialize`` the run at :meth:`config`.

        ``progress(done, total, part)`` is passed to materialize: called on this thread as each
        partition finishes.
        """
        cfg = self.config()
        self.view.save_thresholds(cfg)
        client = self._get_client()
        with client.as_current():  # distributed.as_completed looks up the current client
            return materialize(self.view.run, cfg, client=client, progress=progress)

    def cluster_config(self) -> ClusterConfig:
        """Where materialize runs: the ``cluster`` given, else the run's ``[cluster]``."""
        if self._cluster is not None:
            return self._cluster
        try:
            return self.view.run.read_config().cluster
        except FileNotFoundError:
            return ClusterConfig()

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                cfg = self.cluster_config()
                where = cfg.scheduler_address or "a local cluster"
                log.info("dashboard: materialize on %s", where)
                self._client = make_client(cfg)
                self._own_client = True
            return self._client

    def close(self) -> None:
        """Close the client this dashboard made (and the local cluster it started, if any).

        A client given to the constructor is left open; a remote scheduler keeps running.
        """
        with self._lock:
            if self._own_client and self._client is not None:
                close_client(self._client)
                self._client = None
                self._own_client = False

    # --- callbacks --------------------------------------------------------------------------
    def _on_keep_top(self, event: Any) -> None:
        if event.new is None:
            return
        moved = self.set_keep_top(event.new)
        text = ", ".join(f"{g} {t:.3f}" for g, t in moved.items())
        self.status.object = f"keep top {event.new:g} %: similarity {text}"

    def _on_write(self, event: Any = None) -> None:
        try:
            path = self.write_thresholds()
        except Exception as err:  # noqa: BLE001 - shown to the user, logged
            log.exception("dashboard: writing thresholds failed")
            self.status.object = f"**could not write thresholds.toml**: {html.escape(str(err))}"
            return
        self.status.object = f"wrote `{path}`"

    def show_progress(self, done: int, total: int, part: str) -> None:
        """Move the progress bar to ``done`` of ``total`` partitions (``part`` just finished)."""
        self.progress.max = max(int(total), 1)
        self.progress.value = int(done)
        self.progress_text.object = f"{done} / {total} partitions (last: `{html.escape(part)}`)"

    def _progress_callback(self, doc: Any) -> Any:
        """A ``progress`` for materialize, called on its worker thread.

        Bokeh documents are not thread-safe: in a served session every update is handed to the
        session's event loop with ``doc.add_next_tick_callback`` (the one thread-safe Document
        method) and applied there holding the document lock. Without a session (a notebook, the
        tests) it updates the widgets directly.
        """
        if doc is None or doc.session_context is None:
            return self.show_progress

        def progress(done: int, total: int, part: str) -> None:
            doc.add_next_tick_callback(
                functools.partial(_in_doc, doc, self.show_progress, done, total, part)
            )

        return progress

    async def _on_materialize(self, event: Any = None) -> None:
        doc = pn.state.curdoc  # the session's document, captured on its own thread
        self.materialize_button.disabled = True
        self.progress.max, self.progress.value = 1, 0
        self.progress.visible = True
        self.progress.active = True
        self.progress_text.object = ""
        self.result.object = ""
        self.status.object = (
            f"materializing… on {self.cluster_config().scheduler_address or 'a local cluster'}"
        )
        progress = self._progress_callback(doc)
        try:
            report = await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(self.run_materialize, progress)
            )
        except Exception as err:  # noqa: BLE001 - shown to the user, logged
            log.exception("dashboard: materialize failed")
            self.status.object = f"**materialize failed**: {html.escape(str(err))}"
            self.progress.visible = False
        else:
            kept = ", ".join(f"{g} {n}" for g, n in report.kept.items())
            self.status.object = (
                f"materialized `{report.out_dir}` in {report.seconds:.1f} s: "
                f"{report.rows_in} rows in, kept {kept}"
                + (f"; {len(report.failed)} parts failed" if report.failed else "")
            )
            self.result.object = report_markdown(report)
        finally:
            self.progress.active = False
            self.materialize_button.disabled = False

    # --- views ------------------------------------------------------------------------------
    def funnel_markdown(self, *_: Any) -> str:
        """The funnel as Markdown: ``Kept: N of M rows``, per group, dropped per reason."""
        f = self.funnel()
        f.check()
        cfg = self.config()
        lines = [f"### Kept: {f.total_kept} of {f.rows_in} rows", ""]
        lines += ["| group | kept | similarity ≥ | keeps (similarity alone) |", "|---|---|---|---|"]
        for g in self.view.groups:
            t = cfg.similarity_for(g)
            frac = self.view.fraction_kept(g, t)
            pct = "–" if frac != frac else f"{100 * frac:.1f} %"
            lines.append(f"| {g} | {f.kept[g]} | {t:.3f} | {pct} |")
        lines += ["", "| dropped: reason | rows |", "|---|---|"]
        for r, n in sorted(f.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {r} | {n} |")
        return "\n".join(lines)

    # --- live plots ---------------------------------------------------------------------------
    # Drawn once per session. A threshold change sets a few Bokeh properties (a Span's location,
    # a bar source's counts) instead of re-running HoloViews plots: at 1M rows a HoloViews
    # DynamicMap refresh of the overlays cost ~200 ms of server time per slider step, this costs
    # the funnel's numpy pass (benchmarks/bench_explore.py).
    def _histogram_with_lines(
        self, static: hv.Overlay, lines: dict[str, Any], name: str
    ) -> pn.pane.Bokeh:
        """``static`` rendered once, plus one dashed ``Span`` per ``{group: widget}``."""
        from bokeh.models.annotations import Span

        fig = hv.render(static, backend="bokeh")
        for group, widget in lines.items():
            span = Span(
                dimension="height",
                line_color=plots.COLORS.get(group, "#000000"),
                line_dash="dashed",
                line_width=2,
            )
            fig.add_layout(span)
            self.spans[(name, group)] = span
            _move_span(span, name, widget.value)
            widget.param.watch(functools.partial(_on_span_widget, span, name), "value")
        # the class names the plot for browser tests (the figure's title is drawn on a canvas);
        # a Bokeh pane renders the figure itself, so the class goes on the figure
        fig.css_classes = [*fig.css_classes, f"{name.replace('_', '-')}-histogram"]
        return pn.pane.Bokeh(fig)

    def _bars(self, labels: list[str], *, title: str, horizontal: bool, width: int) -> Any:
        from bokeh.models import ColumnDataSource, FactorRange, HoverTool
        from bokeh.plotting import figure

        colors = [plots.COLORS.get(x, "#4c72b0") for x in labels]  # language groups: theirs
        source = ColumnDataSource({"label": labels, plots.ROWS: [0] * len(labels), "color": colors})
        if horizontal:  # one bar per reason the view knows: the factors never change
            fig = figure(
                y_range=FactorRange(factors=list(labels)),
                width=width,
                height=300,
                title=title,
                toolbar_location=None,
            )
            fig.hbar(y="label", right=plots.ROWS, height=0.8, color="color", source=source)
            fig.xaxis.axis_label = plots.ROWS
        else:
            fig = figure(
                x_range=FactorRange(factors=list(labels)),
                width=width,
                height=260,
                title=title,
                toolbar_location=None,
            )
            fig.vbar(x="label", top=plots.ROWS, width=0.8, color="color", source=source)
            fig.yaxis.axis_label = plots.ROWS
        fig.add_tools(HoverTool(tooltips=[("", "@label"), (plots.ROWS, f"@{plots.ROWS}")]))
        fig.css_classes = ["funnel-dropped" if horizontal else "funnel-kept"]  # for browser tests
        return fig, source

    def _update_bars(self, *_: Any) -> None:
        """Set the bars to the funnel at the widgets' thresholds (same labels, new counts)."""
        f = self.funnel()
        groups, reasons = list(self.view.groups), list(self.view.reasons)
        # same labels and colours every time: only the counts change (one small patch)
        self.kept_source.data = {
            **self.kept_source.data,
            plots.ROWS: [f.kept[g] for g in groups],
        }
        self.dropped_source.data = {
            **self.dropped_source.data,
            plots.ROWS: [f.dropped.get(r, 0) for r in reasons],
        }
        self._kept_fig.title.text = f"kept: {f.total_kept} of {f.rows_in}"

    def _samples_request(self) -> tuple[str, str, float]:
        """What the sample grid shows now: ``(group or "all", cutoff, threshold)``.

        Similarity: the selected group's threshold; punsafe / pwatermark: their slider, over
        every group (at 1 the filter only tags: the split is shown as it would drop).
        """
        cutoff = self.sample_cutoff.value
        if SAMPLE_CUTOFFS[cutoff] == schema.SIMILARITY:
            group = self.sample_group.value
            return group, cutoff, float(self.config().similarity_for(group))
        slider = self.max_punsafe if cutoff == "punsafe" else self.max_pwatermark
        return ALL, cutoff, float(slider.value)

    def _samples(
        self, group: str, cutoff: str = "similarity", threshold: float | None = None
    ) -> str:
        """HTML: the rows just either side of ``cutoff`` at ``threshold`` (both sides read at once).

        ``threshold`` None takes the widgets' value. Touches no widget when ``threshold`` is
        given, so it may run on a worker thread.
        """
        column = SAMPLE_CUTOFFS[cutoff]
        if threshold is None:
            if column != schema.SIMILARITY:
                group = ALL
            threshold = (
                self.config().similarity_for(group)
                if column == schema.SIMILARITY
                else float((self.max_punsafe if cutoff == "punsafe" else self.max_pwatermark).value)
            )
        t = float(threshold)
        if column == schema.SIMILARITY:
            sides = (("above", f"kept: similarity ≥ {t:.3f}"), ("below", "dropped: below"))
        else:
            off = " (filter off: tag only)" if t >= _FRACTION_OFF else ""
            sides = (("below", f"kept: {cutoff} ≤ {t:.2f}{off}"), ("above", "dropped: above"))
        try:
            found = self.view.samples_around(
                t, group, N_SAMPLES, column=column, sides=tuple(side for side, _ in sides)
            )
        except Exception as err:  # noqa: BLE001 - a broken shard must not break the page
            log.exception("dashboard: samples_around failed")
            return f"<p>samples unavailable ({html.escape(str(err))})</p>"
        parts = []
        for side, title in sides:
            rows = found[side]
            if rows.empty:
                rows_of = "rows" if group == ALL else f"{group} rows"
                parts.append(f"<h4>{html.escape(title)}</h4><p>no {rows_of} {side}</p>")
            else:
                parts.append(samples_html(rows, title=f"{group} · {title}", score=column))
        return "".join(parts)

    def refresh_samples(self) -> None:
        """Redraw the sample grid for the widgets' values now, on this thread (times it)."""
        t0 = time.perf_counter()
        self._show_samples(self._samples(*self._samples_request()))
        self.samples_seconds.append(time.perf_counter() - t0)

    def _show_samples(self, text: str) -> None:
        # the language group picks among similarity thresholds; the probabilities are run-wide
        self.sample_group.disabled = self.sample_cutoff.value != "similarity"
        self.samples_pane.object = text
        self._samples_last = time.perf_counter()

    def _schedule_samples(self, *_: Any) -> None:
        """Throttle the sample grid while a slider moves; never block the session's loop.

        Without a session (notebook, tests) it refreshes at once. In a served session a change
        marks the grid stale; if no refresh is running, one starts after what is left of
        ``SAMPLES_INTERVAL_MS`` since the last. It reads the widgets on the loop, selects and
        reads the rows on a worker thread (the loop keeps answering slider events), applies the
        HTML on the loop, and goes again while changes arrived meanwhile: at most one refresh
        per interval, and the last position always shows.
        """
        doc = pn.state.curdoc
        if doc is None or doc.session_context is None:
            self.refresh_samples()
            return
        self._samples_stale = True
        if self._samples_running:
            return
        self._samples_running = True
        since = (time.perf_counter() - self._samples_last) * 1000
        delay = max(0, int(SAMPLES_INTERVAL_MS - since))
        tick: Any = functools.partial(self._samples_loop, doc)
        doc.add_timeout_callback(without_document_lock(tick), delay)

    async def _samples_loop(self, doc: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._samples_stale:
                self._samples_stale = False
                t0 = time.perf_counter()
                request = self._samples_request()  # widget values: read on the loop
                text = await loop.run_in_executor(None, self._samples, *request)
                done = asyncio.get_running_loop().create_future()
                doc.add_next_tick_callback(
                    functools.partial(_in_doc, doc, _apply, self._show_samples, text, done)
                )
                await done
                self.samples_seconds.append(time.perf_counter() - t0)
                if self._samples_stale:  # moved meanwhile: wait out the interval, then again
                    await asyncio.sleep(SAMPLES_INTERVAL_MS / 1000)
        finally:
            self._samples_running = False

    def _precision_recall(self, *_: Any) -> Any:
        pr = self.view.precision_recall(self.config())
        return plots.precision_recall_frame(pr).round(3)

    def _ground_truth(self) -> str | None:
        path = self.view.run.join("corpus", "ground_truth.parquet")
        return path if self.view.run.exists(path) else None

    def _build_layout(self) -> pn.viewable.Viewable:
        sims = list(self.similarity.values())
        values = [
            *sims,
            self.max_punsafe,
            self.max_pwatermark,
            self.min_text_chars,
            self.min_side,
            self.max_aspect_ratio,
        ]
        throttled = [
            *(s.param.value_throttled for s in sims),
            self.max_punsafe.param.value_throttled,
            self.max_pwatermark.param.value_throttled,
            self.min_text_chars.param.value_throttled,
            self.min_side.param.value_throttled,
            self.max_aspect_ratio,
        ]
        controls = pn.Column(
            "## Thresholds",
            *sims,
            self.keep_top,
            self.max_punsafe,
            self.max_pwatermark,
            self.min_text_chars,
            self.min_side,
            self.max_aspect_ratio,
            pn.Row(self.write_button, self.materialize_button),
            self.progress,
            self.progress_text,
            self.status,
            self.result,
            width=320,
        )
        self._kept_fig, self.kept_source = self._bars(
            list(self.view.groups), title="kept", horizontal=False, width=300
        )
        dropped_fig, self.dropped_source = self._bars(
            list(self.view.reasons), title="dropped per reason", horizontal=True, width=420
        )
        self._update_bars()
        for w in values:
            w.param.watch(self._update_bars, "value")
        funnel = pn.Column(
            pn.pane.Markdown(
                pn.bind(self.funnel_markdown, *values), width=460, css_classes=["funnel"]
            ),
            pn.Row(pn.pane.Bokeh(self._kept_fig), pn.pane.Bokeh(dropped_fig)),
        )
        view = self.view
        similarity = self._histogram_with_lines(
            plots.histogram_overlay(
                view,
                schema.SIMILARITY,
                title="CLIP similarity per language group",
                width=560,
                height=300,
            ),
            self.similarity,
            schema.SIMILARITY,
        )
        samples = pn.Column(
            pn.Row(self.sample_cutoff, self.sample_group),
            self.samples_pane,
        )
        distributions = pn.Column(
            pn.Row(
                self._histogram_with_lines(
                    plots.score_histogram(view, schema.PUNSAFE),
                    {ALL: self.max_punsafe},
                    schema.PUNSAFE,
                ),
                self._histogram_with_lines(
                    plots.score_histogram(view, schema.PWATERMARK),
                    {ALL: self.max_pwatermark},
                    schema.PWATERMARK,
                ),
            ),
            pn.Row(
                self._histogram_with_lines(
                    plots.text_length_histogram(view), {ALL: self.min_text_chars}, TEXT_LENGTH
                ),
                pn.pane.HoloViews(plots.language_bars(self.view)),
            ),
            pn.pane.HoloViews(plots.size_density(self.view)),
        )
        tabs = [("Samples at the threshold", samples), ("Distributions", distributions)]
        if self._ground_truth() is not None:
            tabs.append(
                (
                    "Precision / recall",
                    pn.Column(
                        pn.pane.Markdown(
                            "Against `corpus/ground_truth.parquet`: a pair is relevant when its "
                            "caption matches its image, retrieved when kept at these thresholds."
                        ),
                        pn.pane.DataFrame(pn.bind(self._precision_recall, *throttled)),
                    ),
                )
            )
        header = pn.pane.Markdown(
            f"# laion-dask thresholds · `{html.escape(str(self.view.run.path))}` "
            f"({len(self.view)} rows)\n\nstarted at the thresholds of "
            f"`{html.escape(self.base_source)}`"
        )
        return pn.Column(
            header,
            pn.Row(controls, pn.Column(similarity, funnel)),
            pn.Tabs(*tabs, dynamic=False),
        )


def build_dashboard(
    run_path: str | Path | RunView,
    *,
    client: Any | None = None,
    cluster: ClusterConfig | None = None,
) -> pn.viewable.Viewable:
    """The Panel app for one run (not served). ``run_path`` may be an opened :class:`RunView`.

    ``client`` / ``cluster``: where materialize runs (see :class:`ThresholdDashboard`). In a
    server session the client a materialize click makes is closed with the session.
    """
    pn.extension(sizing_mode="fixed")
    hv.extension("bokeh", logo=False)
    board = ThresholdDashboard(load_view(run_path), client=client, cluster=cluster)
    if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        pn.state.on_session_destroyed(functools.partial(_close, board))
    board.layout.dashboard = board  # tests and notebooks reach the widgets through the layout
    return board.layout


def _close(board: ThresholdDashboard, session_context: Any) -> None:
    board.close()


def _in_doc(doc: Any, func: Any, *args: Any) -> None:
    """Run ``func(*args)`` as a callback of ``doc``'s session (Panel's current document set)."""
    from panel.io.state import set_curdoc

    with set_curdoc(doc):
        func(*args)


def _move_span(span: Any, column: str, value: Any) -> None:
    """Put a threshold line at ``value``; a probability slider at 1 (tag only) hides it."""
    off = value is None or (
        column in (schema.PUNSAFE, schema.PWATERMARK) and value >= _FRACTION_OFF
    )
    span.visible = not off
    if not off:
        span.location = float(value)


def _on_span_widget(span: Any, column: str, event: Any) -> None:
    _move_span(span, column, event.new)


def _apply(func: Any, value: Any, done: asyncio.Future) -> None:
    """``func(value)`` then resolve ``done`` (an update handed from a lock-free coroutine)."""
    try:
        func(value)
    finally:
        if not done.done():
            done.set_result(None)


def report_markdown(report: Any) -> str:
    """A materialize report as Markdown: rows in, kept per group, dropped per reason."""
    lines = [f"#### Materialized: {report.rows_in} rows in", "", "| kept | rows |", "|---|---|"]
    lines += [f"| {g} | {n} |" for g, n in report.kept.items()]
    lines += ["", "| dropped: reason | rows |", "|---|---|"]
    lines += [f"| {r} | {n} |" for r, n in report.dropped.items()]
    if report.failed:
        lines += ["", f"failed partitions: {', '.join(sorted(report.failed))}"]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laion-dask dashboard",
        description="Tune thresholds on a run's stored scores, then materialize.",
    )
    parser.add_argument("run", help="run directory with finished scores (laion-dask score RUN)")
    add_serve_arguments(parser, port=5006)
    parser.add_argument(
        "--scheduler",
        help="tcp://HOST:8786 of a running Dask scheduler for the materialize button "
        "(default: $DASK_SCHEDULER_ADDRESS, else the run's [cluster], else a local cluster)",
    )
    parser.add_argument(
        "--workers", type=int, help="materialize's local cluster: number of worker processes"
    )
    parser.add_argument(
        "--threads", type=int, help="materialize's local cluster: threads per worker"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``laion-dask dashboard RUN [--port N] [--scheduler ADDR] [--no-show] [-q] [-v]``.

    Serves the app until interrupted. Returns 0 when the server stops, 2 when the run, its
    thresholds or the cluster flags cannot be used (one line on stderr, before serving).
    """
    args = _parser().parse_args(argv)
    set_log_level(args.verbose, args.quiet)
    try:
        view = load_view(args.run)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"laion-dask dashboard: cannot open {args.run}: {err}", file=sys.stderr)
        return 2
    try:
        start_thresholds(view)  # a broken thresholds file is reported now, not per session
        cluster = _cluster_flags(view, args)
    except (ConfigError, OSError) as err:
        print(f"laion-dask dashboard: {err}", file=sys.stderr)
        return 2

    def app() -> pn.viewable.Viewable:
        # a plain function: Panel renders a functools.partial as its repr, not as an app
        return build_dashboard(view, cluster=cluster)

    serve(app, args, title="laion-dask thresholds")
    return 0


def _cluster_flags(view: RunView, args: argparse.Namespace) -> ClusterConfig | None:
    """The run's ``[cluster]`` with ``--scheduler`` / ``--workers`` / ``--threads`` on top.

    None when no flag is given, so each session reads the run's config as it is then.
    """
    try:
        base = view.run.read_config().cluster
    except FileNotFoundError:
        base = ClusterConfig()
    # validated here: a bad address raises now
    cluster = base.with_flags(scheduler=args.scheduler, workers=args.workers, threads=args.threads)
    return None if cluster is base else cluster
