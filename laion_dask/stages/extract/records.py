"""One interface over FastWARC and warcio: records with an offset and a bounded block reader.

FastWARC is about 6x faster than warcio and reads WARC (gzip per record, plain, zstd/lz4) but
not ARC; warcio reads ARC and some odd files. Both read the WARC block raw (no HTTP parsing), so
the rest of the code sees the same bytes whichever reader ran.

Whole-file gzip (one member holding many records) has no per-record compressed offset: FastWARC
reports the same ``stream_pos`` for every record in the member and warcio refuses the file. Both
raise :class:`NonChunkedGzip`, and the caller reads the file again through ``gzip`` so that
offsets are positions in the decompressed stream, distinct per record.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO, Protocol

__all__ = [
    "NonChunkedGzip",
    "StreamError",
    "Record",
    "BlockReader",
    "iter_fastwarc",
    "iter_fastwarc_raw",
    "fastwarc_record",
    "fastwarc_type_code",
    "PrefixedReader",
    "iter_warcio",
    "read_block",
    "classify_stream_error",
]


class NonChunkedGzip(Exception):
    """The file is one gzip member holding several records: read it decompressed instead."""


class StreamError(Exception):
    """The archive stream broke (bad gzip, bad header); ``kind`` names the counter."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class BlockReader(Protocol):
    def read(self, size: int = -1) -> bytes: ...


class Record:
    """A WARC/ARC record header plus a reader positioned at the start of its block.

    ``target_uri`` and ``content_type`` are read from the header on first use: a FastWARC
    header lookup costs about a microsecond, and most records never need them.
    """

    __slots__ = ("offset", "warc_type", "declared_length", "reader", "_uri", "_ctype", "_headers")

    def __init__(
        self,
        offset: int,
        warc_type: str,  # lower case: response, resource, metadata, request, warcinfo, ...
        target_uri: str | None,
        content_type: str | None,
        declared_length: int | None,
        reader: BlockReader,
        headers: Any = None,  # a FastWARC header map, for the fields given as None
    ) -> None:
        self.offset = offset
        self.warc_type = warc_type
        self.declared_length = declared_length
        self.reader = reader
        self._uri = target_uri
        self._ctype = content_type
        self._headers = headers

    @property
    def target_uri(self) -> str:
        """``WARC-Target-URI`` (``""`` when absent)."""
        if self._uri is None:
            self._uri = self._headers.get("WARC-Target-URI") or ""
        return self._uri

    @property
    def content_type(self) -> str:
        """``Content-Type`` of the record (``""`` when absent)."""
        if self._ctype is None:
            self._ctype = self._headers.get("Content-Type") or ""
        return self._ctype


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def classify_stream_error(err: BaseException) -> StreamError:
    """Map a reader/decompressor exception to a counter name."""
    text = str(err)
    low = text.lower()
    if isinstance(err, EOFError | zlib.error | gzip.BadGzipFile) or "gzip" in low or "zlib" in low:
        return StreamError("corrupt_gzip", f"{type(err).__name__}: {text}")
    return StreamError("invalid_record", f"{type(err).__name__}: {text}")


_FASTWARC_TYPES: dict[int, str] = {}  # int(WarcRecordType) -> name (the enum is not hashable)


def _fastwarc_types() -> dict[int, str]:
    if not _FASTWARC_TYPES:
        from fastwarc.warc import WarcRecordType

        for name in (
            "warcinfo",
            "response",
            "resource",
            "request",
            "metadata",
            "revisit",
            "conversion",
            "continuation",
        ):
            _FASTWARC_TYPES[int(getattr(WarcRecordType, name))] = name
    return _FASTWARC_TYPES


def iter_fastwarc_raw(stream: BinaryIO) -> Iterator[tuple[Any, int]]:
    """``(FastWARC record, offset)`` of a WARC stream (gzip/zstd/lz4 detected), with stream
    errors classified and several records in one gzip member refused (:class:`NonChunkedGzip`).
    """
    from fastwarc.warc import ArchiveIterator

    it = ArchiveIterator(stream, parse_http=False, fsspec_args=False, quirks_mode=True)
    prev = -1
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except (OSError, EOFError, zlib.error) as err:
            raise classify_stream_error(err) from err
        pos = rec.stream_pos
        if pos == prev:
            raise NonChunkedGzip(f"two records start at offset {pos}")
        prev = pos
        yield rec, pos


