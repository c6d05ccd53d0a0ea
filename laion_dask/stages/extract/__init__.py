"""Extraction stage: one WAT/WARC/ARC file -> one partition of (image URL, alt text) pairs.

``extract_file`` streams the file record by record (never whole), reads Common Crawl's layout
(one gzip member a record) with its own zlib-ng member walk, FastWARC where that walk stops
and for other WARC files, warcio where FastWARC cannot (ARC, odd files), and returns the pairs
plus a :class:`FileSummary` whose counters say what was read and what was skipped, by kind. Bad
records are counted and skipped; a file that cannot be read at all raises, or with
``cfg.skip_unreadable_files`` becomes an empty partition with ``summary.error`` set.

Skip kinds in ``bad_records``: ``empty_file``, ``corrupt_gzip``, ``invalid_record`` (the archive
stream cannot be parsed further), ``truncated_record`` (a block shorter than its Content-Length,
or an HTTP body cut short: an HTML page keeps the pairs of its tags complete before the cut),
``invalid_json``, ``bad_encoding``, ``invalid_wat`` (JSON of the wrong shape), ``record_too_large``
(a WAT JSON over ``max_html_bytes``), ``html_too_large``, ``bad_http``, ``bad_content_encoding``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa

from laion_dask.ground import schema
from laion_dask.ground.config import ConsentConfig, ExtractConfig
from laion_dask.stages.extract import common
from laion_dask.stages.extract.common import BadRecord, RawLink, Resolver, resolve_url, warc_uri
from laion_dask.stages.extract.optout import NO_SIGNALS, page_signals
from laion_dask.stages.extract.records import (
    FASTWARC_METADATA,
    GunzipStream,
    NonChunkedGzip,
    PrefixedReader,
    ReaderCannot,
    Record,
    StreamError,
    classify_stream_error,
    fastwarc_record,
    iter_arc,
    iter_fastwarc,
    iter_fastwarc_raw,
    iter_gzip_members,
    iter_warcio,
    read_block,
    record_bounds,
)
from laion_dask.stages.extract.text import clean_text, laion_hashes, pair_uids, record_hashes
from laion_dask.stages.extract.warc import looks_like_html, parse_html, split_http
from laion_dask.stages.extract.wat import IMG_MARKER, image_links, wat_links
from laion_dask.stages.sources import open_input

__all__ = [
    "FileSummary",
    "ExtractResult",
    "extract_file",
    "stream_file",
    "extract_pairs",
    "sniff_format",
    "CHUNK_ROWS",
]

#: pairs per chunk handed to a :func:`stream_file` sink: what extraction holds in memory (about
#: 1.4 KB a pair as Python strings, so ~90 MB), whatever the input file's size
CHUNK_ROWS = 65_536

log = logging.getLogger(__name__)


@dataclass
class FileSummary:
    """What one input file gave; summaries add up with ``+``.

    ``records_read`` counts every record seen; ``records_with_links`` those holding at least one
    image link with an ``alt`` attribute; ``pairs_found`` the pairs returned (alt text non-empty
    after clean-up); ``bad_records`` the skipped records (or stream breaks) by kind.
    """

    source_file: str
    format: str = "unknown"  # wat | warc | wet | arc | unknown
    # fastwarc | warcio | arc, "+gunzip" when read through gzip (whole-file gzip)
    reader: str = "none"
    records_read: int = 0
    records_with_links: int = 0
    pairs_found: int = 0
    bad_records: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def records_skipped(self) -> int:
        """Total of ``bad_records``."""
        return sum(self.bad_records.values())

    def count(self, kind: str, n: int = 1) -> None:
        """Add ``n`` to the ``kind`` counter of ``bad_records``."""
        self.bad_records[kind] = self.bad_records.get(kind, 0) + n

    def __add__(self, other: FileSummary) -> FileSummary:
        if not isinstance(other, FileSummary):
            return NotImplemented

        def same(a: str, b: str, mixed: str) -> str:
            return a if a == b else mixed

        bad = Counter(self.bad_records)
        bad.update(other.bad_records)
        errors = [e for e in (self.error, other.error) if e]
        return FileSummary(
            source_file=same(self.source_file, other.source_file, "*"),
            format=same(self.format, other.format, "mixed"),
            reader=same(self.reader, other.reader, "mixed"),
            records_read=self.records_read + other.records_read,
            records_with_links=self.records_with_links + other.records_with_links,
            pairs_found=self.pairs_found + other.pairs_found,
            bad_records=dict(sorted(bad.items())),
            bytes_read=self.bytes_read + other.bytes_read,
            seconds=self.seconds + other.seconds,
            error="; ".join(errors) if errors else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileSummary:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(**{**data, "bad_records": dict(data.get("bad_records") or {})})


@dataclass
class ExtractResult:
    """Pairs of one file (``schema.PAIRS_DTYPES`` columns) and its summary."""

    pairs: pd.DataFrame
    summary: FileSummary


class _SinkFailed(Exception):
    """Raised through the readers when a :func:`stream_file` sink fails; re-raised as is."""

    def __init__(self, err: Exception) -> None:
        super().__init__(str(err))
        self.err = err


class _Unreadable(Exception):
    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


_ARC_FIRST_LINE = re.compile(rb"^(?:filedesc://|\S+ \d{1,3}(?:\.\d{1,3}){3} \d{14} )")


def _plain_head(head: bytes) -> tuple[bytes, bool, bool]:
    """(first decompressed bytes, gzipped, corrupt) of a file's first bytes."""
    if head[:2] != b"\x1f\x8b":
        return head, False, False
    plain, data = b"", head
    try:
        while data and len(plain) < 64:  # skip empty members, as gzip readers do
            d = zlib.decompressobj(31)
            plain += d.decompress(data, 4096)
            if not d.eof:
                # a stream that ends inside the first member's header is corrupt
                return plain, True, not plain
            data = d.unused_data
    except zlib.error:
        return plain, True, True
    return plain, True, False


