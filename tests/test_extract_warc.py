"""Extraction from WARC/ARC HTML responses: hand-made edge cases and every corpus file."""

from __future__ import annotations

import gzip
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import ExtractConfig
from laion_dask.stages.extract import extract_file
from laion_dask.stages.extract.text import clean_text
from tests.helpers.extract import http_response, make_warc

CFG = ExtractConfig()


def _pairs(df: pd.DataFrame) -> list[tuple[str, str]]:
    return sorted(zip(df["url"], df["text"], strict=True))


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


PAGE = """<!doctype html><html><head>{head}<title>t</title></head><body>
<img src="/a.jpg" alt="{alt}">
<img src="b.png" alt="  second   image ">
<img src="" srcset="small.jpg 1x, big.jpg 2x" alt="from srcset">
<img src="noalt.jpg">
<img src="empty.jpg" alt="">
<a href="/page"><img src="//cdn.example/c.webp" alt="protocol relative"></a>
</body></html>"""


def _expected(base: str, alt: str) -> list[tuple[str, str]]:
    return sorted(
        [
            (urljoin(base, "/a.jpg"), alt),
            (urljoin(base, "b.png"), "second image"),
            (urljoin(base, "small.jpg"), "from srcset"),
            ("http://cdn.example/c.webp", "protocol relative"),
        ]
    )


@pytest.mark.parametrize(
    ("charset_header", "meta", "encoding", "alt"),
    [
        ("utf-8", "", "utf-8", "Grüße aus Köln"),
        (None, '<meta charset="windows-1252">', "cp1252", "café – crème"),
        (
            None,
            '<meta http-equiv="Content-Type" content="text/html; charset=Shift_JIS">',
            "shift_jis",
            "日本語の説明",
        ),
        ("euc-jp", "", "euc-jp", "東京タワー"),
        (None, "", "utf-8", "naïve undeclared UTF-8"),
        (None, "", "utf-8-sig", "with a BOM ✓"),
        ("iso-8859-1", "", "cp1252", "latin one ±"),
        (None, "", "gb18030", "中文图片说明文字"),
    ],
)
def test_charsets(tmp_path, charset_header, meta, encoding, alt):
    html = PAGE.format(head=meta, alt=alt).encode(encoding)
    ctype = "text/html" + (f"; charset={charset_header}" if charset_header else "")
    url = "http://site.example/dir/index.html"
    path = _write(
        tmp_path,
        "c.warc.gz",
        make_warc([{"url": url, "block": http_response(html, content_type=ctype)}]),
    )
    res = extract_file(path, CFG)
    assert _pairs(res.pairs) == _expected(url, alt)
    assert res.summary.format == "warc" and res.summary.bad_records == {}
    assert dict(res.pairs.dtypes.astype(str)) == schema.PAIRS_DTYPES


def test_base_href_and_encodings(tmp_path):
    page = PAGE.format(head='<base href="/static/v2/">', alt="based").encode()
    url = "http://site.example/dir/index.html"
    pages = [
        {"url": url, "block": http_response(page)},
        {"url": url + "?gz", "block": http_response(page, content_encoding="gzip")},
        {"url": url + "?deflate", "block": http_response(page, content_encoding="deflate")},
        {"url": url + "?chunked", "block": http_response(page, chunked=True)},
        {"url": url + "?both", "block": http_response(page, content_encoding="gzip", chunked=True)},
        # ClueWeb09 quirk: says gzip, stores plain
        {
            "url": url + "?lie",
            "block": http_response(page, content_encoding="gzip", encode_body=False),
        },
        {"url": url + "?res", "type": "resource", "block": page},
        {"url": url + "?img", "block": http_response(b"\xff\xd8\xff", content_type="image/jpeg")},
        {"url": url + "?noct", "block": http_response(page, content_type=None)},
    ]
    for version in ("WARC/1.0", "WARC/1.1", "WARC/0.18", "WARC/0.17"):
        path = _write(tmp_path, "b.warc", make_warc(pages, compression="none", version=version))
        res = extract_file(path, CFG)
        want = _expected("http://site.example/static/v2/", "based")
        assert res.summary.bad_records == {}, version
        assert res.summary.records_with_links == 8
        per_page = res.pairs.groupby("page_url")
        assert len(per_page) == 8  # every page but the image
        for page_url, group in per_page:
            assert _pairs(group) == want, (version, page_url)


