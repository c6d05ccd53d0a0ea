"""Fixtures and helpers for the demo corpus, its image host and the small CLIP."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from laion_dask.products.synthetic.corpus import CorpusInfo, CorpusSpec, generate_corpus

#: never fetched: tests that only read files use these (port 9 = discard)
FAKE_BASE_URLS = ("http://127.0.0.1:9", "http://127.0.0.2:9", "http://127.0.0.3:9")
#: small but with every noise kind drawn at least 5 times at seed 6
SMALL_SPEC = CorpusSpec(n_pages=80, n_images=60, n_files=2, seed=6)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    """A small demo corpus on disk (URLs point at an unserved fake port)."""
    return generate_corpus(tmp_path_factory.mktemp("corpus"), SMALL_SPEC, base_urls=FAKE_BASE_URLS)


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    """The default-size corpus (a couple of seconds), for proportions."""
    return generate_corpus(
        tmp_path_factory.mktemp("default"), CorpusSpec(), base_urls=FAKE_BASE_URLS
    )