def sniff_format(head: bytes) -> tuple[str, bool]:
    """Container of a file from its first bytes.

    Returns
    -------
    (kind, gzipped)
        ``kind`` is ``warc``, ``arc``, ``empty``, ``corrupt_gzip`` or ``unknown``.
    """
    plain, gz, corrupt = _plain_head(head)
    if corrupt:
        return "corrupt_gzip", gz
    stripped = plain.lstrip(b"\r\n\t ")
    if not stripped:
        return "empty", gz
    if stripped.startswith(b"WARC/"):
        return "warc", gz
    if _ARC_FIRST_LINE.match(stripped):
        return "arc", gz
    return "unknown", gz


def _format_from_name(path: str, sniffed: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    for fmt in ("wat", "wet", "arc"):
        if re.search(rf"\.{fmt}(?:\.|$)", name):
            return fmt
    return sniffed


def _arrow_strings(values: list[str]) -> tuple[pa.Array, list[str]]:
    """(Arrow array, values) with lone surrogates replaced by ``?`` (Arrow needs UTF-8)."""
    try:
        return pa.array(values, type=pa.large_string()), values
    except UnicodeEncodeError:  # lone surrogates from JSON "\ud800" escapes
        values = [v.encode("utf-8", "replace").decode("utf-8") for v in values]
        return pa.array(values, type=pa.large_string()), values


def _hex_strings(values: np.ndarray) -> pa.Array:
    """16-char lower-case hex of each uint64, as ``format(v, "016x")``, without a Python loop."""
    n = len(values)
    data = values.astype(">u8").tobytes().hex().encode("ascii")
    offsets = np.arange(0, 16 * (n + 1), 16, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


class _Collector:
    """Columns of the pairs under construction, plus the summary counters.

    Per record: offset, page URL and pair count; per pair: link index, URL and text. The frame
    repeats the per-record values and hashes in bulk at the end. With a ``sink``, every
    ``chunk_rows`` pairs (at a record boundary) become a frame handed to it and are forgotten,
    so memory does not grow with the file. Nothing is handed on before the second record has
    been read: a reader that gives up on the first record (or finds one gzip member holding
    several) is replaced by another one without duplicating pairs.
    """

    def __init__(
        self,
        source_file: str,
        cfg: ExtractConfig,
        meta_names: frozenset[str] = frozenset(),
        sink: Callable[[pd.DataFrame], None] | None = None,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self.source_file = source_file
        self.cfg = cfg
        self.meta_names = meta_names
        self.sink = sink
        self.chunk_rows = chunk_rows
        self.summary = FileSummary(source_file=source_file)
        self._reset()
        self.saw_wat = False

    def _reset(self) -> None:
        # per record with pairs: (offset, page URL, pair count, page_robots, page_tdm)
        self.records: list[tuple[int, str, int, str | None, bool]] = []
        self.indices: list[int] = []
        self.urls: list[str] = []
        self.texts: list[str] = []

    def flush(self) -> None:
        """Hand the pairs so far to the sink (an empty frame too) and forget them."""
        if self.sink is None:
            raise RuntimeError("flush() needs a sink")
        frame = self.frame()
        self.summary.pairs_found += len(frame)
        self._reset()
        self.sink(frame)

    def skipped(self, offset: int, err: BadRecord) -> None:
        """Count a record skipped for ``err`` (a named counter in ``bad_records``)."""
        self.summary.count(err.kind)
        log.debug("%s @%d: skipped record: %s", self.source_file, offset, err)

    def bad_header(self, offset: int, err: StreamError) -> None:
        """A header line that cannot be read: a record seen and skipped; reading goes on."""
        self.summary.records_read += 1
        self.skipped(offset, BadRecord(err.kind, str(err)))

    def _close_record(self, offset: int, page_url: str, n: int, metas: list[Any]) -> None:
        if n:
            robots, tdm = page_signals(metas, self.meta_names) if metas else NO_SIGNALS
            self.records.append((offset, page_url, n, robots, tdm))
            if (
                self.sink is not None
                and len(self.texts) >= self.chunk_rows
                and self.summary.records_read >= 2
            ):
                self.flush()

    def add(
        self, offset: int, page_url: str, links: list[RawLink], metas: list[Any] | None = None
    ) -> None:
        if not links:
            return
        self.summary.records_with_links += 1
        max_chars, n = self.cfg.max_text_chars, 0
        for link in links:
            text = clean_text(link.alt, max_chars)
            if text:  # LAION needs alt text; no pair without it
                self.indices.append(link.index)
                self.urls.append(link.url)
                self.texts.append(text)
                n += 1
        self._close_record(offset, page_url, n, metas or [])

    def add_wat(
        self,
        offset: int,
        page_url: str,
        base: str,
        links: list[Any],
        metas: list[Any] | None = None,
    ) -> None:
        """Like :meth:`add` for the links of :func:`~laion_dask.stages.extract.wat.wat_links`.

        The compiled ``img_pairs`` (``common.speedups``) gives what :func:`image_links` and
        :meth:`add` give, without building a link per pair; tests hold them equal.
        """
        fast = common.speedups
        if fast is None:
            self.add(offset, page_url, image_links(page_url, base, links), metas)
            return
        max_chars = self.cfg.max_text_chars
        found, n = fast.img_pairs(
            links,
            self.indices,
            self.urls,
            self.texts,
            max_chars,
            lambda alt: clean_text(alt, max_chars),
            lambda: Resolver(resolve_url(page_url, base) if base else page_url),
            None if base else page_url,  # a simple page URL is split in C, without a Resolver
        )
        if found:
            self.summary.records_with_links += 1
            self._close_record(offset, page_url, n, metas or [])

    def frame(self) -> pd.DataFrame:
        n, src = len(self.texts), self.source_file
        offsets, pages, counts, robots, tdm = (
            map(list, zip(*self.records, strict=True)) if self.records else ([], [], [], [], [])
        )
        counts = np.array(counts, dtype=np.int64)
        url_arr, urls = _arrow_strings(self.urls)
        text_arr, texts = _arrow_strings(self.texts)
        page_arr = _arrow_strings(pages)[0]
        rec_of_pair = np.repeat(np.arange(len(counts)), counts)
        rec_hash = np.repeat(record_hashes(src, offsets), counts)
        offsets = np.repeat(np.array(offsets, dtype=np.int64), counts)
        uids = pair_uids(rec_hash, np.array(self.indices, dtype=np.int64))
        hashes = laion_hashes(urls, texts)
        data = {
            schema.UID: _hex_strings(uids),
            schema.URL: url_arr,
            schema.TEXT: text_arr,
            schema.PAGE_URL: page_arr.take(pa.array(rec_of_pair)),
            # one value n times, without a list of n references to convert
            schema.SOURCE_FILE: pa.repeat(pa.scalar(src, pa.large_string()), n),
            schema.RECORD_OFFSET: offsets,
            schema.HASH: hashes,
            schema.PAGE_ROBOTS: pa.array(robots, type=pa.large_string()).take(
                pa.array(rec_of_pair)
            ),
            schema.PAGE_TDM: np.repeat(np.array(tdm, dtype=bool), counts),
        }
        return pd.DataFrame(
            {
                c: data[c] if t == "int64" else pd.array(data[c], dtype=t)
                for c, t in schema.PAIRS_DTYPES.items()
            }
        )


def _is_html_head(head: bytes, content_type: str) -> bool:
    try:
        status, headers, body = split_http(head)
    except BadRecord:
        return True  # headers longer than the head we kept: cannot tell, count it
    ctype = headers.get("content-type", "" if status is not None else content_type).lower()
    return "html" in ctype or (not ctype and looks_like_html(body))


def _wat_block(
    data: bytes,
    offset: int,
    col: _Collector,
    header: Callable[[str], str | None],
    start: int = 0,
    end: int | None = None,
) -> None:
    """One whole WAT metadata block, ``data[start:end]``, into ``col``; ``header(name)`` reads
    its WARC header. The member walk passes the whole member with the block's bounds: the JSON
    is parsed from a view, not a copy of the block (24,000 copies, 250 MB, per 100 MB WAT)."""
    if data.find(IMG_MARKER, start, end) < 0:
        # cannot hold an image link: skip the JSON parse (the fast path). The Content-Type
        # lookup costs more than the IMG@ scan, so it is only made until the file is known to
        # be a WAT (for the summary)
        if not col.saw_wat and "json" in (header("Content-Type") or ""):
            col.saw_wat = True
        return
    if "json" not in (header("Content-Type") or ""):
        return  # WARC metadata (fetch times, outlinks), not a WAT record
    col.saw_wat = True
    body = data if start == 0 and end is None else memoryview(data)[start:end]
    page, base, links, metas = wat_links(body)
    col.add_wat(offset, page or warc_uri(header("WARC-Target-URI")), base, links, metas)


def _handle(rec: Record, col: _Collector, cfg: ExtractConfig) -> None:
    """Parse one record into ``col``; raises BadRecord for a counted skip."""
    t = rec.warc_type
    limit = cfg.max_html_bytes
    if t == "metadata" and cfg.format != "warc":
        data, total = read_block(rec, limit)
        if total is None and (rec.declared_length is None or len(data) >= rec.declared_length):
            _wat_block(data, rec.offset, col, rec.header)
            return
        if "json" not in rec.content_type:
            return
        col.saw_wat = True
        if total is not None:
            raise BadRecord("record_too_large", f"{total} bytes")
        raise BadRecord("truncated_record", f"{len(data)} of {rec.declared_length} bytes")
    elif t in ("response", "resource") and cfg.format != "wat":
        data, total = read_block(rec, limit)
        if total is not None:
            if _is_html_head(data, rec.content_type):
                raise BadRecord("html_too_large", f"{total} bytes")
            return
        short = rec.declared_length is not None and len(data) < rec.declared_length
        try:
            page = parse_html(data, rec.target_uri, rec.content_type, limit, truncated=short)
        except BadRecord as err:
            if short:  # the cut is why the rest cannot be read
                raise BadRecord(
                    "truncated_record", f"{len(data)} of {rec.declared_length} bytes; {err}"
                ) from None
            raise
        # a page cut short keeps the pairs of its complete tags, and is counted as truncated
        col.add(rec.offset, rec.target_uri, page.links, page.metas)
        if short:
            raise BadRecord("truncated_record", f"{len(data)} of {rec.declared_length} bytes")
        if page.truncated:
            raise BadRecord("truncated_record", "HTTP body cut short")


def _fastwarc_pass(stream: BinaryIO, col: _Collector, cfg: ExtractConfig, start: int = 0) -> None:
    """The FastWARC pass. A WAT metadata record whose declared block is read whole (nearly all
    of them) takes :func:`_wat_block` inline, without a :class:`Record` or a :func:`read_block`
    call; every other record goes through :func:`_handle`, so both give the same result.
    Records before offset ``start`` (read already) are passed over.
    """
    limit = cfg.max_html_bytes
    wat = cfg.format != "warc"
    metadata = FASTWARC_METADATA  # a local: looked up once per record
    summary = col.summary
    for frec, pos in iter_fastwarc_raw(stream):
        if pos < start:
            continue
        summary.records_read += 1
        try:
            length = frec.content_length
            if wat and 0 < length <= limit and int(frec.record_type) == metadata:
                try:
                    data = frec.reader.read(length + 1)
                except (OSError, EOFError, zlib.error, ValueError) as err:
                    raise classify_stream_error(err) from err
                if len(data) == length:
                    _wat_block(data, pos, col, frec.headers.get)
                    continue
                rec = fastwarc_record(frec, pos, PrefixedReader(data, frec.reader))
            else:
                rec = fastwarc_record(frec, pos)
            _handle(rec, col, cfg)
        except BadRecord as err:
            col.skipped(pos, err)


# WARC-Type values _handle does nothing with, in any format
_INERT_TYPES = frozenset({b"warcinfo", b"request", b"revisit", b"conversion", b"continuation"})
# WARC-Type values a WAT pass takes nothing from (the HTML of a WARC is read in "warc"/"auto")
_HTML_TYPES = frozenset({b"response", b"resource"})


_FIELDS: dict[str, re.Pattern[bytes]] = {}  # header field name -> its line, any case


def _field(head: bytes, name: str) -> str | None:
    """A WARC header field as FastWARC's ``headers.get`` gives it: the first one of that name,
    case-insensitive, stripped; None when absent."""
    line = _FIELDS.get(name)
    if line is None:
        line = _FIELDS[name] = re.compile(rb"\r\n" + re.escape(name.encode()) + rb":(.*)", re.I)
    m = line.search(head)  # "." stops at the line's end: no CR or LF inside a plain header
    return None if m is None else m.group(1).strip().decode("utf-8")


def _member_walk(stream: BinaryIO, col: _Collector, cfg: ExtractConfig) -> int | None:
    """Records of the gzip members of ``stream`` from where it is, one record a member, as
    :func:`_fastwarc_pass` would read them; returns the offset of the first member it leaves to
    FastWARC (None at the end of the file).

    A member is read here only when it holds one plain record (:func:`record_bounds`) of a type
    this pass handles without :func:`_handle`: a WAT metadata record, or one nothing is taken
    from. Anything else, and every gzip or stream fault, goes to FastWARC at that member, so the
    counts and skip kinds are FastWARC's.
    """
    limit = cfg.max_html_bytes
    wat = cfg.format != "warc"
    summary = col.summary
    bounds = record_bounds if common.speedups is None else common.speedups.record_bounds
    for pos, data in iter_gzip_members(stream, limit + (1 << 16)):
        found = bounds(data) if data else None
        if found is None:
            return pos
        t, start, end = found
        if t == b"metadata" and wat:
            if not 0 < end - start <= limit:
                return pos
            summary.records_read += 1
            try:
                _wat_block(data, pos, col, functools.partial(_field, data[:start]), start, end)
            except BadRecord as err:
                col.skipped(pos, err)
        elif t in _INERT_TYPES or t == b"metadata" or (cfg.format == "wat" and t in _HTML_TYPES):
            summary.records_read += 1
        else:
            return pos
    return None


def _records_fastwarc(stream: BinaryIO, col: _Collector, cfg: ExtractConfig) -> None:
    """A WARC gzipped record by record (Common Crawl's layout) is read by :func:`_member_walk`
    up to the first member it leaves; from that member on (and any other file) it is read by
    :func:`_fastwarc_pass`. Both give the same records: tests compare them on the corpus and on
    broken files.

    FastWARC reads the file again from its start, passing over the records already read: it
    takes a file's compression from its first bytes (at an odd member it would read plain bytes
    as records where the whole pass reports corrupt gzip), and where a member holds several
    records it gives the second one the member's end as offset, so it cannot be started there.
    A file of Common Crawl's layout is never read twice; an odd one at most once more.
    """
    origin = stream.tell() if stream.seekable() else None
    if origin is not None:
        gz = stream.read(2) == b"\x1f\x8b"
        stream.seek(origin)
        if gz:
            pos = _member_walk(stream, col, cfg)
            if pos is None:
                return
            stream.seek(origin)
            _fastwarc_pass(stream, col, cfg, start=pos)
            return
    _fastwarc_pass(stream, col, cfg)


def _records(iterate: Callable[[BinaryIO, _Collector], Iterator[Record]]) -> Callable[..., None]:
    def run(stream: BinaryIO, col: _Collector, cfg: ExtractConfig) -> None:
        for rec in iterate(stream, col):
            col.summary.records_read += 1
            try:
                _handle(rec, col, cfg)
            except BadRecord as err:
                col.skipped(rec.offset, err)

    return run


#: reader name -> the pass over its records (tests compare the fused FastWARC pass with the plain
#: one: ``_PASSES["fastwarc-plain"]``)
_PASSES: dict[str, Callable[..., None]] = {
    "fastwarc": _records_fastwarc,
    "fastwarc-zlib": _fastwarc_pass,
    "fastwarc-plain": _records(lambda stream, col: iter_fastwarc(stream)),
    "warcio": _records(lambda stream, col: iter_warcio(stream)),
    "arc": _records(lambda stream, col: iter_arc(stream, on_bad=col.bad_header)),
}


def _scan(
    path: str,
    cfg: ExtractConfig,
    reader: str,
    gunzip: bool,
    meta_names: frozenset[str],
    sink: Callable[[pd.DataFrame], None],
    chunk_rows: int,
) -> _Collector:
    """One pass over the file; raises _Unreadable when not even one record could be read."""
    col = _Collector(path, cfg, meta_names, sink, chunk_rows)
    col.summary.reader = reader + ("+gunzip" if gunzip else "")
    with open_input(path) as raw:
        plain = GunzipStream(raw) if gunzip else None
        stream = raw if plain is None else io.BufferedReader(plain, 1 << 16)
        try:
            _PASSES[reader](stream, col, cfg)
        # OSError, EOFError, zlib.error: from the gzip layer around the reader
        except (StreamError, OSError, EOFError, zlib.error) as err:
            serr = err if isinstance(err, StreamError) else classify_stream_error(err)
            if col.summary.records_read == 0:
                raise _Unreadable(str(serr), serr.kind) from err
            col.summary.count(serr.kind)
            log.debug("%s: stopped after %d records: %s", path, col.summary.records_read, serr)
        if plain is not None and plain.cut and "truncated_record" not in col.summary.bad_records:
            # cut between records (inside a gzip trailer): nothing lost but the file's end
            col.summary.count("corrupt_gzip")
            log.debug("%s: the file ends inside a gzip member", path)
        try:
            col.summary.bytes_read = raw.tell()
        except (OSError, ValueError):
            col.summary.bytes_read = 0
    return col


def _arc_version(plain_head: bytes) -> int:
    """The ARC version a file's ``filedesc://`` record declares (its block's first field)."""
    lines = plain_head.lstrip(b"\r\n").split(b"\n", 2)
    return 2 if len(lines) > 1 and lines[1].split(b" ", 1)[0].strip() == b"2" else 1


def _attempts(
    kind: str, gz: bool, cfg: ExtractConfig, whole: bool, arc_version: int = 1
) -> list[tuple[str, bool]]:
    if kind == "empty":
        return []  # nothing to read
    if kind == "arc" and cfg.reader == "auto":
        # FastWARC reads WARC only; warcio reads ARC v1 gzipped per record (with the members'
        # offsets) but not v2, and loses the next record when one lacks its trailing newline,
        # which iter_arc, framing by length alone, does not: it reads plain streams
        if not gz:
            return [("arc", False)]
        return [("warcio", False), ("arc", True)] if arc_version == 1 else [("arc", True)]
    readers = ["fastwarc", "warcio"] if cfg.reader == "auto" else [cfg.reader]
    out = []
    for r in readers:
        if not whole:
            out.append((r, False))
        if gz:
            out.append((r, True))
    return out


def _whole_file_gzip(head: bytes, limit: int = 1 << 20) -> bool:
    """Whether the first gzip member of a WARC, from the file's first bytes, holds more than its
    first record.

    Common Crawl compresses each record as its own member; a file gzipped whole (one member for
    everything) has no per-record offsets and is read through ``gzip`` instead. Deciding that
    here, from the first record's Content-Length, keeps a streaming pass from handing on pairs
    and then being replaced by another reader. Decodes at most ``limit`` bytes of ``head`` (a
    WARC's first record, its warcinfo, is far smaller); anything unclear (a first record longer
    than that) says False and the readers decide as before.
    """
    try:
        plain = zlib.decompressobj(31).decompress(head, limit)
    except zlib.error:
        return False
    head_end = plain.find(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:[ \t]*(\d+)", plain[:head_end]) if head_end >= 0 else None
    if m is None:
        return False
    end = head_end + 4 + int(m.group(1))
    return bool(plain[end : end + 64].strip(b"\r\n"))  # the next record, in the same member


def stream_file(
    path: str,
    cfg: ExtractConfig,
    consent: ConsentConfig | None = None,
    *,
    sink: Callable[[pd.DataFrame], None],
    chunk_rows: int = CHUNK_ROWS,
) -> FileSummary:
    """Extract the pairs of one WAT, WARC or ARC file chunk by chunk, in bounded memory.

    Like :func:`extract_file`, but the pairs are handed to ``sink`` as frames of about
    ``chunk_rows`` rows (cut at record boundaries, in file order, ``schema.PAIRS_DTYPES``)
    instead of being returned, so the memory used does not depend on the file's size. ``sink``
    is called at least once (with an empty frame when the file has no pairs or is skipped).

    Returns
    -------
    FileSummary
        ``pairs_found`` is the number of rows handed to ``sink``.

    Raises
    ------
    OSError
        As :func:`extract_file`.
    """
    try:
        return _stream_file(path, cfg, consent, sink, chunk_rows)
    except _SinkFailed as failed:
        raise failed.err from failed.err.__cause__


def _stream_file(
    path: str,
    cfg: ExtractConfig,
    consent: ConsentConfig | None,
    sink: Callable[[pd.DataFrame], None],
    chunk_rows: int,
) -> FileSummary:
    handed = 0  # rows handed to the sink so far

    def deliver(frame: pd.DataFrame) -> None:
        nonlocal handed
        handed += len(frame)
        try:
            sink(frame)
        except Exception as err:
            # the sink's own failure (a full disk, say) must stop the file, never be mistaken
            # by the readers for a broken input stream and counted as a skip
            raise _SinkFailed(err) from err

    t0 = time.perf_counter()
    meta_names = frozenset((consent or ConsentConfig()).meta_names)
    summary = FileSummary(source_file=path)
    col = None
    try:
        with open_input(path) as fh:
            head = fh.read(65536)
        kind, gz = sniff_format(head)
        summary.format = _format_from_name(path, kind)
        if kind == "corrupt_gzip":
            raise _Unreadable("corrupt gzip at the start of the file", "corrupt_gzip")
        if kind == "unknown":
            start = _plain_head(head)[0][:40]
            raise _Unreadable(f"not a WARC or ARC file (its content starts with {start!r})")
        first_error: _Unreadable | None = None
        whole = gz and kind == "warc" and _whole_file_gzip(head)
        version = _arc_version(_plain_head(head)[0]) if kind == "arc" else 1
        for reader, gunzip in _attempts(kind, gz, cfg, whole, version):
            try:
                col = _scan(path, cfg, reader, gunzip, meta_names, deliver, chunk_rows)
                break
            except ReaderCannot as err:
                if handed:
                    # e.g. gzip members of one record at first, then one holding several: the
                    # pairs handed on cannot be taken back, so the file fails by name
                    fix = (
                        "gunzip the file first"
                        if isinstance(err, NonChunkedGzip)
                        else 'read it with [extract] reader = "warcio"'
                    )
                    raise _Unreadable(f"{err} after {handed} pairs were written; {fix}") from err
                first_error = first_error or _Unreadable(str(err))
                log.debug("%s: %s; reading it with the next reader", path, err)
            except _Unreadable as err:
                first_error = first_error or err
                log.debug("%s: %s cannot read it: %s", path, reader, err)
        if kind == "empty":
            summary.count("empty_file")
        elif col is None:
            raise first_error or _Unreadable("no reader could read it")
    except (_Unreadable, OSError) as err:
        message = f"cannot read {path}: {err}"
        if not cfg.skip_unreadable_files:
            if isinstance(err, FileNotFoundError):
                raise FileNotFoundError(message) from err
            raise OSError(message) from err
        log.warning("%s (skipped: empty partition)", message)
        summary.error = message
        if isinstance(err, _Unreadable) and err.kind:
            summary.count(err.kind)
    if col is None:  # an empty or skipped file: one empty frame
        summary.seconds = time.perf_counter() - t0
        deliver(schema.PAIRS.copy())
        return summary
    col.flush()
    summary = col.summary
    summary.format = _format_from_name(path, "wat" if col.saw_wat else kind)
    summary.bad_records = dict(sorted(summary.bad_records.items()))
    summary.seconds = time.perf_counter() - t0
    return summary


def extract_file(
    path: str, cfg: ExtractConfig, consent: ConsentConfig | None = None
) -> ExtractResult:
    """Extract (image URL, alt text) pairs from one WAT, WARC or ARC file.

    Parameters
    ----------
    path
        Local path or fsspec URL, as given by the user (it becomes ``source_file``).
    cfg
        ``format`` (``auto`` handles WAT JSON and HTML responses in one pass), ``reader``,
        ``max_html_bytes``, ``max_text_chars``, ``skip_unreadable_files``.
    consent
        Its ``meta_names`` say which ``<meta>`` names are robots directives (recorded per pair
        in ``page_robots`` and ``page_tdm``; the rules stage applies the policy). None = defaults.

    Returns
    -------
    ExtractResult
        ``pairs`` with exactly ``schema.PAIRS_DTYPES`` and the file's :class:`FileSummary`.
        All pairs are held in memory: :func:`stream_file` hands them on chunk by chunk.

    Raises
    ------
    OSError
        The file cannot be read at all and ``cfg.skip_unreadable_files`` is False; the message
        names the file.

    Examples
    --------
    >>> res = extract_file("tests/data/tiny.wat.gz", ExtractConfig())  # doctest: +SKIP
    >>> res.summary.pairs_found == len(res.pairs)  # doctest: +SKIP
    True
    """
    chunks: list[pd.DataFrame] = []
    summary = stream_file(path, cfg, consent, sink=chunks.append, chunk_rows=2**62)
    pairs = chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)
    return ExtractResult(pairs, summary)


def extract_pairs(
    path: str, cfg: ExtractConfig, consent: ConsentConfig | None = None
) -> pd.DataFrame:
    """Pairs of one file (``schema.PAIRS_DTYPES``); for ``dd.from_map`` and notebooks.

    Examples
    --------
    >>> ddf = dd.from_map(extract_pairs, paths, args=(cfg,), meta=schema.PAIRS)  # doctest: +SKIP
    """
    return extract_file(path, cfg, consent).pairs