def test_large_page_and_truncated_record(tmp_path):
    small = PAGE.format(head="", alt="kept").encode()
    big = PAGE.format(head="", alt="too big").encode() + b"<!-- " + b"x" * 60_000 + b" -->"
    big_gz = http_response(big, content_encoding="gzip")  # small on the wire, big decoded
    pages = [
        {"url": "http://a.example/", "block": http_response(small)},
        {"url": "http://b.example/", "block": http_response(big)},
        {"url": "http://c.example/", "block": big_gz},
        {
            "url": "http://d.example/",
            "block": http_response(b"\0" * 60_000, content_type="video/mp4"),
        },
    ]
    data = make_warc(pages, compression="none")
    cut = make_warc(
        pages[:1]
        + [{"url": "http://e.example/", "block": http_response(small), "content_length": 5_000}],
        compression="none",
    )
    cfg = ExtractConfig(max_html_bytes=20_000)
    res = extract_file(_write(tmp_path, "big.warc", data), cfg)
    assert res.summary.bad_records == {"html_too_large": 2}  # the video is not HTML: not counted
    assert set(res.pairs["page_url"]) == {"http://a.example/"}
    res = extract_file(_write(tmp_path, "cut.warc", cut), cfg)
    assert res.summary.bad_records == {"truncated_record": 1}
    # the cut record is counted, and keeps the pairs of the tags complete before the cut
    by_page = res.pairs.groupby("page_url")["url"].apply(
        lambda u: sorted(x.split("/", 3)[-1] for x in u)
    )
    assert by_page["http://e.example/"] == by_page["http://a.example/"]


def test_whole_file_gzip_warc(tmp_path):
    page = PAGE.format(head="", alt="one member").encode()
    pages = [{"url": f"http://p{i}.example/", "block": http_response(page)} for i in range(3)]
    per_record = extract_file(_write(tmp_path, "r.warc.gz", make_warc(pages)), CFG)
    whole = extract_file(_write(tmp_path, "w.warc.gz", make_warc(pages, compression="file")), CFG)
    assert whole.summary.reader == "fastwarc+gunzip"
    assert _pairs(whole.pairs) == _pairs(per_record.pairs)
    assert whole.pairs.drop_duplicates("page_url")["record_offset"].is_unique


# --- the real corpus --------------------------------------------------------------------------
ARCHIVE_SUFFIXES = (
    ".warc",
    ".warc.gz",
    ".wat",
    ".wat.gz",
    ".wet",
    ".wet.gz",
    ".arc",
    ".arc.gz",
    ".gz",
    ".bad",
)


def _corpus_files() -> list[str]:
    from tests.conftest import CORPUS

    if not CORPUS.is_dir():
        return []
    return sorted(
        str(p.relative_to(CORPUS))
        for p in CORPUS.rglob("*")
        if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES) and ".paths" not in p.name
    )


class _RefParser(HTMLParser):
    """The independent reference: stdlib html.parser, first <base href>, every <img>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.imgs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        d = dict(attrs)
        if tag == "base" and self.base is None and (d.get("href") or "").strip():
            self.base = d["href"]
        elif tag == "img":
            self.imgs.append(d)

    handle_startendtag = handle_starttag


# WHATWG label aliases (what browsers decode these labels as); Python's own gb2312 codec differs
_WHATWG = {"gb2312": "gbk", "iso8859-1": "cp1252", "ascii": "cp1252", "latin-1": "cp1252"}


def _ref_charset(body: bytes, ctype: str) -> str:
    import codecs
    import re

    if body.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    for cand in (
        re.search(r"charset=[\"']?([\w.:-]+)", ctype, re.I),
        re.search(rb"<meta[^>]+?charset\s*=\s*[\"']?\s*([\w.:-]+)", body[:4096], re.I),
    ):
        if cand:
            name = cand.group(1)
            name = name.decode() if isinstance(name, bytes) else name
            try:
                name = codecs.lookup(name).name
            except LookupError:
                continue
            return _WHATWG.get(name, name)
    return "utf-8"


def _reference_pairs(path: Path) -> tuple[list[tuple[str, str, str]], bool]:
    """(pairs, complete): warcio + html.parser; complete=False when warcio stopped early."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    found: list[tuple[str, str, bytes]] = []

    def read(fh) -> None:
        for rec in ArchiveIterator(fh, arc2warc=True):
            if rec.rec_type not in ("response", "resource"):
                continue
            headers = rec.http_headers if rec.http_headers is not None else rec.rec_headers
            ctype = headers.get_header("Content-Type") or ""
            uri = rec.rec_headers.get_header("WARC-Target-URI")
            body = rec.content_stream().read()
            if rec.raw_stream.limit:  # bytes warcio could not read: a truncated record, kept
                body = body[: body.rfind(b">") + 1]  # as far as its last complete tag
            if "html" in ctype.lower():
                found.append((uri, ctype, body))

    complete = True
    try:
        try:
            with open(path, "rb") as fh:
                read(fh)
        except ArchiveLoadFailed as err:
            if "non-chunked" not in str(err):
                raise
            found.clear()
            with gzip.open(path, "rb") as fh:
                read(fh)
    except (ArchiveLoadFailed, ValueError, OSError, EOFError):
        complete = False
    out = []
    for uri, ctype, body in found:
        p = _RefParser()
        p.feed(body.decode(_ref_charset(body, ctype), "replace"))
        p.close()
        base = urljoin(uri, p.base.strip()) if p.base else uri
        for d in p.imgs:
            alt = d.get("alt")
            src = (d.get("src") or "").strip()
            if not src:
                first = (d.get("srcset") or "").strip().split(",")[0].split()
                src = first[0] if first else ""
            if alt is None or not src or not clean_text(alt):
                continue
            out.append((urljoin(base, src), clean_text(alt), uri))
    return sorted(out), complete


