"""Builders for the extraction tests: tiny WAT and WARC files written by hand.

``make_wat`` writes WARC ``metadata`` records whose JSON payload has the Common Crawl WAT shape
(Envelope -> Payload-Metadata -> HTTP-Response-Metadata -> HTML-Metadata -> Links), one gzip member
per record as Common Crawl does. ``make_warc`` writes HTML ``response``/``resource`` records.
"""

from __future__ import annotations

import gzip
import io
import json
import uuid
import zlib
from typing import Any

__all__ = [
    "warc_record",
    "make_wat",
    "wat_payload",
    "make_warc",
    "http_response",
    "EDGE_WAT",
    "EDGE_WAT_EXPECTED",
]


def warc_record(
    warc_type: str,
    block: bytes,
    *,
    target_uri: str | None = None,
    content_type: str = "application/octet-stream",
    version: str = "WARC/1.0",
    content_length: int | None = None,
) -> bytes:
    """One uncompressed WARC record (header block, payload, two CRLFs)."""
    rid = uuid.UUID(int=zlib.crc32(block) + len(block))
    headers = [
        version,
        f"WARC-Type: {warc_type}",
        "WARC-Date: 2024-05-18T01:58:10Z",
        f"WARC-Record-ID: <urn:uuid:{rid}>",
    ]
    if target_uri is not None:
        headers.append(f"WARC-Target-URI: {target_uri}")
    headers.append(f"Content-Type: {content_type}")
    headers.append(f"Content-Length: {len(block) if content_length is None else content_length}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("utf-8") + block + b"\r\n\r\n"


def _compress(records: list[bytes], compression: str) -> bytes:
    if compression == "none":
        return b"".join(records)
    if compression == "record":  # Common Crawl: one gzip member per record
        return b"".join(gzip.compress(r, mtime=0) for r in records)
    if compression == "file":  # one member for the whole file (warcio refuses these)
        return gzip.compress(b"".join(records), mtime=0)
    raise ValueError(compression)


def wat_payload(
    url: str,
    links: list[dict[str, Any]] | None = None,
    *,
    base: str | None = None,
    envelope_type: str = "response",
    metas: list[Any] | None = None,
) -> dict[str, Any]:
    """The JSON document of one WAT metadata record (response envelope with Links)."""
    html: dict[str, Any] = {"Head": {"Title": "t", "Metas": metas or []}}
    if base is not None:
        html["Head"]["Base"] = base
    if links is not None:
        html["Links"] = links
    return {
        "Container": {"Filename": "x.warc.gz", "Compressed": True, "Offset": "0"},
        "Envelope": {
            "Format": "WARC",
            "WARC-Header-Length": "400",
            "WARC-Header-Metadata": {"WARC-Type": envelope_type, "WARC-Target-URI": url},
            "Payload-Metadata": {
                "Actual-Content-Type": "application/http; msgtype=response",
                "HTTP-Response-Metadata": {
                    "Response-Message": {"Status": "200", "Version": "HTTP/1.1"},
                    "Headers": {"Content-Type": "text/html"},
                    "HTML-Metadata": html,
                },
            },
        },
    }


def make_wat(records: list[dict[str, Any] | bytes], compression: str = "record") -> bytes:
    """A WAT file: a warcinfo record, then one metadata record per entry.

    Each entry is a JSON document (``wat_payload(...)``) or raw bytes used as the payload as-is
    (malformed JSON, bad encodings). The record's WARC-Target-URI is taken from the document.
    """
    out = [warc_record("warcinfo", b"software: test\r\n", content_type="application/warc-fields")]
    for rec in records:
        if isinstance(rec, bytes):
            body, uri = rec, "http://example.com/raw"
        else:
            body = json.dumps(rec, ensure_ascii=False).encode("utf-8")
            uri = rec["Envelope"]["WARC-Header-Metadata"].get("WARC-Target-URI")
        out.append(warc_record("metadata", body, target_uri=uri, content_type="application/json"))
    return _compress(out, compression)


def http_response(
    html: bytes,
    *,
    content_type: str | None = "text/html",
    content_encoding: str | None = None,
    chunked: bool = False,
    encode_body: bool = True,
) -> bytes:
    """An HTTP/1.1 response block; ``encode_body=False`` keeps the header but stores plain bytes."""
    body = html
    headers = ["HTTP/1.1 200 OK", "Server: test"]
    if content_type is not None:
        headers.append(f"Content-Type: {content_type}")
    if content_encoding is not None:
        headers.append(f"Content-Encoding: {content_encoding}")
        if encode_body and content_encoding == "gzip":
            body = gzip.compress(body, mtime=0)
        elif encode_body and content_encoding == "deflate":
            body = zlib.compress(body)
    if chunked:
        headers.append("Transfer-Encoding: chunked")
        buf = io.BytesIO()
        for i in range(0, len(body), 7):
            part = body[i : i + 7]
            buf.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        buf.write(b"0\r\n\r\n")
        body = buf.getvalue()
    else:
        headers.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body


def make_warc(
    pages: list[dict[str, Any]], compression: str = "record", version: str = "WARC/1.0"
) -> bytes:
    """A WARC file of HTML pages.

    Each page: ``url``, ``block`` (bytes: an HTTP message from ``http_response`` for ``response``
    records, the document for ``resource``), optional ``type`` (default ``response``),
    ``content_type`` (the WARC header) and ``content_length`` (a lying length).
    """
    out = [warc_record("warcinfo", b"software: test\r\n", content_type="application/warc-fields")]
    for p in pages:
        rtype = p.get("type", "response")
        ctype = p.get(
            "content_type",
            "application/http; msgtype=response" if rtype == "response" else "text/html",
        )
        out.append(
            warc_record(
                rtype,
                p["block"],
                target_uri=p["url"],
                content_type=ctype,
                version=version,
                content_length=p.get("content_length"),
            )
        )
    return _compress(out, compression)


def _img(url: str, alt: str | None, order: str = "new") -> dict[str, Any]:
    if order == "2014":  # alt first, as in CC-MAIN-2014-35
        d: dict[str, Any] = {} if alt is None else {"alt": alt}
        d.update({"path": "IMG@/src", "url": url})
        return d
    d = {"path": "IMG@/src", "url": url}
    if alt is not None:
        d["alt"] = alt
    return d


#: the WAT edge cases: (records, expected pairs as (url, text, page_url))
EDGE_WAT: list[dict[str, Any] | bytes] = [
    wat_payload(
        "http://a.example/page.html",
        [
            {"path": "A@/href", "url": "http://a.example/other", "text": "a link"},
            _img("/img/cat.jpg", "A cat &amp; a hat"),
            _img("http://cdn.example/dog.jpg", "  a   dog\n on grass "),
            _img("http://cdn.example/empty.jpg", "   "),
            _img("http://cdn.example/noalt.jpg", None),
            _img("data:image/png;base64,iVBORw0KGgo=", "inline pixel"),
            {"path": "IMG@/longdesc", "url": "http://a.example/desc", "alt": "not a src"},
        ],
    ),
    wat_payload(
        "http://b.example/dir/page.html",
        [_img("pics/bird.jpg", "a bird", order="2014"), _img("../x.png", "x", order="2014")],
        base="http://static.example/base/",
    ),
    wat_payload("http://c.example/", [{"path": "A@/href", "url": "/only-links"}]),
    wat_payload("http://d.example/", None, envelope_type="request"),
    b'{"Envelope": {"Payload-Metadata": {"IMG@/src": [unterminated',
    # the body is Latin-1, not UTF-8: a wrong encoding
    b'{"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": "http://e.example/"},'
    b' "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {"Links":'
    b' [{"path": "IMG@/src", "url": "http://e.example/a.jpg", "alt": "caf\xe9"}]}}}}}',
    wat_payload(
        "http://f.example/",
        [_img("http://f.example/mojibake.jpg", "cafÃ©"), _img("http://f.example/u.jpg", "日本")],
    ),
]
EDGE_WAT_EXPECTED = [
    ("http://a.example/img/cat.jpg", "A cat & a hat", "http://a.example/page.html"),
    ("http://cdn.example/dog.jpg", "a dog on grass", "http://a.example/page.html"),
    ("data:image/png;base64,iVBORw0KGgo=", "inline pixel", "http://a.example/page.html"),
    ("http://static.example/base/pics/bird.jpg", "a bird", "http://b.example/dir/page.html"),
    ("http://static.example/x.png", "x", "http://b.example/dir/page.html"),
    ("http://f.example/mojibake.jpg", "café", "http://f.example/"),
    ("http://f.example/u.jpg", "日本", "http://f.example/"),
]
