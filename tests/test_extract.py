"""Extraction from WAT files: edge cases, readers, summaries, Dask equivalence."""

from __future__ import annotations

import gzip
import json
import logging
import re

import mmh3
import numpy as np
import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import ExtractConfig
from laion_dask.stages.extract import FileSummary, extract_file, extract_pairs, sniff_format
from laion_dask.stages.extract.common import BadRecord
from laion_dask.stages.extract.text import (
    clean_text,
    laion_hash,
    make_uid,
    pair_uids,
    record_hashes,
)
from laion_dask.stages.extract.wat import image_links, wat_links
from tests.helpers.extract import EDGE_WAT, EDGE_WAT_EXPECTED, make_wat, wat_payload


def _parse_wat(body: bytes, fallback_page_url: str, *, use_msgspec: bool):
    """(page URL, pair candidates) of one WAT record, as extraction reads it."""
    page, base, links, _ = wat_links(body, use_msgspec=use_msgspec)
    page = page or fallback_page_url
    return page, image_links(page, base, links)


CFG = ExtractConfig()


def _triples(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    return sorted(zip(df["url"], df["text"], df["page_url"], strict=True))


@pytest.fixture
def edge_wat(tmp_path):
    path = tmp_path / "edge.warc.wat.gz"
    path.write_bytes(make_wat(EDGE_WAT))
    return str(path)


# --- text ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  A&amp;B  ", "A&B"),
        ("line\none\t two\u00a0three", "line one two three"),
        ("cafÃ©", "café"),  # UTF-8 read as Latin-1
        ("bell\x07 and nul\x00", "bell and nul"),
        ("“quotes” stay curly", "“quotes” stay curly"),
        ("   ", ""),
        ("", ""),
    ],
)
def test_clean_text(raw, expected):
    assert clean_text(raw) == expected


def _clean_text_reference(text: str, max_chars: int = 2000) -> str:
    """clean_text before its fast paths: every step on every text."""
    import html
    import unicodedata

    import ftfy

    from laion_dask.stages.extract import text as mod

    if not text:
        return ""
    if "&" in text:
        text = html.unescape(text)
    if not text.isascii():
        if mod._MOJIBAKE_PAIR.search(text) or mod._C1.search(text):
            text = ftfy.fix_text(text, mod._FTFY)
        else:
            text = unicodedata.normalize("NFC", text)
    text = mod._CONTROLS.sub("", text)
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[:max_chars].rstrip()
    return text


def test_clean_text_fast_paths_match_the_full_clean_up():
    import random
    from types import SimpleNamespace

    from laion_dask.ground.config import ExtractConfig
    from laion_dask.stages.extract import _Collector

    rng = random.Random(7)
    alphabet = list("ab Z&;#1 ") + [
        "  ", "\t", "\n", "\x00", "\x07", "\x1c", "\x81", "\x85", "\xa0", "\u3000",
        "\u2028", "\ufeff", "\u200b", "é", "Ã", "©", "â€™", "e\u0301", "東", "&amp;",
        "&#160;", "&lt;", "\ud800",
    ]  # fmt: skip
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(4000)]
    texts += [" x", "x ", " ", "\x81", "&#0;", "a  b", "ab"]
    for t in texts:
        for n in (2000, 3):
            assert clean_text(t, n) == _clean_text_reference(t, n), (t, n)
    texts += ["Köln café", "東京 写真", "cafe\u0301", "caf\u00c3\u00a9", "ü\u0308", "Zürich x"]
    # the collector's inline path (printable, already-NFC text kept as it is): the same texts
    # as clean_text, in the same order
    for n in (3, 2000):
        col = _Collector("f", ExtractConfig(max_text_chars=n))
        links = [SimpleNamespace(path="IMG@/src", url="x.jpg", alt=t) for t in texts]
        col.add_wat(0, "http://a.b/", "", links)
        expected = [clean_text(t, n) for t in texts]
        assert col.texts == [t for t in expected if t]
        assert col.indices == [i for i, t in enumerate(expected) if t]


