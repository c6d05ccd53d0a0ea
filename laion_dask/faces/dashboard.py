"""The Panel threshold dashboard: tune a run's thresholds on its stored scores, then materialize.

``build_dashboard(RUN)`` returns the Panel layout; ``main`` serves it (``laion-dask dashboard RUN``)
and ``dashboards/thresholds.py`` is the same app for ``panel serve`` (what it shows:
``dashboards/README.md``). The run's scores are read once
(:func:`laion_dask.products.explore.open_run`, cached per path); every widget change after that is
answered from memory: the funnel is :meth:`~laion_dask.products.explore.RunView.kept_at` (one
numpy pass), histograms are drawn once from the view's precomputed bins and only their threshold
lines (Bokeh ``Span``) and the funnel bars' counts update in place; nothing is rescored.
Thumbnails follow a slider while it is dragged, throttled to one refresh per
:data:`SAMPLES_INTERVAL_MS` on a worker thread (the last position always shows); precision/recall
refresh when a slider is released; materialize shows a progress bar per partition.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import html
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import holoviews as hv
import panel as pn
import param
from bokeh.models import Span

from laion_dask.faces import evaluate_page, plots
from laion_dask.faces.serving import face_parser, serve_main
from laion_dask.ground import schema
from laion_dask.ground.config import ClusterConfig, ConfigError, FilterConfig
from laion_dask.orchestration.cluster import close_client, make_client
from laion_dask.products.explore import ALL, TEXT_LENGTH, Funnel, RunView, open_run, samples_html
from laion_dask.products.materialize import materialize
from laion_dask.products.report.rendering import bar_figure

log = logging.getLogger(__name__)

__all__ = ["ThresholdDashboard", "build_dashboard", "load_view", "main"]

#: how many samples on each side of the threshold
N_SAMPLES = 6
#: while a slider is dragged, the samples refresh at most this often (the server stays free)
SAMPLES_INTERVAL_MS = 250
#: the columns whose cut-off the sample grid can follow
SAMPLE_CUTOFFS = (schema.SIMILARITY, schema.PUNSAFE, schema.PWATERMARK)
_FRACTION_OFF = 1.0  # a punsafe / pwatermark slider at 1.0 means "tag only" (None)
_PROBABILITIES = ("max_punsafe", "max_pwatermark")
#: the threshold widgets below the similarity sliders, by the FilterConfig field they set:
#: widget, label, start, end (grown to hold a larger starting value), step
_LIMITS: dict[str, tuple[Any, str, float, float | None, float]] = {
    "max_punsafe": (pn.widgets.FloatSlider, "max punsafe (1 = tag only)", 0.0, 1.0, 0.01),
    "max_pwatermark": (pn.widgets.FloatSlider, "max pwatermark (1 = tag only)", 0.0, 1.0, 0.01),
    "min_text_chars": (pn.widgets.IntSlider, "min caption chars", 0, 200, 1),
    "min_side": (pn.widgets.IntSlider, "min image side (px)", 0, 1024, 8),
    "max_aspect_ratio": (pn.widgets.FloatInput, "max aspect ratio (empty = off)", 1.0, None, 0.5),
}
#: the FilterConfig field each run-wide histogram draws its threshold line at (similarity:
#: ``similarity_<group>`` per group)
_LINES = {
    schema.PUNSAFE: "max_punsafe",
    schema.PWATERMARK: "max_pwatermark",
    TEXT_LENGTH: "min_text_chars",
}
#: where a run's thresholds are saved (the dashboard's button) and applied (materialize)
SAVED_THRESHOLDS = "thresholds.toml"
APPLIED_THRESHOLDS = ("dataset", "thresholds.toml")

_open_cached = functools.lru_cache(maxsize=4)(open_run)


def load_view(run: str | Path | RunView) -> RunView:
    """The :class:`RunView` of ``run`` (opened once per path and process, then reused)."""
    return run if isinstance(run, RunView) else _open_cached(str(run))


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


def _as_field(name: str, value: Any) -> Any:
    """A widget's value as FilterConfig field ``name`` holds it (None: off)."""
    if value is None or (name in _PROBABILITIES and value >= _FRACTION_OFF):
        return None  # an empty box, or a probability at 1: tag only
    return int(value) if name.startswith("min_") else float(value)