@pytest.mark.parametrize("name", _corpus_files())
def test_corpus_file(corpus, name):
    path = corpus / name
    res = extract_file(str(path), CFG)
    s, df = res.summary, res.pairs
    # never crashes; the summary adds up
    assert dict(df.dtypes.astype(str)) == schema.PAIRS_DTYPES
    assert s.pairs_found == len(df)
    assert df["uid"].is_unique
    assert s.records_with_links <= s.records_read
    assert (s.error is None) == (s.records_read > 0 or s.bad_records == {"empty_file": 1})
    assert s.bytes_read <= path.stat().st_size
    if s.error is None and s.records_read:
        assert s.bytes_read > 0
    with pytest.raises(OSError, match=path.name) if s.error else _nullcontext():
        extract_file(str(path), ExtractConfig(skip_unreadable_files=False))
    if s.format in ("warc", "arc") and s.error is None and s.records_read:
        got = sorted(zip(df["url"], df["text"], df["page_url"], strict=True))
        ref, complete = _reference_pairs(path)
        if complete:
            assert got == ref
        else:  # warcio gave up part-way; FastWARC read on, so it finds at least as much
            assert set(ref) <= set(got)


@pytest.mark.parametrize("name", _corpus_files())
def test_fused_fastwarc_pass_equals_the_plain_one(corpus, name, monkeypatch):
    """The inline WAT hot path gives what Record + _handle give, on every corpus file."""
    import laion_dask.stages.extract as ex

    fused = extract_file(str(corpus / name), CFG)
    monkeypatch.setitem(ex._PASSES, "fastwarc", ex._PASSES["fastwarc-plain"])
    plain = extract_file(str(corpus / name), CFG)
    pd.testing.assert_frame_equal(fused.pairs, plain.pairs)
    a, b = fused.summary.to_dict(), plain.summary.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_corpus_known_counts(corpus):
    """Counts that corpus/SOURCES.md documents (made with an independent stdlib parse)."""
    expected = {
        "chatnoir-eu-chatnoir-resiliparse/warcfile.warc.gz": 32,
        "chatnoir-eu-chatnoir-resiliparse/clueweb-quirk.warc.gz": 556,
        "iipc-jwarc/cc.warc.gz": 6,
        "commoncrawl-whirlwind-python/whirlwind.warc.gz": 7,
        "commoncrawl-ia-web-commons/IAH-urls-wget.warc.gz": 46,
        "eugeneware-warc/CC-MAIN-20140820021334-00006-ip-10-180-136-8.ec2.internal.warc": 861,
        "eugeneware-warc/CC-MAIN-20140820021334-00006-ip-10-180-136-8.ec2.internal.warc.wat": 4,
    }
    for name, n in expected.items():
        assert extract_file(str(corpus / name), CFG).summary.pairs_found == n, name
    wat = extract_file(
        str(
            corpus / "eugeneware-warc/CC-MAIN-20140820021334-00006-ip-10-180-136-8"
            ".ec2.internal.warc.wat"
        ),
        CFG,
    ).pairs
    # 2014 key order, relative ./galleries/... resolved against the page URL
    assert wat["url"].str.startswith("http").all()
    assert wat["url"].str.contains("/galleries/").sum() >= 3
    clipped = extract_file(str(corpus / "chatnoir-eu-chatnoir-resiliparse/clipped.warc.gz"), CFG)
    assert clipped.summary.bad_records == {"truncated_record": 1}


def test_corpus_summaries_add_up(corpus):
    from functools import reduce

    results = [extract_file(str(corpus / name), CFG) for name in _corpus_files()]
    total = reduce(lambda a, b: a + b, (r.summary for r in results))
    assert total.pairs_found == sum(len(r.pairs) for r in results)
    assert total.records_read == sum(r.summary.records_read for r in results)
    assert total.records_skipped == sum(r.summary.records_skipped for r in results)
    assert total.error.count("cannot read") == sum(r.summary.error is not None for r in results)
    all_pairs = pd.concat([r.pairs for r in results], ignore_index=True)
    assert all_pairs["uid"].is_unique  # unique across files too
