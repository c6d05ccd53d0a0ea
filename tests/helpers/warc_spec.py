"""Small archives written from the WARC 1.0 / 1.1 specs and the ARC format, one quirk each.

Every quirk met in real files from other writers (``../shared/corpus``) has a fixture here,
generated in the tests, so the suite checks it without third-party bytes:

- ``angle_uris``: WARC 1.0's grammar (``uri = "<" <'URI'> ">"``) as wget writes it: every
  URI-valued field in angle brackets, ``WARC-Target-URI`` included;
- ``warc11``: WARC 1.1: bare ``WARC-Target-URI``, record ids still ``<urn:uuid:...>``;
- ``lower_names`` / ``upper_names``: field names are case-insensitive (WARC 1.1 section 4);
- ``lf_only``: header lines ending in LF alone (warcio's torture files, hand-edited archives);
- ``no_content_type``: a ``resource`` record and an HTTP response without any Content-Type;
- ``truncated``: the file ends inside the page (a crawl cut off): the tags before the cut count;
- ``body_cut``: a gzip Content-Encoded HTTP body shorter than it should be (the record whole);
- ``chunked_gzip`` / ``brotli``: HTTP transfer and content encodings;
- ``arc_v1`` / ``arc_v2``: ARC files, a record not followed by its newline (Heritrix) and a URL
  holding a space;
- ``wat_angle``: a WAT metadata record of a WARC 1.0 file, ``<uri>`` in its JSON too.

Each fixture comes in every container form: uncompressed, gzip per record, whole-file gzip.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from dataclasses import dataclass, field

import brotli  # FastWARC depends on it, so it is installed with the package

__all__ = ["PAGE_URL", "SpecFile", "spec_files", "QUIRKS", "COMPRESSIONS", "EXPECTED"]

PAGE_URL = "http://spec.example/dir/page.html"
# the page every fixture holds: 4 pairs, and 3 <img> that give none
PAGE = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>spec</title></head><body>
<p><img src="a.jpg" alt="relative image"></p>
<p><img src="/b.png" alt="root relative"></p>
<p><img src="../c.webp" alt="dot   segments"></p>
<p><img src="https://cdn.example/d.jpg" alt="absolute &amp; entity"></p>
<p><img src="e.jpg"></p>
<p><img src="f.jpg" alt="  "></p>
<p><img alt="no source"></p>
</body></html>
"""
#: the pairs of :data:`PAGE` at :data:`PAGE_URL`: (url, text)
EXPECTED = [
    ("http://spec.example/dir/a.jpg", "relative image"),
    ("http://spec.example/b.png", "root relative"),
    ("http://spec.example/c.webp", "dot segments"),
    ("https://cdn.example/d.jpg", "absolute & entity"),
]
# where a cut-off copy of PAGE stops: inside the third <img>'s alt, so 2 pairs are complete
CUT_AT = PAGE.index(b"dot ") + 2
# where each pair's <img> tag ends in PAGE
_TAG_ENDS = [PAGE.index(b">", PAGE.index(text.split()[0].encode())) for _, text in EXPECTED]


def _complete(n: int) -> list[tuple[str, str]]:
    """The pairs whose <img> tag is whole in the first ``n`` bytes of PAGE."""
    return [pair for pair, end in zip(EXPECTED, _TAG_ENDS, strict=True) if end < n]


COMPRESSIONS = ("none", "record", "file")


@dataclass
class SpecFile:
    """One fixture: its bytes, what it must give, and which counters it must raise."""

    name: str
    data: bytes
    pairs: list[tuple[str, str]]
    bad_records: dict[str, int] = field(default_factory=dict)
    is_arc: bool = False


def _http(body: bytes, headers: list[str] | None = None, eol: str = "\r\n") -> bytes:
    lines = ["HTTP/1.1 200 OK", *(headers if headers is not None else ["Content-Type: text/html"])]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in lines):
        lines.append(f"Content-Length: {len(body)}")
    return (eol.join(lines) + eol + eol).encode("latin-1") + body


