"""Input expansion (files, globs, listings, crawl ids over a loopback HTTP server) and opening."""

from __future__ import annotations

import functools
import gzip
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from laion_dask.ground.config import ExtractConfig, InputConfig
from laion_dask.stages.extract import extract_file
from laion_dask.stages.sources import expand_inputs, is_crawl_id, open_input, read_listing
from tests.helpers.extract import EDGE_WAT, EDGE_WAT_EXPECTED, make_wat

CRAWL = "CC-MAIN-2024-22"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over a temp folder: (folder, base URL ending in /)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _serve_listing(root, fmt: str, lines: list[str]) -> None:
    folder = root / "crawl-data" / CRAWL
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{fmt}.paths.gz").write_bytes(gzip.compress("\n".join(lines).encode() + b"\n"))


def test_is_crawl_id():
    assert is_crawl_id("CC-MAIN-2024-22") and is_crawl_id("CC-NEWS-2024-05")
    assert not is_crawl_id("CC-MAIN-2024-22.wat") and not is_crawl_id("cc-main-2024-22")


def test_local_files_globs_and_dirs(tmp_path):
    for name in ("b.wat.gz", "a.wat.gz", "c.warc.gz"):
        (tmp_path / name).write_bytes(b"x")
    cfg = InputConfig()
    assert expand_inputs([str(tmp_path / "a.wat.gz")], cfg) == [str(tmp_path / "a.wat.gz")]
    assert expand_inputs([str(tmp_path / "*.wat.gz")], cfg) == [
        str(tmp_path / "a.wat.gz"),
        str(tmp_path / "b.wat.gz"),
    ]
    assert expand_inputs([str(tmp_path)], cfg) == sorted(str(p) for p in tmp_path.iterdir())
    # duplicates are dropped, first occurrence kept; cfg.paths is used when no paths are given
    both = expand_inputs([str(tmp_path / "b.wat.gz"), str(tmp_path / "*.wat.gz")], cfg)
    assert both == [str(tmp_path / "b.wat.gz"), str(tmp_path / "a.wat.gz")]
    assert expand_inputs([], InputConfig(paths=(str(tmp_path / "c.warc.gz"),))) == [
        str(tmp_path / "c.warc.gz")
    ]


def test_missing_inputs_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wat.gz"):
        expand_inputs([str(tmp_path / "nope.wat.gz")], InputConfig())
    with pytest.raises(FileNotFoundError, match=r"no files match .*\*\.warc"):
        expand_inputs([str(tmp_path / "*.warc")], InputConfig())
    with pytest.raises(ValueError, match="no inputs"):
        expand_inputs([], InputConfig())


def test_real_listing_file(corpus):
    listing = corpus / "commoncrawl-whirlwind-python" / f"{CRAWL}.warc.paths.gz"
    lines = read_listing(str(listing))
    # (this real listing names 300 part files, relative to the crawl base like every listing)
    assert len(lines) == 300 and all(line and " " not in line for line in lines)
    files = expand_inputs([str(listing)], InputConfig(crawl_base_url="s3://commoncrawl/"))
    assert files[0] == "s3://commoncrawl/" + lines[0]


def test_crawl_id_expansion_over_http(http_root, corpus):
    root, base = http_root
    listing = corpus / "commoncrawl-whirlwind-python" / f"{CRAWL}.warc.paths.gz"
    lines = gzip.decompress(listing.read_bytes()).decode().split()
    _serve_listing(root, "warc", lines)
    cfg = InputConfig(crawl_format="warc", crawl_base_url=base)
    files = expand_inputs([CRAWL], cfg)
    assert files == [base + line for line in lines]

    # limit keeps the first files; sample is seeded, keeps listing order, and is deterministic
    assert (
        expand_inputs([CRAWL], InputConfig(crawl_format="warc", crawl_base_url=base, limit=3))
        == files[:3]
    )
    s1 = expand_inputs(
        [CRAWL], InputConfig(crawl_format="warc", crawl_base_url=base, sample=0.1, seed=7)
    )
    s2 = expand_inputs(
        [CRAWL], InputConfig(crawl_format="warc", crawl_base_url=base, sample=0.1, seed=7)
    )
    s3 = expand_inputs(
        [CRAWL], InputConfig(crawl_format="warc", crawl_base_url=base, sample=0.1, seed=8)
    )
    assert s1 == s2 and s1 != s3 and len(s1) == 30
    assert s1 == [f for f in files if f in set(s1)]  # order preserved
    both = expand_inputs(
        [CRAWL], InputConfig(crawl_format="warc", crawl_base_url=base, sample=0.1, seed=7, limit=4)
    )
    assert both == s1[:4]

    # the WAT listing of this crawl is not served: a clear error naming it
    with pytest.raises(FileNotFoundError, match="wat.paths.gz"):
        expand_inputs([CRAWL], InputConfig(crawl_base_url=base))


def test_extract_over_http(http_root, tmp_path):
    root, base = http_root
    (root / "seg").mkdir()
    (root / "seg" / "x.warc.wat.gz").write_bytes(make_wat(EDGE_WAT))
    _serve_listing(root, "wat", ["seg/x.warc.wat.gz"])
    [url] = expand_inputs([CRAWL], InputConfig(crawl_base_url=base))
    assert url == base + "seg/x.warc.wat.gz"
    with open_input(url) as fh:
        assert fh.read(2) == b"\x1f\x8b"
    res = extract_file(url, ExtractConfig())
    got = zip(res.pairs["url"], res.pairs["text"], res.pairs["page_url"], strict=True)
    assert sorted(got) == sorted(EDGE_WAT_EXPECTED)
    assert res.summary.bytes_read == (root / "seg" / "x.warc.wat.gz").stat().st_size
    assert (res.pairs["source_file"] == url).all()
    # the same file read locally gives the same pairs apart from source_file and uid
    local = tmp_path / "x.warc.wat.gz"
    shutil.copy(root / "seg" / "x.warc.wat.gz", local)
    loc = extract_file(str(local), ExtractConfig()).pairs
    assert loc["record_offset"].tolist() == res.pairs["record_offset"].tolist()
    missing = base + "seg/missing.warc.wat.gz"
    with pytest.raises(FileNotFoundError, match="missing.warc.wat.gz"):
        extract_file(missing, ExtractConfig(skip_unreadable_files=False))
    assert "missing.warc.wat.gz" in extract_file(missing, ExtractConfig()).summary.error


def test_remote_glob_is_rejected_without_matches(http_root):
    _, base = http_root
    with pytest.raises(FileNotFoundError):
        expand_inputs([base + "nothing/*.wat.gz"], InputConfig())
