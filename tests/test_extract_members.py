"""The gzip member walk (zlib-ng, one record a member) against the FastWARC pass it stands in for.

``_member_walk`` reads Common Crawl's layout itself and hands every member it does not read to
FastWARC at that member, so whatever a file holds, the pairs, offsets and counters must be those
of the FastWARC pass alone (``_PASSES["fastwarc-zlib"]``). The compiled twins
(``inflate_members``, ``record_bounds``) must give what their Python twins give.
"""

from __future__ import annotations

import gzip
import io
import random
from pathlib import Path

import pandas as pd
import pytest
from zlib_ng import zlib_ng

import laion_dask.stages.extract as ex
from laion_dask.ground.config import ExtractConfig
from laion_dask.stages.extract import common, extract_file
from laion_dask.stages.extract.records import inflate_members, iter_gzip_members, record_bounds
from tests.helpers.extract import EDGE_WAT, make_wat, warc_record, wat_payload

FAST = common.speedups
needs_fast = pytest.mark.skipif(FAST is None, reason="C fast paths not built")


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _meta(i: int, n_links: int = 3) -> bytes:
    links = [
        {"path": "IMG@/src", "url": f"/img/{i}-{k}.jpg", "alt": f"photo {i} {k}"}
        for k in range(n_links)
    ]
    doc = wat_payload(f"http://site{i}.example/page", links)
    return warc_record(
        "metadata",
        __import__("json").dumps(doc).encode(),
        target_uri=f"http://site{i}.example/page",
        content_type="application/json",
    )


def _head(lines: list[bytes], block: bytes) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + block + b"\r\n\r\n"


_BLOCK = b'{"Envelope": {"Payload-Metadata": {}}} IMG@'
_PLAIN = [b"WARC/1.0", b"WARC-Type: metadata", b"Content-Type: application/json"]
_N = str(len(_BLOCK)).encode()  # the block's Content-Length

# members that are not one plain record, or not readable gzip: each must go to FastWARC
ODD_MEMBERS = {
    "two records": _gz(_meta(90) + _meta(91)),
    "corrupt deflate": (lambda m: m[:20] + bytes(b ^ 0x5A for b in m[20:40]) + m[40:])(
        _gz(_meta(92))
    ),
    "empty member": _gz(b""),
    "lower-case content-length": _gz(_head([*_PLAIN, b"content-length: " + _N], _BLOCK)),
    "folded header": _gz(
        _head(
            [*_PLAIN[:2], b"Content-Type: application/", b" json", b"Content-Length: " + _N], _BLOCK
        )
    ),
    "invalid UTF-8 in the header": _gz(
        _head([*_PLAIN, b"WARC-Target-URI: http://a/\xff", b"Content-Length: " + _N], _BLOCK)
    ),
    "LF line ends": _gz(_head([*_PLAIN, b"Content-Length: " + _N], _BLOCK).replace(b"\r\n", b"\n")),
    "capitalised type": _gz(
        _head([b"WARC/1.0", b"WARC-Type: Metadata", *_PLAIN[2:], b"Content-Length: " + _N], _BLOCK)
    ),
    "block longer than declared": _gz(
        _head([*_PLAIN, b"Content-Length: " + str(len(_BLOCK) - 3).encode()], _BLOCK)
    ),
    "zero-length block": _gz(_head([*_PLAIN, b"Content-Length: 0"], b"")),
    "WARC/0.18": _gz(_head([b"WARC/0.18", *_PLAIN[1:], b"Content-Length: " + _N], _BLOCK)),
    "response record": _gz(
        warc_record(
            "response",
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n"
            b'<html><img src="/a.jpg" alt="a response image"></html>',
            target_uri="http://resp.example/",
        )
    ),
    "revisit record": _gz(warc_record("revisit", b"", target_uri="http://rev.example/")),
    "record over max_html_bytes": _gz(_meta(93, n_links=80)),
    "not gzip": b"WARC/1.0\r\nplain bytes after the members\r\n",
}


