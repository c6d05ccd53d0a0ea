"""The notebooks, exported to HTML, render their plots with the network off.

Each notebook runs top to bottom in a real kernel (nbclient, as ``jupyter nbconvert --execute``
does), is exported by nbconvert's default HTML exporter (what ``jupyter nbconvert --to html``
writes), and is opened from ``file://`` in headless Chromium with every http(s) request aborted
and recorded. Plots count as rendered when BokehJS loaded, every Bokeh figure got a view, and each
figure's data area is drawn on (ink on the composed canvas; an empty figure has none).

nbconvert's own page template links require.js and MathJax (for LaTeX in Markdown cells) from
cdnjs; the notebook cannot change that, the plots do not use them, and they are the only requests
allowed. Every other request (BokehJS, Panel's scripts or stylesheets from a CDN) fails the test.

The notebooks run with ``LAION_DASK_NOTEBOOK_OUT`` naming a folder that does not exist yet (they
create it) and a smaller demo corpus than their default, to keep the run short.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.browser import browser_skip_reason, chromium_page

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
#: demo pages per notebook run here (the notebooks' default is 40; nbval runs them with it)
PAGES = "12"
#: a notebook's Panel/HoloViews output carries this MIME type (one per displayed plot object)
HV_EXEC_MIME = "application/vnd.holoviews_exec.v0+json"
#: environment that would switch a notebook away from its offline demo mode
REMOTE_ENV = ("LAION_DASK_CRAWL", "DASK_SCHEDULER_ADDRESS", "LAION_DASK_EXPLORE_RUN")

pytestmark = [
    pytest.mark.slow,
    # a notebook builds its own demo run: minutes on a loaded 2-core machine, not a speed check
    pytest.mark.timeout(900),
    # Panel's display messages carry only a comm id, no renderable MIME type: nbconvert says so
    pytest.mark.filterwarnings("ignore:Your element with mimetype:UserWarning"),
]

#: a figure counts as drawn when at least this share of its frame (the data area, legends left
#: out) is ink; measured: an empty figure 0.01 %, an all-zero histogram (outlines only) 0.4 %,
#: the notebooks' plots 2-20 %
MIN_INK = 0.01

#: JavaScript: what BokehJS rendered. For each Figure model of every document: whether a view
#: exists and has finished drawing, and how many pixels of its frame are ink on the composed
#: canvas. Ink is colour (max - min channel > 30) or darker than the grid's light grey; the white
#: background and grid lines are not, and axes, ticks and titles lie outside the frame.
FIGURES_JS = """
() => {
  if (typeof Bokeh === "undefined" || !Bokeh.documents) return {bokeh: false};
  const figures = [];
  for (const doc of Bokeh.documents)
    for (const m of doc.all_models) if (m.type === "Figure") figures.push(m);
  const views = new Map();
  for (const v of Bokeh.index.all_views()) if (v.model.type === "Figure") views.set(v.model, v);
  const out = [];
  for (const m of figures) {
    const v = views.get(m);
    const title = m.title ? m.title.text : "";
    if (v === undefined) { out.push({id: m.id, title, view: false}); continue; }
    const finished = typeof v.has_finished === "function" ? v.has_finished() : true;
    let ink = 0, area = 0;
    if (finished) {
      const canvas = v.canvas_view.compose().canvas;
      const r = canvas.width / v.canvas_view.bbox.width;  // device pixels per CSS pixel
      const f = v.frame.bbox;  // 2 px in from each edge: the axis lines sit on it
      const legends = [...v.renderer_views.values()]
        .filter(rv => rv.model.type === "Legend").map(rv => rv.bbox);
      const x0 = Math.ceil((f.x0 + 2) * r), y0 = Math.ceil((f.y0 + 2) * r);
      const w = Math.max(0, Math.floor((f.width - 4) * r));
      const h = Math.max(0, Math.floor((f.height - 4) * r));
      const d = w && h ? canvas.getContext("2d").getImageData(x0, y0, w, h).data : [];
      for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
        const cx = (x0 + x) / r, cy = (y0 + y) / r;
        if (legends.some(b => cx >= b.x0 && cx <= b.x1 && cy >= b.y0 && cy <= b.y1)) continue;
        area++;
        const i = 4 * (y * w + x);
        const hi = Math.max(d[i], d[i + 1], d[i + 2]), lo = Math.min(d[i], d[i + 1], d[i + 2]);
        if (d[i + 3] > 0 && (hi - lo > 30 || hi < 215)) ink++;
      }
    }
    out.push({id: m.id, title, view: true, finished, area, ink});
  }
  return {bokeh: true, documents: Bokeh.documents.length, figures: out};
}
"""


def _skip_reason() -> str | None:
    reason = browser_skip_reason()
    if reason:
        return reason
    try:
        import nbclient  # noqa: F401
        import nbconvert  # noqa: F401
    except ImportError:
        return "nbconvert is not installed (pip install -e '.[dev]')"
    return None


def execute(path: Path, out_dir: Path) -> Any:
    """Run ``path`` top to bottom in a fresh kernel; returns the executed notebook node."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # the kernel inherits this process's environment (set by the test's monkeypatch)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    nbformat.write(nb, out_dir / path.name)  # kept beside the HTML for a failure's post-mortem
    return nb