class ThresholdDashboard:
    """Widgets, plots and actions of the dashboard for one :class:`RunView`.

    Parameters
    ----------
    view
        The opened run.
    client
        A ``distributed.Client`` for materialize (left open by :meth:`close`). None: on the first
        click, :func:`laion_dask.orchestration.cluster.make_client` of ``cluster`` connects to its
        scheduler or starts a local cluster, which :meth:`close` closes.
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
        self._samples_running = False  # a throttled refresh is under way
        self._samples_stale = False  # the widgets moved since the grid was last computed
        self._samples_last = 0.0
        #: wall time of each samples refresh, seconds (the benchmark reads it)
        self.samples_seconds: list[float] = []
        #: the threshold lines drawn on the histograms, by (column, group)
        self.spans: dict[tuple[str, str], Span] = {}
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
        edges = view.histogram(schema.SIMILARITY, ALL)[1]
        lo, hi = round(float(edges[0]), 3), round(float(edges[-1]), 3)
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
        #: the threshold widgets below the similarity sliders, by the FilterConfig field they set
        #: (also attributes: ``board.max_punsafe`` ...)
        self.limits: dict[str, Any] = {}
        for name, (widget, label, start, end, step) in _LIMITS.items():
            value = getattr(base, name)
            if name in _PROBABILITIES and value is None:
                value = _FRACTION_OFF
            if end is not None:
                end = max(end, value)
            limit = widget(label=label, start=start, end=end, step=step, value=value, width=280)
            self.limits[name] = limit
            setattr(self, name, limit)
        self.sample_cutoff = pn.widgets.RadioButtonGroup(
            label="samples at", options=list(SAMPLE_CUTOFFS), value=schema.SIMILARITY
        )
        self.sample_group = pn.widgets.Select(
            label="samples: language group", options=list(view.groups), value=view.groups[0]
        )
        self.samples_pane = pn.pane.HTML("", width=900)
        self.funnel_pane = pn.pane.Markdown("", width=460, css_classes=["funnel"])
        self.write_button = pn.widgets.Button(label="write thresholds.toml", color="primary")
        self.materialize_button = pn.widgets.Button(label="materialize", color="success")
        self.progress = pn.widgets.Progress(
            label="materialize", value=0, max=1, active=False, visible=False, width=280
        )
        # the controls column is 320 px wide: wider text here spilled over the funnel beside it
        # (issue 15); long paths break anywhere instead of overflowing
        self.progress_text, self.status, self.result = (
            pn.pane.Markdown("", width=300, styles={"overflow-wrap": "anywhere"}, css_classes=[c])
            for c in ("materialize-progress", "dashboard-status", "materialize-result")
        )
        self.status.object = problem
        self.write_button.on_click(self._on_write)
        self.materialize_button.on_click(self._on_materialize)
        self.keep_top.param.watch(self._on_keep_top, "value")
        # the samples follow the sliders while they move (throttled), not only on release
        for w in (
            *self.similarity.values(),
            self.limits["max_punsafe"],
            self.limits["max_pwatermark"],
            self.sample_group,
            self.sample_cutoff,
        ):
            w.param.watch(self._schedule_samples, "value")
        self.refresh_samples()
        self.layout = self._build_layout()
        for w in (*self.similarity.values(), *self.limits.values()):
            w.param.watch(self._redraw, "value")
        self._redraw()

    # --- state ------------------------------------------------------------------------------
    def config(self) -> FilterConfig:
        """The thresholds the widgets show now."""
        values = {f"similarity_{g}": s.value for g, s in self.similarity.items()}
        values |= {name: w.value for name, w in self.limits.items()}
        return dataclasses.replace(self.base, **{k: _as_field(k, v) for k, v in values.items()})

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
        return self._cluster or _run_cluster(self.view)

    def _where(self) -> str:
        return self.cluster_config().scheduler_address or "a local cluster"

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                log.info("dashboard: materialize and evaluate on %s", self._where())
                cfg = self.cluster_config()
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
            path = self.view.save_thresholds(self.config())
        except Exception as err:  # noqa: BLE001 - shown to the user, logged
            log.exception("dashboard: writing thresholds failed")
            self.status.object = f"**could not write thresholds.toml**: {html.escape(str(err))}"
            return
        log.info("dashboard: wrote %s", path)
        self.status.object = f"wrote `{path}`"

    def show_progress(self, done: int, total: int, part: str) -> None:
        """Move the progress bar to ``done`` of ``total`` partitions (``part`` just finished)."""
        self.progress.max = max(int(total), 1)  # first: it bounds value
        self.progress.value = int(done)
        self.progress_text.object = f"{done} / {total} partitions (last: `{html.escape(part)}`)"

    async def _on_materialize(self, event: Any = None) -> None:
        self.materialize_button.disabled = True
        self.progress.param.update(max=1, value=0, visible=True, active=True)
        self.progress_text.object = self.result.object = ""
        self.status.object = f"materializing… on {self._where()}"
        try:
            # materialize's thread moves the progress bar itself: Panel hands a widget change
            # made off the session's thread to the session's event loop (Bokeh documents are
            # not thread-safe), and applies it at once without a session (notebook, tests)
            report = await asyncio.to_thread(self.run_materialize, self.show_progress)
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
    def funnel_markdown(self) -> str:
        """The funnel as Markdown: ``Kept: N of M rows``, per group, dropped per reason."""
        f, cfg = self.funnel(), self.config()
        f.check()
        groups = []
        for g in self.view.groups:
            t = cfg.similarity_for(g)
            frac = self.view.fraction_kept(g, t)
            groups.append(
                (g, f.kept[g], f"{t:.3f}", "–" if frac != frac else f"{100 * frac:.1f} %")
            )
        head = ("group", "kept", "similarity ≥", "keeps (similarity alone)")
        dropped = sorted(f.dropped.items(), key=lambda kv: -kv[1])
        return "\n".join(
            [f"### Kept: {f.total_kept} of {f.rows_in} rows", ""]
            + [*_md_table(head, groups), "", *_md_table(("dropped: reason", "rows"), dropped)]
        )

    # --- live plots ---------------------------------------------------------------------------
    # Drawn once per session. A threshold change sets a few Bokeh properties (a Span's location,
    # a bar source's counts) instead of re-running HoloViews plots: at 1M rows a HoloViews
    # DynamicMap refresh of the overlays cost ~200 ms of server time per slider step, this costs
    # the funnel's numpy pass (benchmarks/bench_explore.py).
    def _histogram(
        self, static: hv.Overlay, column: str, groups: Iterable[str] = (ALL,)
    ) -> pn.pane.Bokeh:
        """``static`` rendered once, plus one dashed ``Span`` per group (moved by _redraw)."""
        fig = hv.render(static, backend="bokeh")
        for group in groups:
            color = plots.COLORS.get(group, "#000000")
            span = Span(dimension="height", line_color=color, line_dash="dashed", line_width=2)
            fig.add_layout(span)
            self.spans[(column, group)] = span
        # the class names the plot for browser tests (the figure's title is drawn on a canvas);
        # a Bokeh pane renders the figure itself, so the class goes on the figure
        fig.css_classes = [*fig.css_classes, f"{column.replace('_', '-')}-histogram"]
        return pn.pane.Bokeh(fig)

    def _bars(self, labels: list[str], *, title: str, horizontal: bool) -> Any:
        """Bars with fixed labels (the factors never change): :meth:`_redraw` sets the counts."""
        colors = [plots.COLORS.get(x, "#4c72b0") for x in labels]  # language groups: theirs
        name = "funnel-dropped" if horizontal else "funnel-kept"
        items = [(x, 0) for x in labels]
        fig = bar_figure(name, items, title, horizontal=horizontal, colors=colors)
        fig.toolbar_location = None
        (fig.xaxis if horizontal else fig.yaxis).axis_label = plots.ROWS
        fig.css_classes = [name]  # for browser tests
        return fig, fig.renderers[0].data_source

    def _redraw(self, *_: Any) -> None:
        """Set the funnel text, the bars' counts and the threshold lines to the widgets' values."""
        cfg, f = self.config(), self.funnel()
        self.funnel_pane.object = self.funnel_markdown()
        # same labels and colours every time: only the counts change (one small patch)
        kept = [f.kept[g] for g in self.view.groups]
        dropped = [f.dropped.get(r, 0) for r in self.view.reasons]
        self.kept_source.data = {**self.kept_source.data, "count": kept}
        self.dropped_source.data = {**self.dropped_source.data, "count": dropped}
        self._kept_fig.title.text = f"kept: {f.total_kept} of {f.rows_in}"
        for (column, group), span in self.spans.items():
            # None (a probability at 1: tag only; an empty box) draws no line
            t = getattr(cfg, _LINES.get(column, f"similarity_{group}"))
            span.visible = t is not None
            if t is not None:
                span.location = float(t)

    def _samples_request(self) -> tuple[str, str, float]:
        """What the sample grid shows now: ``(group or "all", column, threshold)``.

        Similarity: the selected group's threshold; punsafe / pwatermark: their slider, over
        every group (at 1 the filter only tags: the split is shown as it would drop).
        """
        column = self.sample_cutoff.value
        if column == schema.SIMILARITY:
            group = self.sample_group.value
            return group, column, float(self.similarity[group].value)
        return ALL, column, float(self.limits[f"max_{column}"].value)

    def _samples(self, group: str, column: str, t: float) -> str:
        """HTML: the rows just either side of ``column`` at ``t``; touches no widget (threads)."""
        if column == schema.SIMILARITY:
            sides = {"above": f"kept: similarity ≥ {t:.3f}", "below": "dropped: below"}
        else:
            off = " (filter off: tag only)" if t >= _FRACTION_OFF else ""
            sides = {"below": f"kept: {column} ≤ {t:.2f}{off}", "above": "dropped: above"}
        try:
            found = self.view.samples_around(t, group, N_SAMPLES, column=column, sides=tuple(sides))
        except Exception as err:  # noqa: BLE001 - a broken shard must not break the page
            log.exception("dashboard: samples_around failed")
            return f"<p>samples unavailable ({html.escape(str(err))})</p>"
        parts = []
        for side, title in sides.items():
            if found[side].empty:
                rows_of = "rows" if group == ALL else f"{group} rows"
                parts.append(f"<h4>{html.escape(title)}</h4><p>no {rows_of} {side}</p>")
            else:
                parts.append(samples_html(found[side], title=f"{group} · {title}", score=column))
        return "".join(parts)

    def refresh_samples(self) -> None:
        """Redraw the sample grid for the widgets' values now, on this thread (times it)."""
        t0 = time.perf_counter()
        self._show_samples(self._samples(*self._samples_request()))
        self.samples_seconds.append(time.perf_counter() - t0)

    def _show_samples(self, text: str) -> None:
        # the language group picks among similarity thresholds; the probabilities are run-wide
        self.sample_group.disabled = self.sample_cutoff.value != schema.SIMILARITY
        self.samples_pane.object = text
        self._samples_last = time.perf_counter()

    def _schedule_samples(self, *_: Any) -> None:
        """Throttle the sample grid while a slider moves; never block the session's loop.

        Without a session (notebook, tests) it refreshes at once. In a served session a change
        marks the grid stale and, unless a refresh is under way, starts :meth:`_samples_loop`.
        """
        if not _in_session():
            self.refresh_samples()
            return
        self._samples_stale = True
        if not self._samples_running:
            self._samples_running = True
            pn.state.execute(self._samples_loop)  # a coroutine: run on the session's loop

    async def _samples_loop(self) -> None:
        """Refresh the grid, at most once per interval, until no change arrived meanwhile.

        Widgets are read and set on the loop; the rows are selected and read on a worker thread,
        so the loop keeps answering slider events. The last position always shows.
        """
        try:
            while self._samples_stale:
                wait = self._samples_last + SAMPLES_INTERVAL_MS / 1000 - time.perf_counter()
                await asyncio.sleep(max(0.0, wait))
                self._samples_stale = False
                t0 = time.perf_counter()
                text = await asyncio.to_thread(self._samples, *self._samples_request())
                self._show_samples(text)
                self.samples_seconds.append(time.perf_counter() - t0)
        finally:
            self._samples_running = False

    def _precision_recall(self, *_: Any) -> Any:
        pr = self.view.precision_recall(self.config())
        return plots.precision_recall_frame(pr).round(3)

    def _build_layout(self) -> pn.viewable.Viewable:
        view, sims = self.view, list(self.similarity.values())
        controls = pn.Column(
            "## Thresholds",
            *sims,
            self.keep_top,
            *self.limits.values(),
            pn.Row(self.write_button, self.materialize_button),
            self.progress,
            self.progress_text,
            self.status,
            self.result,
            width=320,
        )
        self._kept_fig, self.kept_source = self._bars(
            list(view.groups), title="kept", horizontal=False
        )
        dropped_fig, self.dropped_source = self._bars(
            list(view.reasons), title="dropped per reason", horizontal=True
        )
        funnel = pn.Column(
            self.funnel_pane, pn.Row(pn.pane.Bokeh(self._kept_fig), pn.pane.Bokeh(dropped_fig))
        )
        overlay = plots.similarity_histograms(view, width=560, height=300)
        similarity = self._histogram(overlay, schema.SIMILARITY, view.groups)
        samples = pn.Column(pn.Row(self.sample_cutoff, self.sample_group), self.samples_pane)
        distributions = pn.Column(
            pn.Row(
                self._histogram(plots.score_histogram(view, schema.PUNSAFE), schema.PUNSAFE),
                self._histogram(plots.score_histogram(view, schema.PWATERMARK), schema.PWATERMARK),
            ),
            pn.Row(
                self._histogram(plots.text_length_histogram(view), TEXT_LENGTH),
                pn.pane.HoloViews(plots.language_bars(view)),
            ),
            pn.pane.HoloViews(plots.size_density(view)),
        )
        tabs = [("Samples at the threshold", samples), ("Distributions", distributions)]
        if view.run.exists(view.run.join("corpus", "ground_truth.parquet")):
            # precision/recall refresh when a slider is released (the aspect box has no drag)
            aspect = self.limits["max_aspect_ratio"]
            released = [
                w.param.value_throttled for w in (*sims, *self.limits.values()) if w is not aspect
            ]
            pr = pn.bind(self._precision_recall, *released, aspect)
            text = (
                "Against `corpus/ground_truth.parquet`: a pair is relevant when its caption "
                "matches its image, retrieved when kept at these thresholds."
            )
            tabs.append(("Precision / recall", pn.Column(text, pn.pane.DataFrame(pr))))
        # which thresholds train the better model: the sliders' and "top X" candidates trained
        # on this dashboard's cluster, as `laion-dask evaluate RUN` does
        self.evaluate_tab = evaluate_page.EvaluateTab(
            view.run, self.config, self._get_client, self._where
        )
        tabs.append(("Evaluate", self.evaluate_tab.layout))
        header = pn.pane.Markdown(
            f"# laion-dask thresholds · `{html.escape(str(view.run.path))}` "
            f"({len(view)} rows)\n\nstarted at the thresholds of `{html.escape(self.base_source)}`"
        )
        #: the views under the controls; a new view is one more ``(title, panel)`` tab
        self.tabs = pn.Tabs(*tabs, dynamic=False)
        return pn.Column(header, pn.Row(controls, pn.Column(similarity, funnel)), self.tabs)


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
    if _in_session():
        pn.state.on_session_destroyed(lambda session_context: board.close())
    board.layout.dashboard = board  # tests and notebooks reach the widgets through the layout
    return board.layout


