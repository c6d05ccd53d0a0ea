"""``report.html`` and ``report.md`` from the statistics: tables, Bokeh plots (JavaScript inline,
no network), sample thumbnails as data URIs."""

from __future__ import annotations

import functools
import html
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
from bokeh.embed import components
from bokeh.models import ColumnDataSource, Span
from bokeh.plotting import figure
from bokeh.resources import INLINE

from laion_dask.ground import schema
from laion_dask.orchestration.reduce import map_reduce
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.report.statistics import TOP_DOMAINS, TOP_FAILED_DOMAINS, TOP_LANGUAGES
from laion_dask.stages.imaging import data_uri, read_thumbnails

log = logging.getLogger(__name__)

#: bars a histogram plot shows at most (adjacent bins are summed for the plot only)
PLOT_BINS = 200
FUNNEL_HEADER = ["stage", "outcome", "rows"]
#: pixels of a sample thumbnail's longer side
THUMBNAIL_SIZE = 160


# --- thumbnails -----------------------------------------------------------------------------------


def _shard_thumbnails(shard: tuple[str, list[str]], image_root: str) -> dict[str, str]:
    """``{shard/key: data URI}`` of one shard's sample images (unreadable ones left out)."""
    name, keys = shard
    imgs = read_thumbnails(image_root, keys, [name] * len(keys), THUMBNAIL_SIZE)
    return {f"{name}/{k}": data_uri(img, "jpeg") for k, img in zip(keys, imgs, strict=True) if img}


def _merge_dicts(parts: list[dict[str, str]]) -> dict[str, str]:
    return {k: v for part in parts for k, v in part.items()}


