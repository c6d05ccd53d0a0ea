"""Shared fixtures. Stage-specific fixtures live in tests/helpers/<stage>.py, imported by tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.cluster import LOOPBACK_CLUSTER

REPO = Path(__file__).resolve().parents[1]
# ../shared/corpus beside the checkout (CI lays it there); LAION_DASK_CORPUS overrides
CORPUS = Path(os.environ.get("LAION_DASK_CORPUS", REPO.parent / "shared" / "corpus"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu", action="store_true", default=False, help="run tests marked gpu")
    parser.addoption(
        "--network", action="store_true", default=False, help="run tests marked network"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "gpu" in item.keywords and not config.getoption("--gpu"):
            item.add_marker(pytest.mark.skip(reason="GPU test: run with --gpu on a CUDA machine"))
        if "network" in item.keywords and not config.getoption("--network"):
            item.add_marker(pytest.mark.skip(reason="needs the internet: run with --network"))


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The real third-party crawl files in ../shared/corpus; skips cleanly when absent."""
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def client():
    """A real distributed LocalCluster: 2 workers in this process, on loopback only."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, **LOOPBACK_CLUSTER) as cluster,
        Client(cluster) as c,
    ):
        yield c