def _file(odd: bytes | None, tail: bytes = b"") -> bytes:
    members = [_gz(warc_record("warcinfo", b"software: test\r\n"))]
    members += [_gz(_meta(i)) for i in range(3)]
    if odd is not None:
        members.append(odd)
    members += [_gz(_meta(i)) for i in range(3, 6)]
    return b"".join(members) + tail


def _result(path: Path, cfg: ExtractConfig) -> tuple[pd.DataFrame, dict]:
    res = extract_file(str(path), cfg)
    summary = res.summary.to_dict()
    summary.pop("seconds")
    return res.pairs, summary


def _assert_same_as_fastwarc(path: Path, cfg: ExtractConfig, monkeypatch) -> None:
    walked = _result(path, cfg)
    with monkeypatch.context() as m:
        m.setitem(ex._PASSES, "fastwarc", ex._PASSES["fastwarc-zlib"])
        plain = _result(path, cfg)
    pd.testing.assert_frame_equal(walked[0], plain[0])
    assert walked[1] == plain[1]


CFGS = [
    ExtractConfig(skip_unreadable_files=True, max_html_bytes=3000),
    ExtractConfig(skip_unreadable_files=True, max_html_bytes=3000, format="wat"),
    ExtractConfig(skip_unreadable_files=True, format="warc"),
]