def _warc(
    fields: list[tuple[str, str]],
    block: bytes,
    *,
    version: str = "WARC/1.0",
    eol: str = "\r\n",
    declared: int | None = None,
) -> bytes:
    length = len(block) if declared is None else declared
    lines = [version, *(f"{k}: {v}" for k, v in fields), f"Content-Length: {length}"]
    return (eol.join(lines) + eol + eol).encode("utf-8") + block + (eol + eol).encode()


def _rid(n: int, brackets: bool = True) -> str:
    uid = f"urn:uuid:00000000-0000-4000-8000-{n:012d}"
    return f"<{uid}>" if brackets else uid


def _warcinfo(version: str = "WARC/1.0", eol: str = "\r\n") -> bytes:
    block = b"software: laion-dask spec fixture\r\nformat: WARC File Format 1.0\r\n"
    return _warc(
        [
            ("WARC-Type", "warcinfo"),
            ("WARC-Date", "2024-05-18T01:58:10Z"),
            ("WARC-Record-ID", _rid(1)),
            ("Content-Type", "application/warc-fields"),
        ],
        block,
        version=version,
        eol=eol,
    )


def _response(
    uri: str,
    block: bytes,
    *,
    n: int = 2,
    version: str = "WARC/1.0",
    eol: str = "\r\n",
    names: str = "spec",
    content_type: str | None = "application/http; msgtype=response",
    warc_type: str = "response",
    declared: int | None = None,
) -> bytes:
    fields = [
        ("WARC-Type", warc_type),
        ("WARC-Date", "2024-05-18T01:58:11Z"),
        ("WARC-Record-ID", _rid(n)),
        ("WARC-Warcinfo-ID", _rid(1)),
        ("WARC-Concurrent-To", _rid(n + 100)),
        ("WARC-Target-URI", uri),
    ]
    if content_type is not None:
        fields.append(("Content-Type", content_type))
    if names == "lower":
        fields = [(k.lower(), v) for k, v in fields]
    elif names == "upper":
        fields = [(k.upper(), v) for k, v in fields]
    out = _warc(fields, block, version=version, eol=eol, declared=declared)
    if names != "spec":  # the Content-Length line too
        name = "content-length" if names == "lower" else "CONTENT-LENGTH"
        out = out.replace(b"Content-Length:", name.encode() + b":", 1)
    return out


def _revisit(uri: str) -> bytes:
    """A WARC 1.0 revisit: every URI field bracketed (it has no payload: no pairs)."""
    return _warc(
        [
            ("WARC-Type", "revisit"),
            ("WARC-Date", "2024-05-19T01:58:11Z"),
            ("WARC-Record-ID", _rid(9)),
            ("WARC-Target-URI", uri),
            ("WARC-Refers-To", _rid(2)),
            ("WARC-Refers-To-Target-URI", uri),
            ("WARC-Profile", "<http://netpreserve.org/warc/1.0/revisit/identical-payload-digest>"),
            ("Content-Type", "application/http; msgtype=response"),
        ],
        _http(b"", ["Content-Type: text/html"]),
    )


def _pack(records: list[bytes], compression: str) -> bytes:
    if compression == "none":
        return b"".join(records)
    if compression == "record":
        return b"".join(gzip.compress(r, mtime=0) for r in records)
    if compression == "file":
        return gzip.compress(b"".join(records), mtime=0)
    raise ValueError(compression)


def _cut(data: bytes, compression: str, keep: int) -> tuple[bytes, int]:
    """``data`` cut where its decompressed stream first holds ``keep`` bytes, and how many
    decompressed bytes the cut file holds (a streaming decompressor gives a few more)."""
    if compression == "none":
        return data[:keep], keep
    out, pos = 0, 0
    d = zlib.decompressobj(31)
    while out < keep and pos < len(data):
        out += len(d.decompress(data[pos : pos + 1]))
        pos += 1
        if d.eof:  # the next gzip member
            rest, d = d.unused_data, zlib.decompressobj(31)
            out += len(d.decompress(rest))
    return data[:pos], out