def fastwarc_record(rec: Any, pos: int, reader: BlockReader | None = None) -> Record:
    """A :class:`Record` over a FastWARC record (``reader`` replaces its block reader)."""
    h = rec.headers
    # the parsed type and length save header lookups; anything unusual reads the header
    warc_type = _fastwarc_types().get(int(rec.record_type))
    if warc_type is None:
        warc_type = (h.get("WARC-Type") or "").lower()
    length = rec.content_length
    if length <= 0:
        length = _int_or_none(h.get("Content-Length"))
    return Record(pos, warc_type, None, None, length, reader or rec.reader, h)


def iter_fastwarc(stream: BinaryIO) -> Iterator[Record]:
    """Records of a WARC stream read with FastWARC (gzip/zstd/lz4 detected)."""
    for rec, pos in iter_fastwarc_raw(stream):
        yield fastwarc_record(rec, pos)


def fastwarc_type_code(name: str) -> int:
    """FastWARC's integer code of a WARC-Type (``metadata``, ``response``, ...)."""
    return next(code for code, n in _fastwarc_types().items() if n == name)


class PrefixedReader:
    """A block reader that returns bytes already read from ``reader`` before the rest of it."""

    __slots__ = ("head", "reader")

    def __init__(self, head: bytes, reader: BlockReader) -> None:
        self.head, self.reader = head, reader

    def read(self, size: int = -1) -> bytes:
        head = self.head
        if not head:
            return self.reader.read(size)
        if size is None or size < 0:
            self.head = b""
            return head + self.reader.read()
        if size <= len(head):
            self.head = head[size:]
            return head[:size]
        self.head = b""
        return head + self.reader.read(size - len(head))


def iter_warcio(stream: BinaryIO) -> Iterator[Record]:
    """Records of a WARC or ARC stream read with warcio (ARC converted to WARC headers)."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    it = ArchiveIterator(stream, arc2warc=True, no_record_parse=True, check_digests=False)
    gen = iter(it)
    while True:
        try:
            rec = next(gen)
        except StopIteration:
            return
        except ArchiveLoadFailed as err:
            if "non-chunked" in str(err):
                raise NonChunkedGzip(str(err)) from err
            raise classify_stream_error(err) from err
        except (OSError, EOFError, zlib.error, ValueError) as err:
            raise classify_stream_error(err) from err
        h = rec.rec_headers
        uri = (h.get_header("WARC-Target-URI") or "").strip("<>")
        yield Record(
            it.offset,  # start of this record; get_record_offset() would read it to the end
            (rec.rec_type or "").lower(),
            uri,
            h.get_header("Content-Type") or "",
            _int_or_none(h.get_header("Content-Length")),
            rec.raw_stream,
        )


def read_block(rec: Record, limit: int, head: int = 65536) -> tuple[bytes, int | None]:
    """Read a record block, holding at most ``limit`` bytes.

    Returns
    -------
    (data, total)
        ``total`` is None when the block was read whole (``data`` is all of it). When the block
        is larger than ``limit``, ``data`` is its first ``head`` bytes (enough to see its HTTP
        headers) and ``total`` the full length; the rest is drained in bounded chunks.
    """
    try:
        if rec.declared_length is not None and rec.declared_length > limit:
            data = rec.reader.read(head)
            total = len(data)
        else:
            # ask for what the header declares (+1 to see a longer block), not for ``limit``:
            # readers allocate the size asked for, and a many-MB buffer per record costs an
            # mmap/munmap pair and page faults where glibc's mmap threshold is fixed (Dask
            # workers set MALLOC_TRIM_THRESHOLD_, which fixes it): 1.7x the CPU time in a worker
            want = limit if rec.declared_length is None else min(rec.declared_length, limit)
            data = rec.reader.read(want + 1)
            if len(data) > want and want < limit:  # the block is longer than declared
                data += rec.reader.read(limit - len(data) + 1)
            if len(data) <= limit:
                return data, None
            total = len(data)
            data = data[:head]
        while True:
            chunk = rec.reader.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
        return data, total
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise classify_stream_error(err) from err