@pytest.mark.parametrize("odd", sorted(ODD_MEMBERS))
@pytest.mark.parametrize("cfg", CFGS, ids=["auto", "wat", "warc"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_member_walk_equals_fastwarc_pass(tmp_path, monkeypatch, odd, cfg, compiled):
    if compiled and FAST is None:
        pytest.skip("C fast paths not built")
    if not compiled:
        monkeypatch.setattr(common, "speedups", None)
    path = tmp_path / "odd.warc.wat.gz"
    path.write_bytes(_file(ODD_MEMBERS[odd]))
    _assert_same_as_fastwarc(path, cfg, monkeypatch)


@pytest.mark.parametrize("cut", [-7, -30, -200])
def test_member_walk_equals_fastwarc_pass_on_a_cut_file(tmp_path, monkeypatch, cut):
    path = tmp_path / "cut.warc.wat.gz"
    path.write_bytes(_file(None)[:cut])
    _assert_same_as_fastwarc(path, CFGS[0], monkeypatch)


@pytest.mark.parametrize("tail", [b"\x00" * 64, b"junk", b"\x1f\x8b\x08"])
def test_member_walk_equals_fastwarc_pass_with_bytes_after_the_members(tmp_path, monkeypatch, tail):
    path = tmp_path / "tail.warc.wat.gz"
    path.write_bytes(_file(None, tail))
    _assert_same_as_fastwarc(path, CFGS[0], monkeypatch)


def test_member_walk_equals_fastwarc_pass_on_the_edge_wat(tmp_path, monkeypatch):
    path = tmp_path / "edge.wat.gz"
    path.write_bytes(make_wat(EDGE_WAT))
    _assert_same_as_fastwarc(path, ExtractConfig(), monkeypatch)


def test_corpus_files_read_as_fastwarc_reads_them(corpus, monkeypatch):
    """Every gzipped WARC/WAT/WET of the shared corpus, walked and not, gives the same result."""
    names = sorted(
        p
        for p in corpus.rglob("*.gz")
        if any(k in p.name for k in (".warc", ".wat", ".wet", ".arc"))
    )
    assert names
    for path in names:
        for cfg in CFGS[:2]:
            _assert_same_as_fastwarc(path, cfg, monkeypatch)


def test_common_crawl_layout_is_read_without_fastwarc(tmp_path, monkeypatch):
    """The point of the walk: a WAT gzipped record by record never reaches FastWARC."""
    path = tmp_path / "cc.warc.wat.gz"
    path.write_bytes(_file(None))

    def refuse(*args):
        raise AssertionError("FastWARC read a plain Common Crawl WAT")

    expected = _result(path, ExtractConfig())
    monkeypatch.setattr(ex, "_fastwarc_pass", refuse)
    got = _result(path, ExtractConfig())
    assert len(got[0]) == 18 and got[1]["records_read"] == 7
    pd.testing.assert_frame_equal(got[0], expected[0])


# --- the compiled twins ----------------------------------------------------------------------
def _members_buffer(rng: random.Random) -> bytes:
    parts = []
    for i in range(40):
        size = rng.choice([0, 10, 500, 40_000, 100_000])
        parts.append(_gz(rng.randbytes(size // 2) + b"x" * (size - size // 2) + bytes([i])))
    return b"".join(parts)


@needs_fast
@pytest.mark.parametrize("seed", range(4))
def test_inflate_members_equals_python_twin(seed):
    rng = random.Random(seed)
    buf = _members_buffer(rng)
    args = (zlib_ng.decompressobj, zlib_ng.error)
    cases = [
        (buf, 0, True, 1 << 20),  # everything
        (buf, 0, True, 50_000),  # a member over cap
        (buf[: len(buf) // 2], 0, False, 1 << 20),  # needs more
        (buf[: len(buf) // 2], 0, True, 1 << 20),  # cut
        (buf + b"junk", 0, True, 1 << 20),  # not gzip at the end
        (buf[:5] + b"\xff" * 50 + buf[55:], 0, True, 1 << 20),  # corrupt first member
        (b"", 0, False, 10),
        (b"\x1f", 0, False, 10),
        (b"\x1f", 0, True, 10),
    ]
    first_end = FAST.inflate_members(buf, 0, True, *args, 1 << 20)[0][1][0]
    cases.append((buf, first_end, True, 1 << 20))  # from the second member on
    for data, pos, final, cap in cases:
        assert FAST.inflate_members(data, pos, final, *args, cap) == inflate_members(
            data, pos, final, *args, cap
        )


@needs_fast
def test_record_bounds_equals_python_twin():
    records = [
        _meta(1),
        warc_record("warcinfo", b"x"),
        _head([*_PLAIN, b"Content-Length: " + _N], _BLOCK),
    ]
    records += [
        gzip.decompress(m)
        for m in ODD_MEMBERS.values()
        if m[:2] == b"\x1f\x8b" and m != ODD_MEMBERS["corrupt deflate"]
    ]
    records += [
        _head([*_PLAIN, b"Content-Length:" + _N], _BLOCK),
        _head([*_PLAIN, b"Content-Length: " + _N + b" "], _BLOCK),
        _head([*_PLAIN, b"Content-Length: " + _N, b"CONTENT-LENGTH: " + _N], _BLOCK),
        _head([*_PLAIN, b"Content-Length: " + _N, b"warc-type: metadata"], _BLOCK),
        _head([b"WARC/1.1", *_PLAIN[1:], b"Content-Length: " + _N], _BLOCK),
        _head([b"WARC/1.0", b"Content-Length: " + _N], _BLOCK),
        _head([b"WARC/1.0"], b""),
        _head([*_PLAIN, b"X-Tab: a\tb", b"Content-Length: " + _N], _BLOCK),
        _head([*_PLAIN, b"WARC-Target-URI: http://a/\xc3\xa9", b"Content-Length: " + _N], _BLOCK),
        _head([*_PLAIN, b": no name", b"Content-Length: " + _N], _BLOCK),
        _head([*_PLAIN, b"Content-Length: 00000000000" + _N], _BLOCK),
        _head([*_PLAIN, b"Content-Length: 0" + _N], _BLOCK),
        _head([*_PLAIN, b"Content-Length: " + _N], _BLOCK)[:-1],
        _head([*_PLAIN, b"Content-Length: " + _N], _BLOCK) + b"\r\n",
        b"WARC/1.0\r\n",
        b"",
    ]
    for data in records:
        assert FAST.record_bounds(data) == record_bounds(data), data[:200]
    assert record_bounds(_meta(1))[0] == b"metadata"


def test_iter_gzip_members_offsets_are_stream_offsets():
    members = [_gz(f"member {i}".encode() * (i * 5000 + 1)) for i in range(30)]
    stream = io.BytesIO(b"".join(members))
    got = list(iter_gzip_members(stream, 1 << 20))
    offsets = [sum(map(len, members[:i])) for i in range(len(members))]
    assert [o for o, _ in got] == offsets
    assert [d for _, d in got] == [gzip.decompress(m) for m in members]