def _chunked(body: bytes, size: int = 50) -> bytes:
    buf = io.BytesIO()
    for i in range(0, len(body), size):
        part = body[i : i + size]
        buf.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    buf.write(b"0\r\n\r\n")
    return buf.getvalue()


def _arc(version: int, compression: str) -> bytes:
    """An ARC file: filedesc, a dns: record, the page (no newline after it), one more page."""
    desc_body = (
        f"{version} 0 LaionDaskSpec\n"
        + (
            "URL IP-address Archive-date Content-type Archive-length\n"
            if version == 1
            else "URL IP-address Archive-date Content-type Result-code Checksum Location "
            "Offset Filename Archive-length\n"
        )
    ).encode()

    def header(url: str, mime: str, length: int) -> bytes:
        if version == 1:
            return f"{url} 192.0.2.1 20240518015810 {mime} {length}\n".encode()
        return f"{url} 192.0.2.1 20240518015810 {mime} 200 - - 0 spec.arc {length}\n".encode()

    page = _http(PAGE)
    other = _http(PAGE.replace(b"relative image", b"space in url"))
    dns = b"20240518015810\nspec.example.\t600\tIN\tA\t192.0.2.1\n"
    records = [
        header("filedesc://spec.arc", "text/plain", len(desc_body)) + desc_body + b"\n",
        header("dns:spec.example", "text/dns", len(dns)) + dns + b"\n",
        header(PAGE_URL, "text/html", len(page)) + page,  # no newline after it (Heritrix)
        header("http://spec.example/dir/with space.html", "text/html", len(other)) + other + b"\n",
    ]
    return _pack(records, compression)


def _wat(compression: str) -> bytes:
    links = [
        {"path": "A@/href", "url": "/elsewhere", "text": "a link"},
        {"path": "IMG@/src", "url": "a.jpg", "alt": "relative image"},
        {"path": "IMG@/src", "url": "/b.png", "alt": "root relative"},
        {"path": "IMG@/src", "url": "../c.webp", "alt": "dot   segments"},
        {"path": "IMG@/src", "url": "https://cdn.example/d.jpg", "alt": "absolute &amp; entity"},
        {"path": "IMG@/src", "url": "e.jpg"},
        {"path": "IMG@/src", "url": "f.jpg", "alt": "  "},
    ]
    doc = {
        "Envelope": {
            "Format": "WARC",
            "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": f"<{PAGE_URL}>"},
            "Payload-Metadata": {
                "HTTP-Response-Metadata": {"HTML-Metadata": {"Head": {}, "Links": links}}
            },
        }
    }
    meta = _warc(
        [
            ("WARC-Type", "metadata"),
            ("WARC-Date", "2024-05-18T01:58:12Z"),
            ("WARC-Record-ID", _rid(3)),
            ("WARC-Refers-To", _rid(2)),
            ("WARC-Target-URI", f"<{PAGE_URL}>"),
            ("Content-Type", "application/json"),
        ],
        json.dumps(doc).encode(),
    )
    return _pack([_warcinfo(), meta], compression)


def _second_page(url: str = "http://spec.example/other/") -> bytes:
    return _response(url, _http(PAGE.replace(b"relative image", b"second page")), n=5)


def _second_pairs(url: str = "http://spec.example/other/") -> list[tuple[str, str]]:
    return [
        (url + "a.jpg", "second page"),
        ("http://spec.example/b.png", "root relative"),
        ("http://spec.example/c.webp", "dot segments"),
        ("https://cdn.example/d.jpg", "absolute & entity"),
    ]


