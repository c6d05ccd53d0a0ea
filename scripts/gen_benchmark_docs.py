"""Render docs/benchmarks.md from benchmarks/results/*.json (what the benchmark scripts wrote).

    python scripts/gen_benchmark_docs.py          # rewrite docs/benchmarks.md
    python scripts/gen_benchmark_docs.py --check  # exit 1 when the page is out of date

Figures are never typed into the docs by hand: a benchmark run writes its JSON
(benchmarks/_results.py), this script turns every JSON into a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"

INTRO = """# Benchmarks

Each benchmark script runs its baseline beside ours in the same run and writes what it measured
to `benchmarks/results/NAME.json`; this page is generated from those files by
`scripts/gen_benchmark_docs.py` (a test fails when it is out of date). Figures are from the
machine each record names; this project's development machine has 2 shared cores, so expect
±30 %. A benchmark with no JSON here has not been run since results were recorded this way;
its earlier, hand-copied figures are in the README at commit 86f7deb.

```bash
.venv/bin/python benchmarks/bench_extract.py --commands   # the command vs plain loop, cc2dataset
.venv/bin/python benchmarks/bench_download.py --commands  # the command vs img2dataset
.venv/bin/python benchmarks/bench_language.py    # short alt-text accuracy; langid vs py3langid
.venv/bin/python benchmarks/bench_score.py       # vs a plain single-process CLIP loop
.venv/bin/python benchmarks/bench_explore.py     # threshold change at 1M/10M rows vs pandas
.venv/bin/python benchmarks/bench_report.py      # report statistics vs one Dask read of its columns
.venv/bin/python benchmarks/bench_scaling.py     # the demo pipeline, 1 vs 2 workers
.venv/bin/python benchmarks/bench_index.py --n 1000000 --spread 1.5  # kNN build, recall, latency
.venv/bin/python benchmarks/bench_decode.py      # image decode + preprocess: threads vs processes
.venv/bin/python benchmarks/bench_robots.py      # robots.txt matcher: ours vs protego
.venv/bin/python benchmarks/bench_sketches.py    # report sketches vs Apache DataSketches
.venv/bin/python benchmarks/bench_evaluate.py    # demo + evaluate twice: result, time, same twice
bash benchmarks/gpu_check.sh                     # on a GPU machine: LocalCUDACluster images/s
```
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _rows(figures: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_rows(value, prefix=f"{name} / "))
        else:
            out.append((name, _fmt(value)))
    return out


def render() -> str:
    parts = [INTRO]
    for path in sorted(RESULTS.glob("*.json")):
        rec = json.loads(path.read_text())
        m = rec.get("machine", {})
        parts.append(f"\n## {rec.get('benchmark', path.stem)}\n")
        if rec.get("summary"):
            parts.append(f"{rec['summary']}\n")
        parts.append(
            f"`{rec.get('command', '?')}` at commit `{rec.get('commit', '?')}`, "
            f"{rec.get('date', '?')}, {m.get('cpus', '?')} CPUs ({m.get('cpu', '?')}), "
            f"load {m.get('load_at_end', '?')} at the end "
            f"([{path.name}](../benchmarks/results/{path.name}))\n"
        )
        parts.append("| figure | value |\n|---|---|")
        # records written by benchmarks/_results.py keep their figures under "figures"; any other
        # JSON a benchmark wrote is shown whole
        meta = {"benchmark", "summary", "command", "commit", "date", "machine"}
        figures = rec.get("figures") or {k: v for k, v in rec.items() if k not in meta}
        parts.extend(f"| {k} | {v} |" for k, v in _rows(figures))
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print("docs/benchmarks.md is stale: run scripts/gen_benchmark_docs.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
