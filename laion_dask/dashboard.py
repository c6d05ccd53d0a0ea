"""The Panel threshold dashboard: tune a run's thresholds on its stored scores, then materialize.

``build_dashboard(RUN)`` returns the Panel layout; ``main`` serves it (``laion-dask dashboard RUN``)
and ``dashboards/thresholds.py`` is the same app for ``panel serve``. The run's scores are read
once (:func:`laion_dask.explore.open_run`, cached per path); every widget change after that is
answered from memory: the funnel is :meth:`~laion_dask.explore.RunView.kept_at` (one numpy pass),
histograms are drawn once from the view's precomputed bins and only their threshold lines and
the funnel bars update in place (HoloViews ``DynamicMap``); nothing is rescored. Thumbnails and
precision/recall refresh when a slider is released.

Views: similarity histogram per language group with a slider per group and a "keep top X %"
input that moves them, the live funnel (kept per group, dropped per reason), images with captions
and scores just above and below the selected group's threshold, the language mix, width x height
density, caption length, punsafe / pwatermark with their own thresholds, precision/recall when
``RUN/corpus/ground_truth.parquet`` exists, a button writing ``RUN/thresholds.toml`` and one
running :func:`laion_dask.materialize.materialize` on a LocalCluster started on first use.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import html
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import holoviews as hv
import panel as pn
import param

from . import plots, schema
from .config import FilterConfig
from .explore import ALL, Funnel, RunView, open_run, samples_html

log = logging.getLogger(__name__)

__all__ = ["ThresholdDashboard", "build_dashboard", "load_view", "main"]

#: how many samples on each side of the threshold
N_SAMPLES = 6
_FRACTION_OFF = 1.0  # a punsafe / pwatermark slider at 1.0 means "tag only" (None)


@functools.lru_cache(maxsize=4)
def _cached_view(path: str) -> RunView:
    return open_run(path)


def load_view(run: str | Path | RunView) -> RunView:
    """The :class:`RunView` of ``run`` (opened once per path and process, then reused)."""
    if isinstance(run, RunView):
        return run
    return _cached_view(str(run))


class ThresholdDashboard:
    """Widgets, plots and actions of the dashboard for one :class:`RunView`.

    Parameters
    ----------
    view
        The opened run.
    client
        A ``distributed.Client`` for materialize; None starts a threaded LocalCluster (loopback,
        no Dask dashboard) on the first click and closes it with :meth:`close`.
    """

    def __init__(self, view: RunView, *, client: Any | None = None) -> None:
        self.view = view
        self._client = client
        self._own_cluster: Any | None = None
        self._lock = threading.Lock()
        self._last_funnel: tuple[FilterConfig, Funnel] | None = None
        base = view.thresholds
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
        self.sample_group = pn.widgets.Select(
            label="samples: language group", options=list(view.groups), value=view.groups[0]
        )
        self.write_button = pn.widgets.Button(label="write thresholds.toml", color="primary")
        self.materialize_button = pn.widgets.Button(label="materialize", color="success")
        self.progress = pn.indicators.Progress(
            label="materialize", active=False, visible=False, width=280
        )
        self.status = pn.pane.Markdown("", width=460)
        self.write_button.on_click(self._on_write)
        self.materialize_button.on_click(self._on_materialize)
        self.keep_top.param.watch(self._on_keep_top, "value")
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
            self.view.thresholds,
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

    def run_materialize(self) -> Any:
        """Write ``RUN/thresholds.toml`` then ``materialize`` the run at :meth:`config`."""
        from .materialize import materialize

        cfg = self.config()
        self.view.save_thresholds(cfg)
        client = self._get_client()
        with client.as_current():  # distributed.as_completed looks up the current client
            return materialize(self.view.run, cfg, client=client)

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                from distributed import Client, LocalCluster

                log.info("dashboard: starting a LocalCluster for materialize")
                self._own_cluster = LocalCluster(
                    n_workers=2,
                    threads_per_worker=1,
                    processes=False,
                    protocol="tcp://",
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",  # its HTTP server starts anyway
                )
                self._client = Client(self._own_cluster, set_as_default=False)
            return self._client

    def close(self) -> None:
        """Close the LocalCluster this dashboard started (a given client is left open)."""
        with self._lock:
            if self._own_cluster is not None:
                self._client.close()
                self._own_cluster.close()
                self._own_cluster = None
                self._client = None

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

    async def _on_materialize(self, event: Any = None) -> None:
        self.materialize_button.disabled = True
        self.progress.visible = True
        self.progress.active = True
        self.status.object = "materializing… (a LocalCluster starts on first use)"
        try:
            report = await asyncio.get_running_loop().run_in_executor(None, self.run_materialize)
        except Exception as err:  # noqa: BLE001 - shown to the user, logged
            log.exception("dashboard: materialize failed")
            self.status.object = f"**materialize failed**: {html.escape(str(err))}"
        else:
            kept = ", ".join(f"{g} {n}" for g, n in report.kept.items())
            self.status.object = (
                f"materialized `{report.out_dir}` in {report.seconds:.1f} s: "
                f"{report.rows_in} rows in, kept {kept}"
                + (f"; {len(report.failed)} parts failed" if report.failed else "")
            )
        finally:
            self.progress.active = False
            self.progress.visible = False
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

    # histograms are drawn once; only their threshold lines (and the bars) update in place
    def _similarity_lines(self, *_: Any) -> hv.Overlay:
        cfg = self.config()
        return plots.threshold_lines({g: cfg.similarity_for(g) for g in self.view.groups})

    def _kept_plot(self, *_: Any) -> hv.Bars:
        return plots.kept_bars(self.funnel()).opts(framewise=True)

    def _dropped_plot(self, *_: Any) -> hv.Bars:
        return plots.funnel_bars(self.funnel(), width=420).opts(framewise=True)

    def _punsafe_line(self, *_: Any) -> hv.Overlay:
        return plots.threshold_lines({ALL: self.config().max_punsafe})

    def _pwatermark_line(self, *_: Any) -> hv.Overlay:
        return plots.threshold_lines({ALL: self.config().max_pwatermark})

    def _text_line(self, *_: Any) -> hv.Overlay:
        return plots.threshold_lines({ALL: self.config().min_text_chars})

    @staticmethod
    def _with_lines(static: hv.Overlay, lines: Any, *deps: Any) -> pn.pane.HoloViews:
        opts = static.opts.get().kwargs
        return pn.pane.HoloViews((static * hv.DynamicMap(pn.bind(lines, *deps))).opts(**opts))

    def _samples(self, group: str, *_: Any) -> str:
        t = self.config().similarity_for(group)
        parts = []
        for side, title in (("above", f"kept: similarity ≥ {t:.3f}"), ("below", "dropped: below")):
            try:
                rows = self.view.samples_near(t, group, side, N_SAMPLES)
            except Exception as err:  # noqa: BLE001 - a broken shard must not break the page
                log.exception("dashboard: samples_near failed")
                parts.append(f"<p>{side}: samples unavailable ({html.escape(str(err))})</p>")
                continue
            if rows.empty:
                parts.append(f"<h4>{html.escape(title)}</h4><p>no {group} rows {side}</p>")
            else:
                parts.append(samples_html(rows, title=f"{group} · {title}"))
        return "".join(parts)

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
            self.status,
            width=320,
        )
        funnel = pn.Column(
            pn.pane.Markdown(pn.bind(self.funnel_markdown, *values), width=460),
            pn.Row(
                pn.pane.HoloViews(hv.DynamicMap(pn.bind(self._kept_plot, *values))),
                pn.pane.HoloViews(hv.DynamicMap(pn.bind(self._dropped_plot, *values))),
            ),
        )
        view = self.view
        similarity = self._with_lines(
            plots.histogram_overlay(
                view,
                schema.SIMILARITY,
                title="CLIP similarity per language group",
                width=560,
                height=300,
            ),
            self._similarity_lines,
            *sims,
        )
        samples = pn.Column(
            self.sample_group,
            pn.pane.HTML(pn.bind(self._samples, self.sample_group, *throttled), width=900),
        )
        distributions = pn.Column(
            pn.Row(
                self._with_lines(
                    plots.score_histogram(view, schema.PUNSAFE),
                    self._punsafe_line,
                    self.max_punsafe,
                ),
                self._with_lines(
                    plots.score_histogram(view, schema.PWATERMARK),
                    self._pwatermark_line,
                    self.max_pwatermark,
                ),
            ),
            pn.Row(
                self._with_lines(
                    plots.text_length_histogram(view), self._text_line, self.min_text_chars
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
            f"({len(self.view)} rows)"
        )
        return pn.Column(
            header,
            pn.Row(controls, pn.Column(similarity, funnel)),
            pn.Tabs(*tabs, dynamic=False),
        )


def build_dashboard(
    run_path: str | Path | RunView, *, client: Any | None = None
) -> pn.viewable.Viewable:
    """The Panel app for one run (not served). ``run_path`` may be an opened :class:`RunView`.

    In a server session the LocalCluster a materialize click starts is closed with the session.
    """
    pn.extension(sizing_mode="fixed")
    hv.extension("bokeh", logo=False)
    board = ThresholdDashboard(load_view(run_path), client=client)
    if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        pn.state.on_session_destroyed(functools.partial(_close, board))
    board.layout.dashboard = board  # tests and notebooks reach the widgets through the layout
    return board.layout


def _close(board: ThresholdDashboard, session_context: Any) -> None:
    board.close()


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """``laion-dask dashboard RUN [--port N] [--address 127.0.0.1] [--no-show]``: serve the app.

    Returns 0 when the server stops, 2 when the run cannot be opened.
    """
    parser = argparse.ArgumentParser(
        prog="laion-dask dashboard", description="Tune thresholds on a run's stored scores."
    )
    parser.add_argument("run", help="run directory with finished scores")
    parser.add_argument("--port", type=int, default=5006, help="0 = a free port")
    parser.add_argument("--address", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--no-show", action="store_true", help="do not open a browser")
    args = parser.parse_args(argv)
    try:
        view = load_view(args.run)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"laion-dask dashboard: cannot open {args.run}: {err}", file=sys.stderr)
        return 2
    port = args.port or _free_port(args.address)
    origins = [f"{args.address}:{port}"]
    if args.address in ("127.0.0.1", "0.0.0.0"):
        origins.append(f"localhost:{port}")
    print(f"laion-dask dashboard: http://{args.address}:{port}/", file=sys.stderr)
    pn.serve(
        {"/": functools.partial(build_dashboard, view)},
        port=port,
        address=args.address,
        show=not args.no_show,
        websocket_origin=origins,
        title="laion-dask thresholds",
    )
    return 0
