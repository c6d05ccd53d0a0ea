"""The compiled fast paths (laion_dask/stages/extract/_speedups.c) give what their Python twins
give.

Each test runs the same input through ``common.speedups`` and through the pure-Python code
(``common.speedups = None``) and compares. CI builds the extension and sets
``LAION_DASK_REQUIRE_SPEEDUPS=1``, so these never silently compare Python with itself there.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import mmh3
import numpy as np
import pandas as pd
import pytest

from laion_dask.ground.config import ExtractConfig
from laion_dask.stages.extract import _Collector, common, extract_file
from laion_dask.stages.extract.text import laion_hashes, record_hashes
from tests.helpers.extract import make_wat, wat_payload
from tests.helpers.warc_spec import spec_file, spec_files
from tests.test_extract_warc import _corpus_files

FAST = common.speedups

needs_fast = pytest.mark.skipif(
    FAST is None, reason="C fast paths not built (no compiler, or LAION_DASK_PURE_PYTHON set)"
)


def test_built_where_required():
    """CI builds the extension; a build that silently fell back to Python must fail there."""
    if os.environ.get("LAION_DASK_REQUIRE_SPEEDUPS") == "1":
        assert FAST is not None, "laion_dask.stages.extract._speedups was not built"
    assert (FAST is None) == (
        importlib.util.find_spec("laion_dask.stages.extract._speedups") is None
        or os.environ.get("LAION_DASK_PURE_PYTHON", "") not in ("", "0")
    )


@pytest.fixture
def pure(monkeypatch):
    """Run the block with the Python twins."""

    class _Switch:
        def __enter__(self):
            monkeypatch.setattr(common, "speedups", None)

        def __exit__(self, *exc):
            monkeypatch.setattr(common, "speedups", FAST)
            return False

    return _Switch()


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = "abcXYZ 09&;é東\u0301\u00c3\u00a9\U0001f600\x00\x85/:?#."
    return "".join(rng.choice(alphabet) for _ in range(n))


@needs_fast
def test_pair_hashes_equal_mmh3():
    rng = random.Random(7)
    # every tail length of the 16-byte blocks, multi-byte characters across block edges
    urls = [_random_text(rng, rng.randint(0, 40)) for _ in range(3000)] + ["", "a" * 17]
    texts = [_random_text(rng, rng.randint(0, 40)) for _ in range(3000)] + ["", "b" * 31]
    got = laion_hashes(urls, texts)
    assert got.dtype == np.int64
    assert got.tolist() == [mmh3.hash64(u + t)[0] for u, t in zip(urls, texts, strict=True)]


@needs_fast
def test_pair_hashes_refuse_surrogates(pure):
    # (mmh3 5.3 itself crashes the interpreter on such a str: both paths encode first)
    urls, texts = ["http://a/\ud800.jpg"], ["x"]
    with pytest.raises(UnicodeEncodeError):
        laion_hashes(urls, texts)
    with pure, pytest.raises(UnicodeEncodeError):
        laion_hashes(urls, texts)


@needs_fast
def test_record_hashes_equal_mmh3(pure):
    offsets = [0, 1, 9, 10, 123456789, 2**40, 2**62]
    for src in ("f.wat.gz", "s3://bucket/crawl/ä/東.warc.wat.gz", "x" * 300, ""):
        got = record_hashes(src, offsets)
        want = [mmh3.hash64(f"{src}\0{o}", signed=False)[0] for o in offsets]
        assert got.tolist() == want
        with pure:
            assert record_hashes(src, offsets).tolist() == want
    # what UTF-8 cannot encode goes to the Python loop, which raises like mmh3
    with pytest.raises(UnicodeEncodeError):
        record_hashes("\udcff.wat", [1])


_PATHS = ["IMG@/src", "IMG@/src", "IMG@/src", "IMG@/data-src", "A@/href", None, "xIMG@", "IMG@",
          "img@/src", "IMG@/src "]  # fmt: skip
_URLS = [
    "http://h.com/a.jpg", "https://h.com/b.png", " http://h.com/c.jpg", "http://h.com/d.jpg\n",
    "/abs/e.jpg", "rel/f.jpg", "g.jpg", "//cdn.h.com/h.jpg", "//-x/i.jpg", "?q=1", "#frag",
    "./j.jpg", "../k.jpg", "a/./b.jpg", "a/../b.jpg", "x:y.jpg", "a\\b.jpg", "tab\there.jpg",
    "data:image/png;base64,AAAA", "HTTP://H.COM/UP.JPG", "http:/one-slash.jpg", "https:x",
    "ünï/çødé.jpg", "/東京.jpg", "", None, "   ", "mailto:x@y", "javascript:void(0)",
    "http://", "https://", "http:", "\u3000/ideographic-space.jpg",
]  # fmt: skip
_ALTS = [
    "a cat", "A dog on a sofa", "", None, " lead", "trail ", "two  spaces", "a &amp; b",
    "ctrl\x01char", "tab\there", "café", "cafe\u0301", "caf\u00c3\u00a9 mojibake", "東京の写真",
    "emoji \U0001f600", "x" * 50, "\x85nel", "zero\u200bwidth", "ümlaut  double", "\u00a0nbsp",
    "Ǆ", "\u0300combining first", "Ã©", "ÂŒ", "a\u2028b", "   ", "&", "x&y", "\x7f",
]  # fmt: skip
_BASES = [
    ("http://h.com/dir/page.html", ""),
    ("https://h.com", ""),
    ("http://h.com/dir/", "http://other.com/base/"),
    ("http://h.com/a/b", "/rel/base/"),
    ("http://h.com/x/./y/", ""),
    ("http://[::1]:8080/p/q.html", ""),
    ("http://H.com:80/Ünï/p", ""),
    ("", ""),
    ("not a url", ""),
    ("http://h.com/p?q=1#f", "sub/"),
    ("http://[bad/", ""),
]


def _collect(cfg, records):
    col = _Collector("f.wat.gz", cfg)
    for offset, (page, base, links) in enumerate(records):
        col.add_wat(offset, page, base, links, [])
    return (
        col.indices,
        col.urls,
        col.texts,
        col.records,
        col.summary.records_with_links,
    )


@needs_fast
@pytest.mark.parametrize("max_chars", [2000, 12])
def test_img_pairs_equal_python_loop(pure, max_chars):
    rng = random.Random(max_chars)
    link = SimpleNamespace  # any object with path/url/alt attributes (msgspec structs, tuples)
    records = []
    for _ in range(3000):
        page, base = rng.choice(_BASES)
        links = [
            link(path=rng.choice(_PATHS), url=rng.choice(_URLS), alt=rng.choice(_ALTS))
            for _ in range(rng.randint(0, 12))
        ]
        records.append((page, base, links))
    # every combination at least once, on one page
    every = [link(path="IMG@/src", url=u, alt=a) for u in _URLS for a in _ALTS]
    records.append(("http://h.com/d/p", "", every))
    cfg = ExtractConfig(max_text_chars=max_chars)
    fast = _collect(cfg, records)
    with pure:
        slow = _collect(cfg, records)
    assert fast == slow
    assert len(fast[0]) > 1000  # the inputs exercised the pair path, not only the skips


@needs_fast
def test_img_pairs_rejects_non_string_alt():
    col = _Collector("f", ExtractConfig())
    with pytest.raises(TypeError, match="alt"):
        col.add_wat(0, "http://a/", "", [SimpleNamespace(path="IMG@/src", url="x.jpg", alt=3)])


def _frames_equal(path: str, pure) -> None:
    fast = extract_file(path, ExtractConfig())
    with pure:
        slow = extract_file(path, ExtractConfig())
    pd.testing.assert_frame_equal(fast.pairs, slow.pairs)
    a, b = fast.summary.to_dict(), slow.summary.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b


@needs_fast
def test_generated_wat_equal(tmp_path, pure):
    """The benchmark's Common-Crawl-like generator: many links, relative URLs, many languages."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_extract
    finally:
        sys.path.pop(0)
    path = tmp_path / "gen.wat.gz"
    bench_extract.generate(path, 2_000_000, seed=3)
    _frames_equal(str(path), pure)
    assert len(extract_file(str(path), ExtractConfig()).pairs) > 1000