def test_clean_text_truncates():
    assert clean_text("word " * 100, max_chars=12) == "word word wo"


def test_hash_and_uid():
    assert laion_hash("http://x/a.jpg", "a cat") == mmh3.hash64("http://x/a.jpga cat")[0]
    uid = make_uid("f.wat.gz", 123, 4)
    assert re.fullmatch(r"[0-9a-f]{16}", uid)
    # record hash, then the link index mixed in with the splitmix64 finaliser
    x = mmh3.hash64("f.wat.gz\x00123", signed=False)[0]
    m = (1 << 64) - 1
    x = (x + 5 * 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    assert int(uid, 16) == x ^ (x >> 31)
    assert make_uid("f.wat.gz", 123, 5) != uid
    assert make_uid("f.wat.gz", 124, 4) != uid


def test_bulk_uids_equal_make_uid():
    offsets = [0, 17, 123, 2**40]
    index = np.array([0, 1, 4, 2**20], dtype=np.int64)
    got = pair_uids(record_hashes("s3://b/f.wat.gz", offsets), index)
    want = [make_uid("s3://b/f.wat.gz", o, int(i)) for o, i in zip(offsets, index, strict=True)]
    assert [format(int(v), "016x") for v in got] == want
    assert len(set(want)) == len(want)


# --- WAT edge cases -------------------------------------------------------------------------------
def test_wat_edge_cases(edge_wat):
    res = extract_file(edge_wat, CFG)
    df, s = res.pairs, res.summary
    assert _triples(df) == sorted(EDGE_WAT_EXPECTED)
    assert dict(df.dtypes.astype(str)) == schema.PAIRS_DTYPES
    assert list(df.columns) == list(schema.PAIRS_DTYPES)
    assert s.format == "wat" and s.reader == "fastwarc" and s.error is None
    assert s.records_read == 1 + len(EDGE_WAT)
    assert s.bad_records == {"bad_encoding": 1, "invalid_json": 1}
    assert s.records_with_links == 3
    assert s.pairs_found == len(df) == len(EDGE_WAT_EXPECTED)
    assert df["uid"].is_unique
    assert (df["source_file"] == edge_wat).all()
    for row in df.itertuples():
        assert row.hash == mmh3.hash64(row.url + row.text)[0]


def test_wat_record_offsets_are_gzip_member_offsets(tmp_path):
    recs = [
        wat_payload(
            f"http://p{i}.example/",
            [{"path": "IMG@/src", "url": f"/{i}.jpg", "alt": f"picture {i}"}],
        )
        for i in range(3)
    ]
    data = make_wat(recs)
    path = tmp_path / "o.wat.gz"
    path.write_bytes(data)
    members, pos = [], 0  # start offset of every gzip member
    while pos < len(data):
        members.append(pos)
        d = __import__("zlib").decompressobj(31)
        d.decompress(data[pos:])
        pos = len(data) - len(d.unused_data)
    df = extract_file(str(path), CFG).pairs.sort_values("page_url")
    assert df["record_offset"].tolist() == members[1:]  # member 0 is the warcinfo record
    assert df["uid"].tolist() == [make_uid(str(path), off, 0) for off in members[1:]]


@pytest.mark.parametrize(
    ("compression", "reader", "expected_reader"),
    [
        ("record", "auto", "fastwarc"),
        ("none", "auto", "fastwarc"),
        ("file", "auto", "fastwarc+gunzip"),
        ("record", "warcio", "warcio"),
        ("none", "warcio", "warcio"),
        ("file", "warcio", "warcio+gunzip"),
    ],
)
def test_wat_readers_and_compressions_agree(tmp_path, compression, reader, expected_reader):
    path = tmp_path / f"x-{compression}.wat"
    path.write_bytes(make_wat(EDGE_WAT, compression=compression))
    base = extract_file(str(path), CFG)
    res = extract_file(str(path), ExtractConfig(reader=reader))
    assert res.summary.reader == expected_reader
    assert _triples(res.pairs) == sorted(EDGE_WAT_EXPECTED)
    assert res.summary.bad_records == {"bad_encoding": 1, "invalid_json": 1}
    # offsets (and so uids) do not depend on the reader
    pd.testing.assert_frame_equal(res.pairs, base.pairs)
    if compression == "file":
        # decompressed offsets: distinct per record
        assert res.pairs.drop_duplicates("page_url")["record_offset"].is_unique


@pytest.mark.parametrize("index", range(len(EDGE_WAT)))
def test_wat_parse_paths_agree(index):
    """msgspec and stdlib json agree, whichever page URL the WAT record header gives."""
    rec = EDGE_WAT[index]
    if isinstance(rec, bytes):
        body, uri = rec, "http://e.example/"
    else:
        body = json.dumps(rec).encode()
        uri = rec["Envelope"]["WARC-Header-Metadata"]["WARC-Target-URI"]
    results = []
    # the page URL comes from the JSON envelope; the header's is only a fallback
    for fast, fallback in ((True, uri), (True, ""), (False, uri)):
        try:
            results.append(_parse_wat(body, fallback, use_msgspec=fast))
        except BadRecord as err:
            results.append(err.kind)
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize(
    "links",
    [
        [{"path": "IMG@/src", "url": "a{b}.jpg", "alt": "braces } in { strings"}],
        [{"alt": "{}", "path": "IMG@/src", "url": "x.jpg"}, {"path": "IMG@/src", "url": "y.jpg"}],
        [
            {
                "path": "A@/href",
                "url": "/",
                "text": '{"path":"IMG@/src","url":"fake.jpg","alt":"x"}',
            },
            {"path": "IMG@/longdesc", "url": "d.html", "alt": "long"},
            {"path": "IMG@/src", "url": "z.jpg", "alt": '\u00e9t\u00e9 "quoted"'},
        ],
    ],
)
def test_parsers_agree_on_tricky_json(links):
    doc = wat_payload("http://t.example/p/", links)
    body = json.dumps(doc).encode()
    fast = _parse_wat(body, "http://t.example/p/", use_msgspec=True)
    slow = _parse_wat(body, "http://t.example/p/", use_msgspec=False)
    assert fast == slow
    assert all(link.url.startswith("http://t.example/p/") for link in fast[1])


def test_wrong_shape_json_is_counted(tmp_path):
    bad = (
        b'{"Envelope": {"Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata":'
        b' {"Links": [{"path": "IMG@/src", "url": 5, "alt": "x"}]}}}}}'
    )
    path = tmp_path / "shape.wat"
    path.write_bytes(
        make_wat(
            [bad, wat_payload("http://ok/", [{"path": "IMG@/src", "url": "a.jpg", "alt": "ok"}])]
        )
    )
    res = extract_file(str(path), CFG)
    assert res.summary.bad_records == {"invalid_wat": 1}
    assert res.pairs["url"].tolist() == ["http://ok/a.jpg"]


def test_records_without_img_marker_are_not_parsed(tmp_path):
    # malformed JSON that cannot hold an image link is never parsed, so it is not counted:
    # this is the byte check that skips most WAT records
    path = tmp_path / "skip.wat"
    path.write_bytes(make_wat([b'{"Envelope": broken but no image marker'] + EDGE_WAT[:1]))
    s = extract_file(str(path), CFG).summary
    assert s.bad_records == {} and s.pairs_found == 3


def test_truncated_wat_is_counted(tmp_path):
    data = make_wat(EDGE_WAT[:2], compression="none")
    path = tmp_path / "cut.wat"
    path.write_bytes(data[:-200])  # cut inside the last record
    s = extract_file(str(path), CFG).summary
    assert s.bad_records == {"truncated_record": 1}
    assert s.pairs_found == 3  # the first record is intact


def test_truncated_gzip_member_is_counted(tmp_path):
    data = make_wat(EDGE_WAT[:2])
    path = tmp_path / "cut.wat.gz"
    path.write_bytes(data[:-30])
    res = extract_file(str(path), CFG)
    assert res.summary.records_skipped == 1
    assert set(res.summary.bad_records) <= {"truncated_record", "corrupt_gzip"}
    assert res.summary.pairs_found == 3


def test_large_wat_record_is_counted(tmp_path):
    path = tmp_path / "big.wat"
    path.write_bytes(make_wat(EDGE_WAT[:2]))
    s = extract_file(str(path), ExtractConfig(max_html_bytes=900)).summary
    assert s.bad_records == {"record_too_large": 1}  # the first record; the second is smaller
    assert s.pairs_found == 2


# --- unreadable files -----------------------------------------------------------------------------
def test_empty_file(tmp_path):
    for name, data in (("e.warc", b""), ("e.warc.gz", gzip.compress(b""))):
        path = tmp_path / name
        path.write_bytes(data)
        res = extract_file(str(path), CFG)
        assert res.pairs.empty and res.summary.bad_records == {"empty_file": 1}
        assert res.summary.error is None


def test_missing_file_raises_or_is_skipped(tmp_path, caplog):
    missing = str(tmp_path / "nope.wat.gz")
    with pytest.raises(FileNotFoundError, match="nope.wat.gz"):
        extract_file(missing, ExtractConfig(skip_unreadable_files=False))
    with caplog.at_level(logging.WARNING, logger="laion_dask.stages.extract"):
        res = extract_file(missing, ExtractConfig(skip_unreadable_files=True))
    assert "nope.wat.gz" in res.summary.error
    assert any("nope.wat.gz" in r.getMessage() for r in caplog.records)
    pd.testing.assert_frame_equal(res.pairs, schema.PAIRS)


def test_not_a_warc_file(tmp_path):
    path = tmp_path / "notes.txt.gz"
    path.write_bytes(gzip.compress(b"just some text\n"))
    with pytest.raises(OSError, match="notes.txt.gz.*not a WARC"):
        extract_file(str(path), ExtractConfig(skip_unreadable_files=False))
    res = extract_file(str(path), CFG)
    assert res.summary.error and res.pairs.empty


def test_sniff_format():
    assert sniff_format(b"WARC/1.0\r\n") == ("warc", False)
    assert sniff_format(gzip.compress(b"WARC/1.1\r\n")) == ("warc", True)
    assert sniff_format(b"filedesc://x.arc 0.0.0.0 20140216050221 text/plain 75\n")[0] == "arc"
    assert sniff_format(b"") == ("empty", False)
    assert sniff_format(b"\x1f\x8b\x08\x00garbage") == ("corrupt_gzip", True)


# --- summaries ------------------------------------------------------------------------------------
def test_summary_adds_and_round_trips():
    a = FileSummary("a", "wat", "fastwarc", 10, 2, 5, {"invalid_json": 1}, 100, 0.5)
    b = FileSummary(
        "b",
        "wat",
        "fastwarc",
        3,
        1,
        2,
        {"invalid_json": 2, "bad_encoding": 1},
        50,
        0.25,
        error="boom",
    )
    c = a + b
    assert (c.records_read, c.records_with_links, c.pairs_found, c.bytes_read) == (13, 3, 7, 150)
    assert c.bad_records == {"bad_encoding": 1, "invalid_json": 3}
    assert c.source_file == "*" and c.format == "wat" and c.error == "boom"
    assert FileSummary.from_dict(c.to_dict()) == c


# --- Dask -----------------------------------------------------------------------------------------
def test_from_map_equals_pandas(tmp_path, client):
    import dask.dataframe as dd

    paths = []
    for i in range(3):
        recs = [
            wat_payload(
                f"http://s{i}.example/p{j}",
                [{"path": "IMG@/src", "url": f"/{j}.jpg", "alt": f"photo {i} {j}"}],
            )
            for j in range(4)
        ]
        p = tmp_path / f"part-{i}.wat.gz"
        p.write_bytes(make_wat(recs))
        paths.append(str(p))
    paths.append(str(tmp_path / "missing.wat.gz"))  # skipped: an empty partition
    # from_map takes extra positional arguments through args= (bare ones must be iterables)
    ddf = dd.from_map(extract_pairs, paths, args=(CFG,), meta=schema.PAIRS)
    assert ddf.npartitions == 4
    got = ddf.compute(scheduler=client.get).reset_index(drop=True)
    expected = pd.concat([extract_pairs(p, CFG) for p in paths], ignore_index=True)
    pd.testing.assert_frame_equal(got, expected)
    assert len(got) == 12 and got["uid"].is_unique


# --- URL resolution and format selection ---------------------------------------------------
def test_resolver_matches_urljoin():
    import itertools

    from laion_dask.stages.extract.common import Resolver, resolve_url

    bases = [
        "http://a.b/c/d.html",
        "https://a.b",
        "http://a.b/c/?q=1#f",
        "http://a.b:8080/x/y/",
        "http://u@a.b/p",
        "https://a.b/c/../d/e",
        "ftp://x/y",
        "",
        "http://a.b/c;p/d",
        "http://[::1]/a/b",
        "HTTP://A.B/x",
        "http://é.example/ü/",
        # a non-ASCII path splits as an ASCII one does (only a non-ASCII host goes to urlsplit)
        "http://a.b/Köln/straße.html",
        "https://a.b/ü/x?q=é#ö",
        "http://a.b/東京/./x/",
        # bases the fast split in Resolver must leave to urlsplit, or split the same way
        "http://a[b]/c/",
        "http://a.b?q=/x/y",
        "http://a.b#/x/y",
        "http://a.b/x y/z",
        " http://a.b/c/",
        "http://a.b/c/\t",
        "http://a.b\\c/d/",
        "https://user:pw@a.b:443/p/q.html",
        "http://a.b/c/.d/e",
        "http:///x/y",
        "http://",
    ]
    urls = [
        "x.jpg",
        "/x.jpg",
        "//cdn/x.jpg",
        "../x.jpg",
        "./x.jpg",
        "?q",
        "#f",
        "",
        " /s p.jpg ",
        "http://z/x",
        "data:image/png,aa",
        "javascript:void(0)",
        "a:b",
        "dir/x.jpg?w=1#f",
        "/a/./b",
        "\\\\x",
        "x\ty",
        "é.jpg",
        ".hidden",
        "..",
        ".",
        "a/..",
        "//",
        "///x",
        "x.jpg\n",
        "http://[bad",
    ]
    for base, url in itertools.product(bases, urls):
        expected = resolve_url(base, url)
        assert Resolver(base)(url) == expected, (base, url)
        if base and url.strip() and "[bad" not in url and "a[b]" not in base:
            assert expected == __import__("urllib.parse").parse.urljoin(base, url.strip())


def test_format_option_selects_record_kinds(tmp_path, corpus):
    wat = corpus / "eugeneware-warc/CC-MAIN-20140820021334-00006-ip-10-180-136-8.ec2.internal.warc"
    assert extract_file(str(wat) + ".wat", ExtractConfig(format="warc")).summary.pairs_found == 0
    assert extract_file(str(wat) + ".wat", ExtractConfig(format="wat")).summary.pairs_found == 4
    assert extract_file(str(wat), ExtractConfig(format="wat")).summary.pairs_found == 0
    assert extract_file(str(wat), ExtractConfig(format="warc")).summary.pairs_found == 861


def test_lone_surrogates_do_not_break_the_frame(tmp_path):
    body = (
        b'{"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": "http://s.example/"},'
        b' "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {"Links":'
        b' [{"path": "IMG@/src", "url": "/a\\ud800.jpg", "alt": "half \\udc00 pair"}]}}}}}'
    )
    path = tmp_path / "sur.wat"
    path.write_bytes(make_wat([body]))
    df = extract_file(str(path), CFG).pairs
    assert len(df) == 1
    assert df["text"].iloc[0].encode("utf-8")  # valid UTF-8 after clean-up
    assert df["url"].iloc[0].encode("utf-8")
    df.to_parquet(tmp_path / "x.parquet")  # arrow accepts it


@pytest.mark.parametrize(
    ("cut", "compression", "limit"),
    [(0, "record", 2000), (-200, "none", 2000), (-30, "record", 2000), (0, "none", 900)],
)
def test_fused_fastwarc_pass_equals_the_plain_one_on_edge_cases(
    tmp_path, monkeypatch, cut, compression, limit
):
    """Truncated blocks, cut gzip members and oversized records leave the inline hot path for
    Record + _handle; the results are those of the plain pass."""
    import laion_dask.stages.extract as ex
    from laion_dask.stages.extract.records import PrefixedReader

    data = make_wat(EDGE_WAT, compression=compression)
    path = tmp_path / ("e.wat.gz" if compression == "record" else "e.wat")
    path.write_bytes(data[:cut] if cut else data)
    cfg = ExtractConfig(max_html_bytes=limit)
    fused = extract_file(str(path), cfg)
    monkeypatch.setitem(ex._PASSES, "fastwarc", ex._PASSES["fastwarc-plain"])
    plain = extract_file(str(path), cfg)
    pd.testing.assert_frame_equal(fused.pairs, plain.pairs)
    assert fused.summary.bad_records == plain.summary.bad_records
    assert fused.summary.records_read == plain.summary.records_read
    # the reader that hands back what the hot path already read
    r = PrefixedReader(b"abc", __import__("io").BytesIO(b"defg"))
    assert [r.read(2), r.read(2), r.read(-1), r.read(1)] == [b"ab", b"cd", b"efg", b""]


def test_compiled_base_split_equals_resolver(monkeypatch):
    """img_pairs splits a simple page URL in C instead of building a Resolver: same pairs."""
    from types import SimpleNamespace

    from laion_dask.stages.extract import _Collector, common

    if common.speedups is None:
        pytest.skip("C fast paths not built")
    pages = [
        "http://a.b/c/d.html",
        "https://a.b",
        "https://a.b?q=1",
        "http://a.b#f/g",
        "http://a.b:8080/x/y/",
        "http://a.b/Köln/straße.html",
        "https://a.b/ü/x?q=é/z#ö",
        "http://é.example/ü/",
        "http://a.b/c/./d/",
        "http://a.b/c/.d/e",
        "http://a.b/x y/z",
        "http://a[b]/c/",
        "http://a.b/c/\u200b/",
        "HTTP://A.B/x",
        "ftp://a.b/c/",
        "http://",
        "http:///x",
        "",
    ]
    urls = [
        "x.jpg",
        "/y.png",
        "//cdn.example/z.jpg",
        "../up.jpg",
        "?q",
        "http://abs/x.jpg",
        " s.jpg",
    ]
    links = [SimpleNamespace(path="IMG@/src", url=u, alt=f"alt {u}") for u in urls]

    def pairs() -> list:
        col = _Collector("f", ExtractConfig())
        for i, page in enumerate(pages):
            col.add_wat(i, page, "", links)
        return [col.urls, col.texts, col.indices, col.records]

    fast = pairs()
    monkeypatch.setattr(common, "speedups", None)
    assert fast == pairs()
    assert "http://a.b/Köln/x.jpg" in fast[0]
