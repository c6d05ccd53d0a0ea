"""HoloViews elements over a RunView: types, dimensions, and the numbers against pandas."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import pytest

from laion_dask.faces import plots
from laion_dask.ground import schema
from laion_dask.ground.config import FilterConfig
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products import explore
from tests.helpers.runs import make_scored_run

hv.extension("bokeh")


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    run = make_scored_run(tmp_path_factory.mktemp("plots-run"), parts=3, rows=40)
    return explore.open_run(run.path)


@pytest.fixture(scope="module")
def frame(view):
    """The same scores recomputed with pandas from the parquet parts."""
    parts = [pd.read_parquet(p) for p in view.run.parts("scores")]
    return pd.concat(parts, ignore_index=True)


def _render(element):
    """Every element must also render to a Bokeh figure (catches bad opts)."""
    assert hv.render(element, backend="bokeh") is not None


def _layers(overlay, kind):
    return [el for el in overlay if isinstance(el, kind)]


def test_similarity_histograms_one_histogram_per_group_and_threshold_lines(view, frame):
    cfg = FilterConfig(similarity_en=0.3, similarity_multi=0.2, similarity_nolang=0.25)
    overlay = plots.similarity_histograms(view, cfg)
    assert isinstance(overlay, hv.Overlay)
    hists = _layers(overlay, hv.Histogram)
    assert [h.label for h in hists] == list(view.groups)
    for h in hists:
        assert [d.name for d in h.kdims] == [schema.SIMILARITY]
        assert [d.name for d in h.vdims] == ["rows"]
        expected = frame.loc[frame[schema.LANGUAGE_GROUP].eq(h.label), schema.SIMILARITY].notna()
        assert h.dimension_values("rows").sum() == expected.sum()
    lines = _layers(overlay, hv.VLine)
    assert sorted(float(line.data) for line in lines) == pytest.approx([0.2, 0.25, 0.3])
    _render(overlay)


def test_score_histogram_draws_its_threshold_or_none(view, frame):
    with_line = plots.score_histogram(view, schema.PUNSAFE, 0.4)
    (hist,) = _layers(with_line, hv.Histogram)
    assert hist.kdims[0].name == schema.PUNSAFE
    assert hist.dimension_values("rows").sum() == frame[schema.PUNSAFE].notna().sum()
    (line,) = _layers(with_line, hv.VLine)
    assert float(line.data) == pytest.approx(0.4)
    assert not _layers(plots.score_histogram(view, schema.PWATERMARK, None), hv.VLine)
    _render(with_line)
    with pytest.raises(ValueError, match="punsafe or pwatermark"):
        plots.score_histogram(view, schema.SIMILARITY, 0.3)


def test_text_length_histogram_counts_every_row(view, frame):
    overlay = plots.text_length_histogram(view, 12)
    hists = _layers(overlay, hv.Histogram)
    assert sum(h.dimension_values("rows").sum() for h in hists) == len(frame)
    assert hists[0].kdims[0].name == explore.TEXT_LENGTH
    assert float(_layers(overlay, hv.VLine)[0].data) == 12
    _render(overlay)


def test_language_bars_match_value_counts(view, frame):
    bars = plots.language_bars(view, top=10)
    assert bars.kdims[0].name == "language"
    expected = frame[schema.LANGUAGE].astype("string").fillna("<none>").value_counts()
    got = dict(zip(bars.dimension_values("language"), bars.dimension_values("rows"), strict=True))
    assert got == {str(k): int(v) for k, v in expected.items()}
    _render(bars)


def test_size_density_has_one_point_per_sized_row(view, frame):
    sized = frame[schema.ORIGINAL_WIDTH].notna() & frame[schema.ORIGINAL_HEIGHT].notna()
    hexes = plots.size_density(view)
    assert isinstance(hexes, hv.HexTiles)
    assert [d.name for d in hexes.kdims] == [schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT]
    assert len(hexes) == sized.sum() > 0
    np.testing.assert_array_equal(
        np.sort(hexes.dimension_values(schema.ORIGINAL_WIDTH)),
        np.sort(frame.loc[sized, schema.ORIGINAL_WIDTH].to_numpy("float64")),
    )
    _render(hexes)


def _raster_counts(element) -> float:
    """Rows counted by a rasterized ``size_density`` (its ``Image`` of per-pixel counts)."""
    image = element[()] if isinstance(element, hv.DynamicMap) else element
    assert isinstance(image, hv.Image)
    return float(np.nansum(image.dimension_values(2)))


def test_size_density_rasterizes_many_rows_with_datashader(view, frame):
    pytest.importorskip("datashader", reason="datashader is in the notebook/dev extras")
    sized = frame[schema.ORIGINAL_WIDTH].notna() & frame[schema.ORIGINAL_HEIGHT].notna()
    many = plots.size_density(view, max_rows=10)
    assert isinstance(many, hv.DynamicMap)  # re-rasterized on zoom in a served page
    assert _raster_counts(many) == sized.sum()  # every sized row lands in a pixel
    _render(many)


def test_size_density_datashades_a_large_run(tmp_path):
    """A run past DATASHADER_ROWS: one raster of counts, no million-point glyphs."""
    pytest.importorskip("datashader", reason="datashader is in the notebook/dev extras")
    n = plots.DATASHADER_ROWS + 50_000
    rng = np.random.default_rng(3)
    ok = rng.random(n) < 0.9
    sizes = {
        c: pd.array(np.where(ok, rng.integers(32, 4000, n), None), dtype="Int32")
        for c in (schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT)
    }
    rows = pd.DataFrame(
        {
            schema.SIMILARITY: np.where(ok, rng.normal(0.3, 0.05, n), np.nan).astype("float32"),
            schema.PUNSAFE: np.where(ok, rng.random(n), np.nan).astype("float32"),
            schema.PWATERMARK: np.where(ok, rng.random(n), np.nan).astype("float32"),
            schema.LANGUAGE_GROUP: pd.array(rng.choice(["en", "multi"], n), dtype="string"),
            schema.LANGUAGE: pd.array(np.full(n, "en"), dtype="string"),
            **sizes,
            schema.SCORE_STATUS: pd.array(np.where(ok, "success", None), dtype="string"),
            explore.TEXT_LENGTH: rng.integers(0, 200, n),
            explore.UPSTREAM_REASON: pd.array(np.where(ok, None, "failed_to_download"), "string"),
        }
    )
    big = explore.RunView(RunDir(str(tmp_path)), rows, FilterConfig())
    density = plots.size_density(big)
    assert isinstance(density, hv.DynamicMap)
    assert _raster_counts(density) == ok.sum()
    fig = hv.render(density, backend="bokeh")
    assert fig.renderers and type(fig.renderers[0].glyph).__name__ == "Image"


def test_size_density_without_datashader_falls_back_to_hextiles(view, frame, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "holoviews.operation.datashader", None)  # import fails
    sized = frame[schema.ORIGINAL_WIDTH].notna() & frame[schema.ORIGINAL_HEIGHT].notna()
    many = plots.size_density(view, max_rows=10)
    assert isinstance(many, hv.HexTiles) and len(many) == sized.sum()


def test_precision_recall_frame_one_row_per_group():
    pr = {
        "precision": 0.5,
        "recall": 0.25,
        "f1": 1 / 3,
        "kept": 4,
        "true_pairs": 8,
        "true_kept": 2,
        "pairs": 10,
        "groups": {
            "en": {
                "precision": 1.0,
                "recall": 0.5,
                "f1": 2 / 3,
                "kept": 2,
                "true_pairs": 4,
                "true_kept": 2,
                "pairs": 5,
            }
        },
    }
    table = plots.precision_recall_frame(pr)
    assert list(table.index) == ["all", "en"]
    assert table.loc["all", "recall"] == 0.25 and table.loc["en", "kept"] == 2