def _quirk(name: str, compression: str) -> SpecFile:
    page = _http(PAGE)
    if name == "angle_uris":
        recs = [_warcinfo(), _response(f"<{PAGE_URL}>", page), _revisit(f"<{PAGE_URL}>")]
        return SpecFile(name, _pack(recs, compression), EXPECTED)
    if name == "warc11":
        recs = [_warcinfo("WARC/1.1"), _response(PAGE_URL, page, version="WARC/1.1")]
        return SpecFile(name, _pack(recs, compression), EXPECTED)
    if name in ("lower_names", "upper_names"):
        odd = _response(PAGE_URL, page, names=name.split("_")[0])
        recs = [_warcinfo(), _second_page(), odd]
        return SpecFile(name, _pack(recs, compression), _second_pairs() + EXPECTED)
    if name == "lf_only":
        recs = [_warcinfo(eol="\n"), _response(PAGE_URL, _http(PAGE, eol="\n"), eol="\n")]
        return SpecFile(name, _pack(recs, compression), EXPECTED)
    if name == "no_content_type":
        bare = _response(PAGE_URL, PAGE, warc_type="resource", content_type=None)
        no_http_type = _response(
            "http://spec.example/other/", _http(PAGE.replace(b"relative image", b"second page"), [])
        )
        recs = [_warcinfo(), bare, no_http_type]
        return SpecFile(name, _pack(recs, compression), EXPECTED + _second_pairs())
    if name == "truncated":
        head = [_warcinfo(), _second_page()]
        last = _response(PAGE_URL, page, n=6)
        data = _pack([*head, last], compression)
        keep = sum(map(len, head)) + last.index(b"\r\n\r\nHTTP/") + 4 + page.index(PAGE) + CUT_AT
        cut, held = _cut(data, compression, keep)
        return SpecFile(
            name,
            cut,
            _second_pairs() + _complete(CUT_AT + held - keep),
            {"truncated_record": 1},
        )
    if name == "body_cut":
        encoded = gzip.compress(PAGE, mtime=0)
        # the gzip body cut where its decoded bytes first reach into the third <img>
        keep = next(
            k
            for k in range(1, len(encoded))
            if len(zlib.decompressobj(31).decompress(encoded[:k])) >= CUT_AT
        )
        decoded = zlib.decompressobj(31).decompress(encoded[:keep])
        block = _http(
            encoded[:keep],
            [
                "Content-Type: text/html",
                "Content-Encoding: gzip",
                f"Content-Length: {len(encoded)}",
            ],
        )
        recs = [_warcinfo(), _response(PAGE_URL, block)]
        return SpecFile(
            name, _pack(recs, compression), _complete(len(decoded)), {"truncated_record": 1}
        )
    if name == "chunked_gzip":
        block = _http(
            _chunked(gzip.compress(PAGE, mtime=0)),
            [
                "Content-Type: text/html; charset=utf-8",
                "Content-Encoding: gzip",
                "Transfer-Encoding: chunked",
            ],
        )
        recs = [_warcinfo(), _response(f"<{PAGE_URL}>", block)]
        return SpecFile(name, _pack(recs, compression), EXPECTED)
    if name == "brotli":
        block = _http(brotli.compress(PAGE), ["Content-Type: text/html", "Content-Encoding: br"])
        recs = [_warcinfo(), _response(PAGE_URL, block)]
        return SpecFile(name, _pack(recs, compression), EXPECTED)
    if name in ("arc_v1", "arc_v2"):
        space_dir = "http://spec.example/dir/"  # the page "with space.html" is in it
        pairs = [*EXPECTED, (space_dir + "a.jpg", "space in url"), *EXPECTED[1:]]
        return SpecFile(name, _arc(int(name[-1]), compression), pairs, is_arc=True)
    if name == "wat_angle":
        return SpecFile(name, _wat(compression), EXPECTED)
    raise ValueError(name)


QUIRKS = (
    "angle_uris",
    "warc11",
    "lower_names",
    "upper_names",
    "lf_only",
    "no_content_type",
    "truncated",
    "body_cut",
    "chunked_gzip",
    "brotli",
    "arc_v1",
    "arc_v2",
    "wat_angle",
)


def spec_files() -> list[tuple[str, str]]:
    """(quirk, compression) of every fixture, for ``pytest.mark.parametrize``."""
    return [(q, c) for q in QUIRKS for c in COMPRESSIONS]


def spec_file(quirk: str, compression: str) -> SpecFile:
    """The fixture of one quirk in one container form."""
    return _quirk(quirk, compression)
