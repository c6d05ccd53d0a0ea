"""The package's layers hold: import-linter's contracts, no import cycles, Dask in few modules.

faces -> products -> orchestration -> stages -> ground (pyproject.toml ``[tool.importlinter]``).
grimp reads every import statement, function-local ones included, so a cycle hidden behind a
local import counts here too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
DASK = ("dask", "distributed", "dask_cuda")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("laion_dask", include_external_packages=True, cache_dir=None)


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    mods = sorted(m for m in graph.modules if m.startswith("laion_dask"))
    succ = {m: sorted(graph.find_modules_directly_imported_by(m) & set(mods)) for m in mods}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in mods:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(succ[node]):
                work.append((node, i + 1))
                nxt = succ[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return out


def test_no_import_cycles(graph):
    assert _cycles(graph) == []


def test_cycle_finder_sees_a_cycle():
    """The check above can fail: a two-module cycle is found."""
    g = grimp.ImportGraph()
    for m in ("laion_dask.a", "laion_dask.b", "laion_dask.c"):
        g.add_module(m)
    g.add_import(importer="laion_dask.a", imported="laion_dask.b")
    g.add_import(importer="laion_dask.b", imported="laion_dask.a")
    g.add_import(importer="laion_dask.b", imported="laion_dask.c")
    assert _cycles(g) == [["laion_dask.a", "laion_dask.b"]]


def test_dask_is_imported_by_at_most_four_modules(graph):
    users = set()
    for name in DASK:
        if name in graph.modules:
            users |= {m for m in graph.find_modules_that_directly_import(name)}
    users = {m for m in users if m.startswith("laion_dask")}
    assert all(m.startswith("laion_dask.orchestration") for m in users), sorted(users)
    assert len(users) <= 4, sorted(users)
