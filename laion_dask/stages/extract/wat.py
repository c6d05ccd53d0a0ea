"""WAT metadata records -> image links with alt text.

A WAT metadata record holds one JSON document. For HTML responses it lists the page's links under
``Envelope -> Payload-Metadata -> HTTP-Response-Metadata -> HTML-Metadata -> Links``; image tags
appear as ``{"path": "IMG@/src", "url": ..., "alt": ...}`` (key order varies between crawl years,
which a JSON parser does not care about).

Most records (requests, metadata, pages without images) cannot hold an image link, so the caller
first checks the raw bytes for ``IMG@`` and parses only those: that check is where the speed comes
from. The JSON is decoded with ``msgspec`` into typed structs that skip every field we do not need;
what msgspec refuses (escaped lone surrogates) goes to the stdlib ``json`` path, which gives the
same result, slower.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import msgspec  # ~4x faster than json.loads here: unused fields are skipped, not built

from laion_dask.stages.extract.common import BadRecord, RawLink, Resolver, resolve_url, warc_uri

__all__ = ["IMG_MARKER", "WatPage", "wat_links", "img_links", "image_links"]

#: bytes that every record holding an image link contains
IMG_MARKER = b"IMG@"
_IMG_SRC = "IMG@/src"


# gc=False: these structs hold only strings and other such structs, never cycles
class _Link(msgspec.Struct, gc=False):
    path: str | None = None
    url: str | None = None
    alt: str | None = None


class _Head(msgspec.Struct, gc=False, rename={"base": "Base", "metas": "Metas"}):
    base: str | None = None
    # checked entry by entry in Python: an odd Metas entry must not cost the page its links
    metas: Any = None


class _Html(msgspec.Struct, gc=False, rename={"head": "Head", "links": "Links"}):
    head: _Head | None = None
    links: list[_Link] | None = None


class _Response(msgspec.Struct, gc=False, rename={"html": "HTML-Metadata"}):
    html: _Html | None = None


class _Payload(msgspec.Struct, gc=False, rename={"response": "HTTP-Response-Metadata"}):
    response: _Response | None = None


class _WarcHeader(msgspec.Struct, gc=False, rename={"target_uri": "WARC-Target-URI"}):
    target_uri: str | None = None


class _Envelope(
    msgspec.Struct,
    gc=False,
    rename={"warc": "WARC-Header-Metadata", "payload": "Payload-Metadata"},
):
    warc: _WarcHeader | None = None
    payload: _Payload | None = None


class _Wat(msgspec.Struct, gc=False, rename={"envelope": "Envelope"}):
    envelope: _Envelope | None = None


_DECODER = msgspec.json.Decoder(_Wat)


def _decode_error(body: bytes | memoryview, err: Exception) -> BadRecord:
    try:
        bytes(body).decode("utf-8")
    except UnicodeDecodeError as uerr:
        return BadRecord("bad_encoding", f"not UTF-8 at byte {uerr.start}")
    return BadRecord("invalid_json", str(err)[:200])


class WatPage(NamedTuple):
    """What one WAT record says about its page (see :func:`wat_links`)."""

    page_url: str
    base: str
    links: list[Any]
    metas: list[tuple[Any, Any]]


def _meta_pairs(metas: Any) -> list[tuple[Any, Any]]:
    """``(name, content)`` of each object in a WAT ``Head.Metas`` list (anything else ignored)."""
    if not isinstance(metas, list):
        return []
    return [(m.get("name"), m.get("content")) for m in metas if isinstance(m, dict)]


def _parse_msgspec(body: bytes | memoryview) -> tuple[str, str, list[Any], list[tuple[Any, Any]]]:
    try:
        doc = _DECODER.decode(body)
    except msgspec.ValidationError as err:
        raise BadRecord("invalid_wat", str(err)[:200]) from None
    except UnicodeDecodeError as err:
        raise BadRecord("bad_encoding", f"not UTF-8 at byte {err.start}") from None
    except msgspec.DecodeError as err:
        raise _decode_error(body, err) from None
    return _page(doc)


def _parse_json(body: bytes | memoryview) -> tuple[str, str, list[Any], list[tuple[Any, Any]]]:
    try:
        doc = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadRecord("bad_encoding", f"not UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise BadRecord("invalid_json", str(err)[:200]) from None
    try:
        # the same typed structs as the msgspec decoder, so both paths make the same checks
        return _page(msgspec.convert(doc, _Wat))
    except msgspec.ValidationError as err:
        raise BadRecord("invalid_wat", str(err)[:200]) from None


def _page(doc: _Wat) -> tuple[str, str, list[Any], list[tuple[Any, Any]]]:
    env = doc.envelope
    if env is None:
        raise BadRecord("invalid_wat", "no Envelope")
    # the WARC header as the WAT writer copied it: ``<uri>`` when the WARC was written so
    page = warc_uri(env.warc.target_uri) if env.warc is not None else ""
    resp = env.payload.response if env.payload is not None else None
    html = resp.html if resp is not None else None
    if html is None or not html.links:
        return page, "", [], []
    head = html.head
    if head is None:
        return page, "", html.links, []
    return page, head.base or "", html.links, _meta_pairs(head.metas)


def img_links(links: list[Any]) -> list[Any]:
    """The ``IMG@`` links of a record, in order: a link's position here is its ``index``.

    Most links are not images: the substring test drops them in one comprehension, before the
    exact prefix test on the few left.
    """
    imgs = [ln for ln in links if "IMG@" in (ln.path or "")]
    return [ln for ln in imgs if ln.path.startswith("IMG@")]


def wat_links(body: bytes | memoryview, *, use_msgspec: bool = True) -> WatPage:
    """``(page_url, base, links, metas)`` of one WAT record, before filtering or resolving.

    ``page_url`` is ``""`` when the JSON has no ``WARC-Target-URI``; ``links`` are all of the
    record's links (objects with ``path``, ``url`` and ``alt``, each ``str | None``) in order;
    ``metas`` the ``(name, content)`` of ``Head.Metas`` (empty when the page has no links).
    ``use_msgspec=False`` forces the stdlib decoder; both give the same result. Raises
    :class:`BadRecord`: ``invalid_json``, ``bad_encoding`` or ``invalid_wat`` (valid JSON of the
    wrong shape).
    """
    if use_msgspec:
        try:
            return WatPage(*_parse_msgspec(body))
        except BadRecord as err:
            if err.kind != "invalid_json":
                raise
            # msgspec rejects escaped lone surrogates ("\ud800"), which Java-written WATs can
            # hold; the stdlib parser accepts them (and raises for truly malformed JSON)
    return WatPage(*_parse_json(body))


def image_links(page_url: str, base: str, links: list[Any]) -> list[RawLink]:
    """The pair candidates among a record's :func:`wat_links`, before alt-text clean-up.

    Pairs come from ``IMG@/src`` links with a URL and an ``alt`` key, resolved against ``base``
    (itself resolved against the page URL) or the page URL; a pair's ``index`` is its position
    among the record's ``IMG@`` links.
    """
    resolve = Resolver(resolve_url(page_url, base) if base else page_url)
    return [
        RawLink(k, resolve(ln.url), ln.alt)
        for k, ln in enumerate(img_links(links) if links else [])
        if ln.path == _IMG_SRC and ln.url and ln.alt is not None
    ]