def plot_outputs(nb: Any) -> int:
    """How many outputs of the executed notebook display a Panel/HoloViews (Bokeh) object."""
    return sum(
        HV_EXEC_MIME in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


def render_offline(html: Path, *, expect_plots: bool) -> tuple[list[str], dict, list[str]]:
    """Open ``html`` from file:// with every non-file request aborted.

    Returns (requested URLs, what BokehJS rendered, page errors).
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    requested: list[str] = []

    def offline(route: Any) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            requested.append(url)
            route.abort()

    with chromium_page() as (page, errors):
        page.route("**/*", offline)
        page.on("websocket", lambda ws: requested.append(ws.url))
        page.goto(html.as_uri(), wait_until="load")
        if expect_plots:
            # BokehJS builds and draws its documents after load; give it time, then look
            done = "r.bokeh && r.figures.length > 0 && r.figures.every(f => f.view && f.finished)"
            wait = f"() => {{ const r = ({FIGURES_JS.strip()})(); return {done}; }}"
            try:
                page.wait_for_function(wait, timeout=60_000, polling=500)
            except PlaywrightTimeout:
                pass  # the assertions below say what is missing
        else:
            page.wait_for_timeout(1_000)
        rendered = page.evaluate(FIGURES_JS)
        page_errors = [e for e in errors if e.startswith("page error")]
    return requested, rendered, page_errors


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_html_renders_offline(path, tmp_path, monkeypatch):
    from nbconvert import HTMLExporter

    out = tmp_path / "out" / "not-yet"  # the notebooks must create it
    monkeypatch.setenv("LAION_DASK_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("LAION_DASK_DEMO_PAGES", PAGES)
    for name in REMOTE_ENV:
        monkeypatch.delenv(name, raising=False)

    nb = execute(path, tmp_path)
    assert out.is_dir()
    exporter = HTMLExporter()
    body, _ = exporter.from_notebook_node(nb)
    html = tmp_path / f"{path.stem}.html"
    html.write_text(body, encoding="utf-8")

    n_plots = plot_outputs(nb)
    requested, rendered, page_errors = render_offline(html, expect_plots=n_plots > 0)

    template = {exporter.require_js_url, exporter.mathjax_url}  # nbconvert's page, not ours
    needed = sorted(set(requested) - template)
    assert needed == [], f"{path.name}: {len(needed)} requests while offline: {needed[:8]}"
    assert page_errors == [], page_errors[:5]
    if n_plots == 0:
        return
    assert rendered["bokeh"], f"{path.name}: BokehJS did not load ({n_plots} plot outputs)"
    assert rendered["documents"] >= n_plots, rendered["documents"]
    figures = rendered["figures"]
    blank = [
        f
        for f in figures
        if not (f["view"] and f["finished"] and f["area"] and f["ink"] >= MIN_INK * f["area"])
    ]
    assert figures and blank == [], json.dumps(blank, indent=1)[:2000]


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert len(NOTEBOOKS) >= 4, NOTEBOOKS  # a moved folder must not pass as "no notebooks"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code, path.name
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        # cell 1 (after the title) sets the parameters from environment variables
        assert "os.environ" in code[0].source, path.name
