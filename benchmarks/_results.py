"""Benchmarks time whole commands and write what they measured as JSON under benchmarks/results/.

``save("scaling", figures={...})`` records the figures with the command line that produced them,
the commit, the date and the machine, so a figure in docs/benchmarks.md always says where it
came from (``scripts/gen_benchmark_docs.py`` renders that page from these files).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=RESULTS.parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def whole_command(cmd: list[str], **kw: Any) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall and CPU seconds (user + sys of its whole process tree) of one command, as users time it.

    Exits with the command's stderr when it fails: a benchmark never reports a failed run.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd[:3]))} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc


def save(name: str, *, figures: dict[str, Any], summary: str = "") -> Path:
    """Write ``benchmarks/results/NAME.json``; returns its path.

    ``figures`` maps a figure's name to its value (numbers, strings, or one level of nested
    dicts); ``summary`` is one sentence saying what was compared with what.
    """
    RESULTS.mkdir(exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    record = {
        "benchmark": name,
        "summary": summary,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "load_at_end": round(load, 2) if load is not None else None,
        },
        "figures": figures,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    print(f"\nresults: {path}", file=sys.stderr)
    return path
