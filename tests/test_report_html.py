"""report.html as ``laion-dask report RUN`` writes it, opened in headless Chromium from file://
with the network cut off: nothing is fetched, every plot is drawn, the funnel shown is stats.json's.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from laion_dask.ground.config import FilterConfig
from laion_dask.products.materialize import materialize
from tests.helpers.browser import browser_skip_reason, chromium_page
from tests.helpers.runs import make_scored_run

pytestmark = pytest.mark.skipif(
    browser_skip_reason() is not None, reason=str(browser_skip_reason())
)

CLI = Path(sys.executable).with_name("laion-dask")

#: per plot: the pixels of its canvases, as distinct colours and the share that is not white
PLOT_PIXELS_JS = """
() => Array.from(document.querySelectorAll("div.plot")).map((el) => {
  const canvases = [];
  const walk = (node) => {
    if (!node) return;
    if (node.tagName === "CANVAS") canvases.push(node);
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children || []) walk(child);
  };
  walk(el);
  let colours = new Set(), inked = 0, total = 0;
  for (const c of canvases) {
    if (!c.width || !c.height) continue;
    const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < data.length; i += 16) {  // every 4th pixel is plenty
      if (data[i + 3] === 0) continue;
      total += 1;
      colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
      if (data[i] < 240 || data[i + 1] < 240 || data[i + 2] < 240) inked += 1;
    }
  }
  return {name: el.dataset.plot, canvases: canvases.length, colours: colours.size,
          inked: inked, total: total};
})
"""

#: the body rows of the table with this id, as text cells
TABLE_JS = """
(id) => Array.from(document.getElementById(id).querySelectorAll("tbody tr")).map(
  (tr) => Array.from(tr.children).map((td) => td.textContent.trim()))
"""

#: the counts behind the funnel bar chart, read from the Bokeh document the page built
FUNNEL_PLOT_JS = """
() => {
  for (const doc of Bokeh.documents) {
    for (const m of doc.all_models) {
      if (m.name === "plot-funnel") {
        const src = m.renderers[0].data_source.data;
        return Object.fromEntries(src.label.map((l, i) => [l, src.count[i]]));
      }
    }
  }
  return null;
}
"""


@pytest.fixture(scope="module")
def written(tmp_path_factory, client):
    """A scored run with image shards, materialized, and its report written by the CLI."""
    run = make_scored_run(tmp_path_factory.mktemp("report-html") / "run", parts=3, rows=60)
    materialize(run, FilterConfig(max_punsafe=0.9, min_side=80), client=client)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [str(CLI), "report", run.path], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    page = Path(res.stdout.strip().splitlines()[-1])
    assert page == Path(run.path) / "report" / "report.html"
    stats = json.loads((page.parent / "stats.json").read_text())
    return page, stats


def _cut_network(page) -> list[str]:
    """Refuse every http(s) request of ``page`` (the network is off); returns the list they go
    to."""
    fetched: list[str] = []

    def offline(route) -> None:
        fetched.append(route.request.url)
        route.abort("internetdisconnected")

    page.route("http://**/*", offline)
    page.route("https://**/*", offline)
    return fetched


def test_offline_guard_counts_what_a_page_fetches(tmp_path):
    """The guard above can fail: a page loading a CDN script and an image is caught."""
    html = tmp_path / "online.html"
    html.write_text(
        '<!DOCTYPE html><html><head><script src="https://cdn.example.org/bokeh.js"></script>'
        '</head><body><img src="http://img.example.com/a.png"></body></html>'
    )
    with chromium_page() as (page, _):
        fetched = _cut_network(page)
        page.goto(html.resolve().as_uri())
        page.wait_for_load_state("load")
    assert sorted(fetched) == ["http://img.example.com/a.png", "https://cdn.example.org/bokeh.js"]


def _numbers(cells: list[str]) -> list[str]:
    return [c.replace(",", "") for c in cells]


def test_report_html_renders_offline_with_the_funnel_of_stats_json(written):
    page_path, stats = written
    with chromium_page() as (page, errors):
        fetched = _cut_network(page)
        page.goto(page_path.resolve().as_uri())
        status = page.locator("#render-status")
        expected = int(status.get_attribute("data-expected"))
        page.wait_for_function(
            "() => document.getElementById('render-status').textContent.startsWith('rendered')",
            timeout=60_000,
        )
        assert status.text_content() == f"rendered {expected}"
        plots = page.evaluate(PLOT_PIXELS_JS)
        visible = page.inner_text("body")
        funnel_rows = page.evaluate(TABLE_JS, "funnel-table")
        by_group_rows = page.evaluate(TABLE_JS, "final-by-group")
        funnel_plot = page.evaluate(FUNNEL_PLOT_JS)
        shot = page.screenshot(full_page=True)
    assert not fetched, fetched  # self-contained: no http(s) request left the page
    assert not errors, errors
    # every plot drew something: canvases with several colours and ink on them
    assert len(plots) == expected > 10
    for p in plots:
        assert p["canvases"] >= 1 and p["colours"] >= 3 and p["inked"] > 0.01 * p["total"], p
    # the render probe is for tests: no stray "rendered N" on the page (issue 15)
    assert "rendered" not in visible
    # the funnel the page shows is stats.json's: the stage table, the final fate per group and
    # the bars of the funnel plot
    fn = stats["funnel"]
    shown = [_numbers(r) for r in funnel_rows]
    assert shown == [[r["stage"], r["outcome"], str(r["rows"])] for r in fn["table"]]
    assert len(by_group_rows) == 3
    final = fn["final"]
    reasons = sorted(final["dropped"], key=lambda r: (-final["dropped"][r], r))
    for row in by_group_rows:
        group, *counts = _numbers(row)
        expect = [fn["by_group"][group].get(k, 0) for k in ["kept", *reasons]]
        assert [int(c) for c in counts] == expect
    bars = {f"kept ({g})": n for g, n in final["kept"].items()} | final["dropped"]
    assert funnel_plot == bars
    assert sum(funnel_plot.values()) == stats["rows"]
    # tags from a zero-shot model carry a visible caveat
    assert stats["tags"]["caveat"] and "Caveat on punsafe / pwatermark" in visible
    from PIL import Image

    assert Image.open(io.BytesIO(shot)).size[1] > 2000  # the whole page was laid out
