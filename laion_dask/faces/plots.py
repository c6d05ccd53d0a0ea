"""HoloViews elements over a :class:`laion_dask.products.explore.RunView` (no Panel, no server).

Every function reads the view's precomputed histograms or in-memory columns, so redrawing after a
threshold change costs O(bins), never a Dask job. The dashboard (:mod:`laion_dask.faces.dashboard`)
and the notebooks both use them.

Example
-------
>>> view = explore.open_run("demo-run")                                     # doctest: +SKIP
>>> similarity_histograms(view, view.thresholds) + language_bars(view)      # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd

from laion_dask.ground import schema
from laion_dask.ground.config import FilterConfig
from laion_dask.products.explore import ALL, TEXT_LENGTH, RunView

log = logging.getLogger(__name__)

__all__ = [
    "COLORS",
    "DATASHADER_ROWS",
    "histogram_overlay",
    "similarity_histograms",
    "score_histogram",
    "text_length_histogram",
    "language_bars",
    "size_density",
    "precision_recall_frame",
]

#: one colour per language group, shared by every plot
COLORS = {"en": "#1f77b4", "multi": "#ff7f0e", "nolang": "#2ca02c", ALL: "#555555"}
#: above this many sized rows, ``size_density`` rasterizes with datashader when it is installed
DATASHADER_ROWS = 200_000
ROWS = "rows"


def histogram_overlay(
    view: RunView,
    column: str,
    thresholds: dict[str, float | None] | None = None,
    *,
    groups: tuple[str, ...] | None = None,
    title: str | None = None,
    width: int = 460,
    height: int = 260,
) -> hv.Overlay:
    """One ``hv.Histogram`` per language group of ``column`` plus a ``hv.VLine`` per threshold.

    ``thresholds`` maps a group (or ``"all"``) to a threshold; None values draw no line.
    Uses the view's precomputed histograms (shared edges across groups).
    """
    layers: list[Any] = []
    for g in groups if groups is not None else view.groups:
        counts, edges = view.histogram(column, g)
        layers.append(
            hv.Histogram((edges, counts), kdims=[column], vdims=[ROWS], label=g).opts(
                alpha=0.45, color=COLORS.get(g, "#777777")
            )
        )
    for g, t in (thresholds or {}).items():
        if t is not None and np.isfinite(t):
            line = hv.VLine(float(t), label=f"threshold {g}")
            layers.append(
                line.opts(color=COLORS.get(g, "#000000"), line_dash="dashed", line_width=2)
            )
    overlay = hv.Overlay(layers)
    return overlay.opts(
        title=title or column, width=width, height=height, legend_position="top_left"
    )


def similarity_histograms(
    view: RunView, thresholds: FilterConfig | None = None, **kw: Any
) -> hv.Overlay:
    """Similarity per language group with each group's threshold drawn (None: no lines)."""
    lines = {g: thresholds.similarity_for(g) for g in view.groups} if thresholds else {}
    kw.setdefault("title", "CLIP similarity per language group")
    return histogram_overlay(view, schema.SIMILARITY, lines, **kw)


def score_histogram(
    view: RunView, column: str, threshold: float | None = None, **kw: Any
) -> hv.Overlay:
    """``punsafe`` or ``pwatermark`` over every group, with its drop threshold (None: no line)."""
    if column not in (schema.PUNSAFE, schema.PWATERMARK):
        raise ValueError(f"column must be punsafe or pwatermark, got {column!r}")
    kw.setdefault("title", f"{column} (drop above the line)")
    return histogram_overlay(view, column, {ALL: threshold}, groups=(ALL,), **kw)


def text_length_histogram(view: RunView, min_chars: int | None = None, **kw: Any) -> hv.Overlay:
    """Caption length in characters per group, with ``min_text_chars`` drawn."""
    kw.setdefault("title", "caption length (chars)")
    return histogram_overlay(view, TEXT_LENGTH, {ALL: min_chars}, **kw)


def language_bars(view: RunView, top: int = 15, *, width: int = 460, height: int = 260) -> hv.Bars:
    """Rows per detected language (``top`` most frequent)."""
    langs = view.language_counts(top=top)
    data = [(str(k), int(v)) for k, v in langs.items()]
    return hv.Bars(data, kdims=["language"], vdims=[ROWS]).opts(
        title="languages", width=width, height=height, xrotation=45, tools=["hover"]
    )


def size_density(
    view: RunView,
    *,
    max_rows: int = DATASHADER_ROWS,
    width: int = 460,
    height: int = 320,
) -> hv.Element:
    """Original width x height of the downloaded rows.

    ``hv.HexTiles`` up to ``max_rows`` sized rows; above, a datashader ``rasterize`` of the points
    when datashader is installed (else HexTiles over the full arrays, still vectorised).
    """
    # the view's in-memory float64 columns (NaN = not downloaded); no public accessor yet
    values = view._values  # noqa: SLF001
    w, h = values[schema.ORIGINAL_WIDTH], values[schema.ORIGINAL_HEIGHT]
    ok = np.isfinite(w) & np.isfinite(h)
    data = pd.DataFrame({schema.ORIGINAL_WIDTH: w[ok], schema.ORIGINAL_HEIGHT: h[ok]})
    kdims = [schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT]
    title = f"width x height ({len(data)} rows)"
    if len(data) > max_rows:
        try:
            from holoviews.operation.datashader import rasterize
        except ImportError:
            log.info("plots: %d sized rows and no datashader: using HexTiles", len(data))
        else:
            return rasterize(hv.Points(data, kdims=kdims)).opts(
                width=width, height=height, title=title, colorbar=True, cnorm="log"
            )
    return hv.HexTiles(data, kdims=kdims).opts(
        width=width, height=height, title=title, colorbar=True, tools=["hover"]
    )


def precision_recall_frame(pr: dict[str, Any]) -> pd.DataFrame:
    """``RunView.precision_recall`` output as a table: one row for ``all``, one per group."""
    keys = ["precision", "recall", "f1", "kept", "true_pairs", "true_kept", "pairs"]
    return pd.DataFrame({"all": pr, **pr.get("groups", {})}).T[keys].astype("float64")
