"""The search page: a text box or an uploaded image -> a grid of the run's nearest images.

``build_search_page(RUN)`` returns the Panel layout; ``main`` serves it
(``laion-dask search RUN --serve``) and ``dashboards/search.py`` is the same app for
``panel serve``. Queries are encoded with the run's own CLIP and searched in the index that
``laion-dask index RUN`` built (:mod:`laion_dask.products.knn`).
"""

from __future__ import annotations

import argparse
import functools
import html
import logging
from pathlib import Path
from typing import Any

import panel as pn

from laion_dask.faces.serving import face_parser, serve_main
from laion_dask.ground import schema
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.explore import samples_html
from laion_dask.products.knn import RESULT_DEDUP_COSINE, load_index, search

__all__ = ["SearchPage", "build_search_page", "main"]

log = logging.getLogger(__name__)

_ALL = "all"


class SearchPage:
    """Widgets and the result grid of one run's search page (no server needed)."""

    def __init__(self, run: str | Path | RunDir, *, encoder: Any | None = None) -> None:
        self.run = RunDir(str(run)) if isinstance(run, str | Path) else run
        self.encoder = encoder
        self.index = load_index(self.run)  # a missing index fails here, before any widget
        self.query = pn.widgets.TextInput(
            label="query", placeholder="a red bicycle ... (Enter to search)", width=420
        )
        self.upload = pn.widgets.FileInput(label="image", accept="image/*", width=260)
        self.k = pn.widgets.IntSlider(label="results", start=1, end=50, value=12, width=200)
        self.group = pn.widgets.Select(
            label="language group", options=[_ALL, *schema.LANGUAGE_GROUPS], width=120
        )
        self.max_punsafe = pn.widgets.FloatSlider(
            label="max punsafe", start=0.0, end=1.0, step=0.01, value=1.0, width=200
        )
        self.max_pwatermark = pn.widgets.FloatSlider(
            label="max pwatermark", start=0.0, end=1.0, step=0.01, value=1.0, width=200
        )
        self.dedup = pn.widgets.Checkbox(label="collapse near-duplicates", value=True)
        self.status = pn.pane.Markdown("", width=900)
        self.results = pn.pane.HTML("", width=1000)
        self._last: dict[str, Any] = {}
        self.query.param.watch(self._on_text, "value")
        self.upload.param.watch(self._on_upload, "value")
        for w in (self.k, self.group, self.max_punsafe, self.max_pwatermark, self.dedup):
            w.param.watch(self._rerun, "value")
        info = self.index.info
        self.layout = pn.Column(
            pn.pane.Markdown(
                f"## Search {html.escape(self.run.path)}\n"
                f"{info.n} images · {info.factory} · recall@{info.recall_k} {info.recall:.3f}",
                width=900,
            ),
            pn.Row(self.query, self.upload),
            pn.Row(self.k, self.group, self.max_punsafe, self.max_pwatermark, self.dedup),
            self.status,
            self.results,
        )

    def filters(self) -> dict[str, Any]:
        """The filter widgets as :func:`laion_dask.products.knn.search` arguments (1.0 = no cut)."""
        punsafe, pwatermark = float(self.max_punsafe.value), float(self.max_pwatermark.value)
        return {
            "language_group": None if self.group.value == _ALL else self.group.value,
            "max_punsafe": None if punsafe >= 1.0 else punsafe,
            "max_pwatermark": None if pwatermark >= 1.0 else pwatermark,
            "dedup": RESULT_DEDUP_COSINE if self.dedup.value else None,
        }

    def run_query(self, *, text: str | None = None, image: bytes | None = None) -> None:
        """Search and show the grid; bad input (an undecodable image) becomes a status line."""
        self._last = {"text": text, "image": image}
        what = f"“{text}”" if text is not None else "the uploaded image"
        try:
            res = search(
                self.run, text=text, image=image, k=int(self.k.value), encoder=self.encoder,
                **self.filters(),
            )  # fmt: skip
        except ValueError as err:
            self.status.object = f"**Cannot search:** {html.escape(str(err))}"
            self.results.object = ""
            return
        self.status.object = f"{len(res)} results for {html.escape(what)}"
        self.results.object = samples_html(res, cell_class="knn-result")

    def _on_text(self, event: Any) -> None:
        if str(event.new or "").strip():
            self.run_query(text=str(event.new))

    def _on_upload(self, event: Any) -> None:
        if event.new:
            self.run_query(image=bytes(event.new))

    def _rerun(self, *_: Any) -> None:
        if self._last:
            self.run_query(**self._last)


def build_search_page(
    run: str | Path | RunDir, *, encoder: Any | None = None
) -> pn.viewable.Viewable:
    """The Panel search page for one run (not served); ``layout.search_page`` is the page."""
    pn.extension(sizing_mode="fixed")
    page = SearchPage(run, encoder=encoder)
    page.layout.search_page = page  # type: ignore[attr-defined]  # tests and notebooks reach the widgets through the layout
    return page.layout


def main(argv: list[str] | None = None) -> int:
    """``laion-dask search RUN --serve [--port N] [--no-show] [-q] [-v]``: serve the page.

    Returns 0 when the server stops, 2 (one line on stderr) when the run has no usable index.
    """
    parser = face_parser(
        "laion-dask search --serve",
        "Serve a page that searches a run's index by text or by image.",
        run_help="run directory with an index (laion-dask index RUN)",
        port=5007,
    )
    return serve_main(parser, argv, _open_app, title="laion-dask search")


def _open_app(args: argparse.Namespace) -> Any:
    load_index(args.run)  # fails before serving: no index, an unreadable one
    return functools.partial(build_search_page, args.run)