@needs_fast
def test_handwritten_wat_equal(tmp_path, pure):
    links = [{"path": "IMG@/src", "url": u, "alt": a} for u in _URLS if u for a in _ALTS if a]
    links += [{"path": "A@/href", "url": "x.html"}, {"path": "IMG@/src", "url": "y.jpg"}]
    docs = [wat_payload(p or "http://h.com/", links, base=b or None) for p, b in _BASES]
    path = tmp_path / "hand.wat.gz"
    path.write_bytes(make_wat(docs))
    _frames_equal(str(path), pure)


@needs_fast
@pytest.mark.parametrize("name", _corpus_files())
def test_corpus_file_equal(corpus, name, pure):
    """Every WAT/WARC/ARC file of the shared corpus (WARC pairs use the compiled hashes)."""
    _frames_equal(str(corpus / name), pure)


@needs_fast
@pytest.mark.parametrize(("quirk", "compression"), spec_files())
def test_spec_fixture_equal(tmp_path, quirk, compression, pure):
    """The archives written from the WARC/ARC specs (``<uri>`` fields, cut files, ARC...)."""
    spec = spec_file(quirk, compression)
    path = tmp_path / f"{quirk}.{'arc' if spec.is_arc else 'warc.wat'}"
    path.write_bytes(spec.data)
    _frames_equal(str(path), pure)
