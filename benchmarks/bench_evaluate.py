"""`laion-dask evaluate` on the demo, as a user runs it: time, result, and the same result twice.

Runs ``laion-dask demo --out RUN`` (or takes ``--run RUN``), then ``laion-dask evaluate RUN
--thresholds laion.toml --fraction 0.3 0.1`` ``--repeats`` times into the same run, each a whole
command timed with its start-up. Records per candidate the rows, the share of true pairs, the
primary measure with its 95 % interval and its difference from the no-filter baseline, and
whether every repeat wrote the same results (``results.json`` less its ``timing``).

Usage::

    .venv/bin/python benchmarks/bench_evaluate.py                 # demo + 2 evaluations
    .venv/bin/python benchmarks/bench_evaluate.py --run demo-run --repeats 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _results import save, whole_command

CLI = str(Path(sys.executable).with_name("laion-dask"))
LAION = """[filters]
similarity_en = 0.28
similarity_multi = 0.26
similarity_nolang = 0.26
"""


def _row(cand: dict, primary: str) -> dict:
    m = cand["measures"][primary]
    row = {
        "rows": cand["rows"],
        "true pairs": round(cand["composition"].get("ground_truth", {}).get("precision", 0), 3),
        primary: f"{m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]",
    }
    if "vs_baseline" in m and cand["name"] != "no-clip-filter":
        d = m["vs_baseline"]
        row["vs no filter"] = f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="an existing demo run (default: run laion-dask demo first)")
    p.add_argument("--repeats", type=int, default=2, help="evaluations of the same candidates")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        run = args.run or str(Path(tmp) / "demo-run")
        if not args.run:
            wall, cpu, _ = whole_command([CLI, "-q", "demo", "--out", run])
            figures["laion-dask demo s"] = round(wall, 1)
        laion = Path(tmp) / "laion.toml"
        laion.write_text(LAION)
        cmd = [CLI, "-q", "evaluate", run, "--thresholds", str(laion), "--fraction", "0.3", "0.1"]
        cmd += ["--workers", str(args.workers), "--threads", "1"]
        results = []
        for i in range(args.repeats):
            wall, cpu, _ = whole_command(cmd)
            figures[f"evaluate run {i + 1}"] = {"wall s": round(wall, 1), "CPU s": round(cpu)}
            res = json.loads((Path(run) / "evaluate" / "results.json").read_text())
            res.pop("timing")
            results.append(res)
    first = results[0]
    figures["repeats give the same results.json"] = all(r == first for r in results)
    primary = first["primary"]
    figures["candidates"] = {c["name"]: _row(c, primary) for c in first["candidates"]}
    figures["winner"] = first["winner"]["name"]
    figures["zero-shot top-1"] = {
        c["name"]: round(c["measures"]["zero_shot_top1"]["mean"], 3)
        for c in first["candidates"]
        if "zero_shot_top1" in c["measures"]
    }
    save(
        "evaluate",
        figures=figures,
        summary=(
            "laion-dask evaluate on the demo run: no filter, LAION's 0.28/0.26, top 30 % and "
            f"top 10 % by CLIP score, {first['budget']['steps']} steps x "
            f"{first['budget']['batch_size']} pairs, {len(first['budget']['seed'])} seeds, "
            f"{first['heldout']['images']} held-out pictures; intervals are paired-bootstrap "
            "95 %. Target: at least four candidates in under 15 minutes on 2 cores."
        ),
    )
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