def _in_session() -> bool:
    """Whether this runs in a served session (else a notebook or a test)."""
    doc = pn.state.curdoc
    return doc is not None and doc.session_context is not None


def _run_cluster(view: RunView) -> ClusterConfig:
    """The run's ``[cluster]`` as its ``config.toml`` says now (the defaults without one)."""
    try:
        return view.run.read_config().cluster
    except FileNotFoundError:
        return ClusterConfig()


def _md_table(head: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> list[str]:
    """The lines of a Markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def report_markdown(report: Any) -> str:
    """A materialize report as Markdown: rows in, kept per group, dropped per reason."""
    lines = [f"#### Materialized: {report.rows_in} rows in", ""]
    lines += [*_md_table(("kept", "rows"), report.kept.items()), ""]
    lines += _md_table(("dropped: reason", "rows"), report.dropped.items())
    if report.failed:
        lines += ["", f"failed partitions: {', '.join(sorted(report.failed))}"]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = face_parser(
        "laion-dask dashboard",
        "Tune thresholds on a run's stored scores, then materialize.",
        run_help="run directory with finished scores (laion-dask score RUN)",
        port=5006,
    )
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
    return serve_main(_parser(), argv, _open_app, title="laion-dask thresholds")


def _open_app(args: argparse.Namespace) -> Any:
    """The app for ``args``; the run, its thresholds and the cluster flags are checked now."""
    view = load_view(args.run)
    start_thresholds(view)  # a broken thresholds file is reported now, not per session
    return functools.partial(build_dashboard, view, cluster=_cluster_flags(view, args))


def _cluster_flags(view: RunView, args: argparse.Namespace) -> ClusterConfig | None:
    """The run's ``[cluster]`` with ``--scheduler`` / ``--workers`` / ``--threads`` on top.

    None when no flag is given, so each session reads the run's config as it is then.
    """
    base = _run_cluster(view)
    # validated here: a bad address raises now
    cluster = base.with_flags(scheduler=args.scheduler, workers=args.workers, threads=args.threads)
    return None if cluster is base else cluster
