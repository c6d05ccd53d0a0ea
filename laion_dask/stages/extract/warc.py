"""WARC/ARC HTML responses -> image links with alt text.

A response block is an HTTP message: status line, headers, body. The body may be chunked and/or
gzip/deflate encoded, and some archives (ClueWeb09) claim ``Content-Encoding: gzip`` for bodies
stored plain, so decoding is tried and the raw body kept when it is not what the header says.
The charset comes from the HTTP header, a BOM, a ``<meta>`` declaration, or detection, in that
order; lxml then parses the page and ``<img src|srcset alt>`` are resolved against ``<base href>``
or the page URL. A block cut short (a truncated file, or a body shorter than its HTTP length)
is parsed as far as its last complete tag: the pairs before the cut are whole.
"""

from __future__ import annotations

import codecs
import re
import zlib
from typing import NamedTuple

import brotli  # decodes ``Content-Encoding: br`` bodies (a FastWARC dependency)
from charset_normalizer import from_bytes
from lxml import etree

from laion_dask.stages.extract.common import BadRecord, RawLink, Resolver, resolve_url

__all__ = [
    "split_http",
    "detect_charset",
    "looks_like_html",
    "parse_html",
    "html_page",
    "HtmlPage",
]

# a blank line; some writers end header lines with a doubled CR ("\r\r\n")
_HEADER_END = re.compile(rb"\r*\n\r*\n")
_META_CHARSET = re.compile(
    rb"""<meta[^>]+?charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.IGNORECASE
)
_HTML_START = re.compile(rb"^\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)", re.I | re.S)
# WHATWG encoding labels that Python spells differently or decodes more narrowly
_CHARSET_ALIASES = {
    "latin_1": "cp1252",
    "iso8859-1": "cp1252",
    "ascii": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "euc_kr": "cp949",
    "shift_jis": "cp932",
}
_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def split_http(block: bytes) -> tuple[int | None, dict[str, str], bytes]:
    """Split an HTTP response block into status, headers (lower-case names) and body.

    A block that does not start with ``HTTP/`` (a ``resource`` record) is all body.

    Raises
    ------
    BadRecord
        ``bad_http`` when the status line is there but the header block never ends.
    """
    if not block.startswith(b"HTTP/"):
        return None, {}, block
    m = _HEADER_END.search(block)
    if m is None:
        raise BadRecord("bad_http", "HTTP header block does not end")
    lines = block[: m.start()].decode("latin-1").splitlines()
    parts = lines[0].split(None, 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            # repeated headers: the first Content-Type wins, as in browsers
            headers.setdefault(key, value.strip())
    return status, headers, block[m.end() :]


def _dechunk(body: bytes, partial: bool = False) -> bytes | None:
    """The chunks' data; None when ``body`` is not chunked (or, unless ``partial``, cut short:
    with ``partial`` the data before the cut)."""
    out, pos, n = [], 0, len(body)
    while pos < n:
        eol = body.find(b"\n", pos)
        if eol < 0:
            return b"".join(out) if partial and out else None
        size_field = body[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            return None
        if size == 0:
            return b"".join(out)
        start = eol + 1
        if start + size > n:
            if partial:
                out.append(body[start:])
                return b"".join(out)
            return None  # truncated chunk
        out.append(body[start : start + size])
        pos = start + size
        if body.startswith(b"\r\n", pos):
            pos += 2
        elif body.startswith(b"\n", pos):
            pos += 1
    return b"".join(out)


def _inflate(body: bytes, limit: int) -> tuple[bytes, bool]:
    """(decoded body, cut short): a stream that ends early gives what it decoded."""
    for wbits in (47, -15):  # gzip or zlib (auto), then raw deflate
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit:
            raise BadRecord("html_too_large", f"decoded body over {limit} bytes")
        return out, not d.eof
    raise BadRecord("bad_content_encoding", "body is not valid gzip/deflate")


def _unbrotli(body: bytes, limit: int) -> tuple[bytes, bool]:
    d = brotli.Decompressor()
    try:
        out = d.process(body)
    except brotli.error as err:
        raise BadRecord("bad_content_encoding", f"br: {err}") from None
    if len(out) > limit:
        raise BadRecord("html_too_large", f"decoded body over {limit} bytes")
    return out, not d.is_finished()


def _decode(body: bytes, headers: dict[str, str], limit: int, cut: bool) -> tuple[bytes, bool]:
    """Undo HTTP ``Transfer-Encoding: chunked`` and ``Content-Encoding: gzip|deflate|br``.

    Archives often store bodies already decoded while keeping the original headers, so each step
    runs only when the bytes look encoded; otherwise the body is used as stored. Returns (body,
    cut short): a body cut short gives what it holds. Raises :class:`BadRecord`
    (``bad_content_encoding``, ``html_too_large``).
    """
    if "chunked" in headers.get("transfer-encoding", "").lower():
        unchunked = _dechunk(body, partial=cut)
        if unchunked is not None:
            body = unchunked
    encoding = headers.get("content-encoding", "").strip().lower()
    if (encoding in ("gzip", "x-gzip") and body[:2] == b"\x1f\x8b") or (
        encoding == "deflate" and body[:1] in (b"\x78", b"\x1f")
    ):
        body, short = _inflate(body, limit)
        cut = cut or short
    elif encoding == "br" and body and not looks_like_html(body):
        body, short = _unbrotli(body, limit)
        cut = cut or short
    elif encoding == "zstd" and body and not looks_like_html(body):
        raise BadRecord("bad_content_encoding", f"{encoding} bodies are not decoded")
    return body, cut


def _normalise_charset(name: str | None) -> str | None:
    if not name:
        return None
    try:
        canonical = codecs.lookup(name.strip().strip("\"'")).name
    except (LookupError, ValueError):
        return None
    return _CHARSET_ALIASES.get(canonical, canonical)


def detect_charset(body: bytes, headers: dict[str, str] | None = None) -> str:
    """Charset of an HTML body: BOM, HTTP header, ``<meta>``, UTF-8 check, then detection."""
    for bom, name in _BOMS:
        if body.startswith(bom):
            return name
    ctype = (headers or {}).get("content-type", "")
    m = re.search(r"charset\s*=\s*[\"']?([^\s;\"']+)", ctype, re.I)
    found = _normalise_charset(m.group(1)) if m else None
    if found is None:
        m2 = _META_CHARSET.search(body[:4096])
        found = _normalise_charset(m2.group(1).decode("ascii")) if m2 else None
    if found is not None:
        if found.startswith("utf-16") and b"\x00" not in body[:200]:
            return "utf-8"  # an ASCII-compatible page that claims UTF-16 is really UTF-8
        return found
    try:
        body.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    best = from_bytes(body[:65536]).best()
    return _normalise_charset(best.encoding if best is not None else None) or "cp1252"


def looks_like_html(body: bytes) -> bool:
    """Sniff a body without a usable Content-Type."""
    return _HTML_START.match(body[:1024]) is not None


def _first_srcset_url(srcset: str) -> str:
    first = srcset.strip().split(",", 1)[0].strip()
    return first.split()[0] if first else ""


_PARSER = etree.HTMLParser(
    encoding="utf-8", recover=True, no_network=True, huge_tree=True, remove_comments=True
)


class HtmlPage(NamedTuple):
    """The image links of one HTML page and its ``(name, content)`` meta pairs; ``truncated``
    when the page was cut short (its links are those complete before the cut)."""

    links: list[RawLink]
    metas: list[tuple[str | None, str | None]]
    truncated: bool = False


_NO_PAGE = HtmlPage([], [])


def html_page(text: str, page_url: str) -> HtmlPage:
    """``<img>`` links with alt text, and the ``<meta>`` name/content pairs, of one HTML page.

    Parameters
    ----------
    text
        The decoded page.
    page_url
        URL of the page; relative ``src`` resolve against the first ``<base href>`` (itself
        resolved against this URL) or against this URL.

    Returns
    -------
    HtmlPage
        ``links``: one entry per ``<img>`` that has an ``alt`` attribute and a ``src`` (or,
        without ``src``, a ``srcset`` whose first candidate is used); ``index`` counts every
        ``<img>``. ``metas``: ``(name, content)`` of every ``<meta>`` with a ``name`` (empty
        when the page has no links: nothing to opt out of).
    """
    try:
        root = etree.fromstring(text.encode("utf-8", "replace"), _PARSER)
    except (etree.ParserError, ValueError):
        return _NO_PAGE
    if root is None:
        return _NO_PAGE
    base_url = page_url
    for el in root.iter("base"):
        href = el.get("href")
        if href is not None and href.strip():
            base_url = resolve_url(page_url, href)
            break
    resolve = Resolver(base_url)
    out = []
    for i, el in enumerate(root.iter("img")):
        alt = el.get("alt")
        if alt is None:
            continue
        src = (el.get("src") or "").strip()
        if not src:
            src = _first_srcset_url(el.get("srcset") or "")
        if not src:
            continue
        out.append(RawLink(i, resolve(src), alt))
    if not out:
        return _NO_PAGE
    metas = [(el.get("name"), el.get("content")) for el in root.iter("meta") if el.get("name")]
    return HtmlPage(out, metas)


def parse_html(
    block: bytes, page_url: str, content_type: str, limit: int, *, truncated: bool = False
) -> HtmlPage:
    """Image links and metas of one WARC ``response``/``resource`` block (:func:`html_page`;
    empty when it is not HTML).

    Parameters
    ----------
    block
        The record block: an HTTP message for ``response`` records, the document for ``resource``.
    page_url
        The record's ``WARC-Target-URI``.
    content_type
        The WARC ``Content-Type`` (used for ``resource`` records, which have no HTTP headers).
    limit
        ``max_html_bytes``; larger (decoded) bodies raise ``html_too_large``.
    truncated
        The block is shorter than its record declares. A page cut short (so, or because its
        encoded body ends early) is read up to its last ``>`` and comes back ``truncated``.

    Raises
    ------
    BadRecord
        ``bad_http``, ``bad_content_encoding``, ``truncated_record`` or ``html_too_large``.
    """
    status, headers, body = split_http(block)
    ctype = headers.get("content-type", "" if status is not None else content_type).lower()
    sniff = "html" not in ctype
    if sniff and ctype and "text/plain" not in ctype and "octet-stream" not in ctype:
        return _NO_PAGE  # declared as something else (image, css, json...)
    body, truncated = _decode(body, headers, limit, truncated)
    if sniff and not looks_like_html(body):
        return _NO_PAGE
    if len(body) > limit:
        raise BadRecord("html_too_large", f"{len(body)} bytes")
    if truncated:
        # up to the last complete tag: a tag cut inside an attribute would give a wrong URL or
        # a partial alt text
        body = body[: body.rfind(b">") + 1]
    text = body.decode(detect_charset(body, headers), "replace")
    page = html_page(text, page_url)
    return page._replace(truncated=True) if truncated else page