def collect_thumbnails(
    run: RunDir | str, stats: Mapping[str, Any], *, client: Any | None = None
) -> dict[str, str]:
    """Thumbnails of every sample in ``stats`` (one task per shard): ``{shard/key: data URI}``."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    wanted: dict[str, set[str]] = {}
    for kind in stats["samples"].values():
        for recs in kind.values():
            for r in recs:
                wanted.setdefault(r["shard"], set()).add(r["key"])
    if not wanted:
        return {}
    shards = [(name, sorted(keys)) for name, keys in sorted(wanted.items())]
    read = functools.partial(_shard_thumbnails, image_root=run.join("images"))
    return map_reduce(read, shards, _merge_dicts, client=client)


# --- rendering ------------------------------------------------------------------------------------


def _by_count(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """Items by descending count, ties by name (stats.json itself is written with sorted keys)."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}"
    return html.escape(str(v))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str], table_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _hist_figure(name: str, entry: Mapping[str, Any], title: str, *, log_x: bool = False) -> Any:
    edges = np.asarray(entry["edges"])
    counts = np.asarray(entry["counts"])
    step = -(-len(counts) // PLOT_BINS)
    if step > 1:  # fine bins (for quantiles) are summed into at most PLOT_BINS bars
        starts = np.arange(0, len(counts), step)
        counts = np.add.reduceat(counts, starts)
        edges = np.append(edges[starts], edges[-1])
    fig = figure(
        title=f"{title} (n={entry['n']:,})",
        height=260,
        width=420,
        x_axis_type="log" if log_x else "linear",
        tools="pan,wheel_zoom,box_zoom,reset,hover,save",
        name=f"plot-{name}",
    )
    fig.quad(top=counts, bottom=0, left=edges[:-1], right=edges[1:], fill_alpha=0.7)
    fig.y_range.start = 0
    marks = [entry[k] for k in ("threshold", "cutoff") if entry.get(k) is not None]
    if entry.get("min") is not None and not log_x:  # zoom on the data (and the marks)
        lo, hi = min([entry["min"], *marks]), max([entry["max"], *marks])
        pad = max((hi - lo) * 0.05, float(edges[1] - edges[0]))
        fig.x_range.start, fig.x_range.end = lo - pad, hi + pad
    for key in ("threshold", "cutoff"):
        if entry.get(key) is not None:
            fig.add_layout(
                Span(location=entry[key], dimension="height", line_color="red", line_width=2)
            )
    return fig


def bar_figure(
    name: str,
    items: Sequence[Sequence[Any]],
    title: str,
    *,
    horizontal: bool,
    colors: Sequence[str] | None = None,
) -> Any:
    """Bars of ``(label, count)`` items (``colors``: one per item), sized to their number.

    The report's bar plots, and the dashboard's live funnel: it keeps the labels and sets the
    counts in place (``fig.renderers[0].data_source.data["count"]``) as its thresholds move.
    """
    labels = [str(k) for k, _ in items] or ["(none)"]
    counts = [int(v) for _, v in items] or [0]
    colors = list(colors) if colors else ["#1f77b4"] * len(labels)  # Bokeh's first colour
    src = ColumnDataSource({"label": labels, "count": counts, "color": colors})
    common = {"title": title, "tools": "hover,save,reset", "tooltips": "@label: @count"}
    if horizontal:
        fig = figure(
            y_range=labels[::-1],
            height=max(200, 18 * len(labels) + 60),
            width=560,
            name=f"plot-{name}",
            **common,
        )
        fig.hbar(y="label", right="count", height=0.8, color="color", source=src)
        fig.x_range.start = 0
    else:
        fig = figure(
            x_range=labels,
            height=280,
            width=max(320, 22 * len(labels) + 80),
            name=f"plot-{name}",
            **common,
        )
        fig.vbar(x="label", top="count", width=0.8, color="color", source=src)
        fig.y_range.start = 0
        fig.xaxis.major_label_orientation = 0.9
    return fig


def _figures(stats: Mapping[str, Any]) -> dict[str, Any]:
    """Plot name -> Bokeh figure, in page order."""
    h = stats["histograms"]
    final = stats["funnel"]["final"]
    figs: dict[str, Any] = {}
    items = [(f"kept ({g})", n) for g, n in final["kept"].items()] + _by_count(final["dropped"])
    figs["funnel"] = bar_figure("funnel", items, "Final fate of every candidate", horizontal=True)
    langs = stats["languages"]
    figs["languages"] = bar_figure(
        "languages",
        [*langs["top"], ["(rest)", langs["rest"]]],
        f"Languages of candidates (top {TOP_LANGUAGES} + rest)",
        horizontal=False,
    )
    for g in schema.LANGUAGE_GROUPS:
        figs[f"similarity_{g}"] = _hist_figure(
            f"similarity_{g}", h[f"similarity_{g}"], f"Similarity, {g} (red: threshold)"
        )
    caveat = " - see the caveat" if _tag_caveat(stats) else ""
    for col in ("punsafe", "pwatermark"):
        cut = stats["above_cutoff"][col]
        figs[col] = _hist_figure(
            col,
            {**h[col], "cutoff": cut["cutoff"]},
            f"{col} (red: {cut['source']} cut-off {cut['cutoff']}){caveat}",
        )
    for name, title in (
        ("original_width", "Original width (px)"),
        ("original_height", "Original height (px)"),
        ("aspect_ratio", "Aspect ratio w/h (original)"),
        ("stored_width", "Stored width (px)"),
        ("stored_height", "Stored height (px)"),
        ("caption_chars", "Caption characters (candidates)"),
        ("caption_words", "Caption words (candidates)"),
        ("caption_chars_kept", "Caption characters (kept)"),
        ("caption_words_kept", "Caption words (kept)"),
    ):
        figs[name] = _hist_figure(name, h[name], title)
    figs["original_bytes"] = _hist_figure(
        "original_bytes", h["original_bytes"], "Original bytes", log_x=True
    )
    doms = stats["domains"]
    figs["domains"] = bar_figure(
        "domains",
        doms["top_images"],
        f"Downloaded images per domain (top {TOP_DOMAINS})",
        horizontal=True,
    )
    fails = stats["download_failures"]
    figs["failures_status"] = bar_figure(
        "failures_status",
        _by_count(fails["by_status"]),
        "Download failures by status",
        horizontal=False,
    )
    figs["failures_domain"] = bar_figure(
        "failures_domain",
        fails["by_domain"],
        f"Download failures by domain (top {TOP_FAILED_DOMAINS})",
        horizontal=True,
    )
    return figs


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.6em} h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left} th{background:#f3f3f3}
.plots{display:flex;flex-wrap:wrap;gap:12px} .ok{color:#070} .bad{color:#b00;font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:8px} .grid figure{margin:0;width:150px;font-size:.75em}
.grid img{max-width:145px;max-height:145px;display:block} .missing{color:#999}
.caveat{background:#fff4e0;border-left:4px solid #e69500;padding:.4em .8em}
"""


def _samples_html(stats: Mapping[str, Any], thumbs: Mapping[str, str]) -> str:
    parts = []
    for kind, title in (("random", "Random kept samples"), ("threshold", "At the threshold")):
        for g in schema.LANGUAGE_GROUPS:
            recs = stats["samples"][kind].get(g, [])
            thr = stats["histograms"][f"similarity_{g}"].get("threshold")
            cells = []
            for r in recs:
                uri = thumbs.get(f"{r['shard']}/{r['key']}")
                img = (
                    f'<img src="{uri}" alt="{html.escape(r["key"])}">'
                    if uri
                    else '<div class="missing">(image missing)</div>'
                )
                cap = html.escape(r["text"][:80])
                sim = "–" if r["similarity"] is None else f"{r['similarity']:.3f}"
                cells.append(
                    f"<figure>{img}<figcaption>{html.escape(r['language'])} · sim {sim}"
                    f"<br>{cap}</figcaption></figure>"
                )
            body = "".join(cells) or '<p class="missing">no rows</p>'
            parts.append(
                f'<h3>{title}: {g} (threshold {thr})</h3><div class="grid samples-{kind}-{g}">'
                f"{body}</div>"
            )
    return "".join(parts)


def _inline_js() -> str:
    """Bokeh's JavaScript, inline only.

    When Panel has been imported in the same process (a notebook, the dashboard), Bokeh's
    resources also list Panel's extension files by relative URL; a self-contained report must not
    reference files it does not carry, and its plots need none of them.
    """
    return "\n".join(f'<script type="text/javascript">\n{raw}\n</script>' for raw in INLINE.js_raw)


def render_html(stats: Mapping[str, Any], thumbs: Mapping[str, str] | None = None) -> str:
    """One self-contained HTML page: Bokeh JS/CSS inline, images as data URIs, no server."""
    figs = _figures(stats)
    script, divs = components(figs)
    fn = stats["funnel"]
    checks = fn["checks"]
    final = fn["final"]
    check_rows = [
        (s, "counts add up" if ok else "COUNTS DO NOT ADD UP") for s, ok in checks.items()
    ]
    check_rows.append(
        ("final reasons (this report)", "counts add up" if final["adds_up"] else "NO")
    )
    run = stats["run"]
    thr = stats["thresholds"]
    quant = [
        (
            name,
            e["population"],
            e["n"],
            e["mean"],
            *e["quantiles"].values(),
            _error_text(e["quantile_error"]),
        )
        for name, e in stats["histograms"].items()
    ]
    qheads = list(next(iter(stats["histograms"].values()))["quantiles"])
    stage_rows = [
        (
            s,
            f["partitions"],
            f["rows"],
            f["seconds"],
            f["rows_per_second"],
            f.get("bytes"),
            f.get("bytes_per_second"),
        )
        for s, f in run["stages"].items()
    ]
    reasons = [r for r, _ in _by_count(final["dropped"])]
    plot_div = "".join(f'<div class="plot" data-plot="{n}">{d}</div>' for n, d in divs.items())
    names = ",".join(divs)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>laion-dask report: {html.escape(run["path"])}</title>
<meta name="laion-dask-plots" content="{names}">
<style>{_CSS}</style>
{INLINE.render_css()}
{_inline_js()}
</head><body>
<h1>Dataset report</h1>
<p>Run <code>{html.escape(run["path"])}</code>; {stats["rows"]:,} candidate rows in
{stats["partitions"]} partitions; generated {html.escape(run["generated_at"])}.</p>
<h2 id="funnel">Funnel</h2>
{_table(check_rows, ["stage", "check"])}
{
        _table(
            [(r["stage"], r["outcome"], r["rows"]) for r in fn["table"]],
            FUNNEL_HEADER,
            "funnel-table",
        )
    }
<h3 id="consent">Consent and safety</h3>
<p>Rows removed because a page, a host or a list opted them out, or the downloader refused the
address: {fn["consent"]["rows"]:,} ({fn["consent"]["share"]:.2%} of candidates).</p>
{_table(list(fn["consent"]["reasons"].items()), ["reason", "rows"])}
<h3>Final fate by language group</h3>
{
        _table(
            [
                (g, *(fn["by_group"][g].get(k, 0) for k in ["kept", *reasons]))
                for g in fn["by_group"]
            ],
            ["group", "kept", *reasons],
            "final-by-group",
        )
    }
<h2 id="key-numbers">Key numbers</h2>
{_table(_key_rows(stats), ["", "value"])}
{_tag_note(stats)}
<h2 id="plots">Plots</h2>
<div class="plots">{plot_div}</div>
<h2>Distributions (quantiles from merged fixed-bin histograms)</h2>
{_table(quant, ["name", "population", "n", "mean", *qheads, "quantile error"])}
{_sketch_note(stats)}
<h2 id="samples">Samples</h2>
{_samples_html(stats, thumbs or {})}
<h2 id="run-facts">Run facts</h2>
{
        _table(
            [
                ("input files", len(run["input_files"])),
                ("model", run["model"]),
                *[(f"clip {k}", v) for k, v in run["clip_resolved"].items()],
                ("thresholds from", thr["source"]),
                *[(f"threshold {k}", v) for k, v in thr["values"].items()],
                *[(f"version {k}", v) for k, v in run["versions"].items()],
            ],
            ["", "value"],
        )
    }
{_table(stage_rows, ["stage", "partitions", "rows", "seconds", "rows/s", "bytes", "bytes/s"])}
<details><summary>input files</summary><pre>{html.escape(chr(10).join(run["input_files"]))}</pre>
</details>
<details><summary>resolved config</summary><pre>{
        html.escape(json.dumps(run["config"], indent=1))
    }</pre></details>
<div id="render-status" data-expected="{len(divs)}" hidden>pending</div>
{script}
<script>
(function () {{
  var expected = {len(divs)}, tries = 0;
  function check() {{
    var done = 0;
    document.querySelectorAll("div.plot").forEach(function (el) {{
      var view = el.querySelector("[data-root-id] > *");
      var shadow = view && view.shadowRoot;
      if (shadow && shadow.querySelector(".bk-Canvas, canvas")) {{
        el.setAttribute("data-rendered", "yes");
        done += 1;
      }}
    }});
    var el = document.getElementById("render-status");
    if (done >= expected) {{ el.textContent = "rendered " + done; return; }}
    if (++tries < 200) setTimeout(check, 50); else el.textContent = "incomplete " + done;
  }}
  window.addEventListener("load", function () {{ setTimeout(check, 50); }});
}})();
</script>
</body></html>
"""
    return page


def _tag_caveat(stats: Mapping[str, Any]) -> str | None:
    return (stats.get("tags") or {}).get("caveat")


def _tag_note(stats: Mapping[str, Any]) -> str:
    """A visible warning next to the punsafe / pwatermark figures when the model behind them
    cannot support them (:func:`~laion_dask.products.report.statistics.tag_provenance`)."""
    caveat = _tag_caveat(stats)
    if not caveat:
        return ""
    return (
        '<p class="caveat" id="tag-caveat"><b>Caveat on punsafe / pwatermark:</b> '
        f"{html.escape(caveat)}.</p>"
    )


def _error_text(err: Mapping[str, float]) -> str:
    return f"± {err['abs']:.4g}" if "abs" in err else f"± {err['rel']:.2%}"


def _sketch_note(stats: Mapping[str, Any]) -> str:
    sk = stats["domains"]["sketch"]
    under = sk["max_undercount"]
    if not any(under.values()) and all(sk["distinct_exact"].values()):
        text = "Domain counts are exact (fewer distinct domains than the sketch capacity)."
    else:
        text = (
            f"Domain counts are Misra-Gries lower bounds (capacity {sk['capacity']:,}); "
            "each is at most this far below the true count: "
            + ", ".join(f"{k} {v:,}" for k, v in under.items())
            + f". Distinct counts: k-minimum-values sketches (k = {sk['distinct_k']:,}), "
            + ", ".join(
                f"{k} {'exact' if v else 'estimated'}" for k, v in sk["distinct_exact"].items()
            )
            + "."
        )
    return f'<p class="note">{html.escape(text)}</p>'


def _key_rows(stats: Mapping[str, Any]) -> list[tuple[str, Any]]:
    final = stats["funnel"]["final"]
    h = stats["histograms"]
    rows: list[tuple[str, Any]] = [
        ("candidate rows", stats["rows"]),
        ("kept rows", sum(final["kept"].values())),
        *[(f"kept {g}", n) for g, n in final["kept"].items()],
        ("duplicate rate", round(stats["duplicates"]["rate"], 4)),
        ("distinct languages", stats["languages"]["distinct"]),
        ("distinct domains (downloaded)", stats["domains"]["distinct_images"]),
    ]
    for g in schema.LANGUAGE_GROUPS:
        e = h[f"similarity_{g}"]
        rows.append((f"median similarity {g} (threshold {e['threshold']})", e["quantiles"]["p50"]))
    for col, a in stats["above_cutoff"].items():
        rows.append(
            (f"share {col} > {a['cutoff']}", None if a["share"] is None else round(a["share"], 4))
        )
    for name in ("original_width", "original_height", "caption_chars_kept"):
        rows.append((f"median {name}", h[name]["quantiles"]["p50"]))
    return rows


def render_markdown(stats: Mapping[str, Any]) -> str:
    """A README-ready markdown summary: key numbers, funnel, top languages."""

    def md(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v).replace("|", "\\|")

    final = stats["funnel"]["final"]
    lines = ["| | value |", "|---|---:|"]
    lines += [f"| {md(k)} | {md(v)} |" for k, v in _key_rows(stats)]
    lines += ["", "| outcome | rows | share |", "|---|---:|---:|"]
    rows = max(stats["rows"], 1)
    for g, n in final["kept"].items():
        lines.append(f"| kept ({g}) | {n:,} | {n / rows:.1%} |")
    for reason, n in _by_count(final["dropped"]):
        lines.append(f"| {md(reason)} | {n:,} | {n / rows:.1%} |")
    ok = "yes" if final["adds_up"] else "NO"
    lines.append(f"| **candidates** (adds up: {ok}) | {stats['rows']:,} | 100% |")
    consent = stats["funnel"]["consent"]
    lines += ["", "| consent and safety | rows | share |", "|---|---:|---:|"]
    for reason, n in consent["reasons"].items():
        lines.append(f"| {md(reason)} | {n:,} | {n / rows:.1%} |")
    lines.append(f"| **all consent and safety** | {consent['rows']:,} | {consent['share']:.1%} |")
    if _tag_caveat(stats):
        lines += ["", f"**Caveat on punsafe / pwatermark:** {_tag_caveat(stats)}."]
    lines += ["", "| language | candidates |", "|---|---:|"]
    lines += [f"| {md(k)} | {n:,} |" for k, n in stats["languages"]["top"][:10]]
    return "\n".join(lines) + "\n"


def write_report(
    run: RunDir | str,
    stats: Mapping[str, Any],
    *,
    formats: Sequence[str] = ("html",),
    out: str | None = None,
    client: Any | None = None,
) -> dict[str, str]:
    """Write ``stats.json`` and each of ``formats`` (``html``, ``md``; ``json`` = stats only)
    into ``out`` (default ``RUN/report``); returns ``{format: path}``."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    out = out or run.join("report")
    fs, _ = fsspec.core.url_to_fs(out)
    fs.makedirs(out, exist_ok=True)
    paths = {"json": f"{out}/stats.json"}
    run.write_json_atomic(paths["json"], dict(stats))
    if "html" in formats:
        thumbs = collect_thumbnails(run, stats, client=client)
        paths["html"] = f"{out}/report.html"
        run.write_bytes_atomic(paths["html"], render_html(stats, thumbs).encode("utf-8"))
    if "md" in formats:
        paths["md"] = f"{out}/report.md"
        run.write_bytes_atomic(paths["md"], render_markdown(stats).encode("utf-8"))
    return paths
