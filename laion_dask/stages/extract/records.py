"""One interface over FastWARC and warcio: records with an offset and a bounded block reader.

FastWARC is about 6x faster than warcio and reads WARC (gzip per record, plain, zstd/lz4) but
not ARC, nor WARC headers whose field names are not in the spec's case; warcio reads ARC gzipped
per record and odd WARC files; :func:`iter_arc` reads plain ARC streams (uncompressed, or one gzip
member for the whole file), whose records need not end with the newline warcio expects. All read
the block raw (no HTTP parsing), so the rest of the code sees the same bytes whichever reader ran.
URI-valued header fields are read through :func:`~laion_dask.stages.extract.common.warc_uri`
(WARC 1.0 writes them in angle brackets), whichever reader ran.

:func:`iter_gzip_members` and :func:`record_bounds` read Common Crawl's layout without FastWARC
(zlib-ng inflates its members twice as fast); the caller hands FastWARC whatever they leave.

Whole-file gzip (one member holding many records) has no per-record compressed offset: FastWARC
reports the same ``stream_pos`` for every record in the member and warcio refuses the file. Both
raise :class:`NonChunkedGzip`, and the caller reads the file again through ``gzip`` so that
offsets are positions in the decompressed stream, distinct per record.
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Protocol

from fastwarc.warc import ArchiveIterator as FastwarcIterator
from fastwarc.warc import WarcRecordType
from warcio.archiveiterator import ArchiveIterator as WarcioIterator
from warcio.exceptions import ArchiveLoadFailed
from warcio.limitreader import LimitReader
from zlib_ng import zlib_ng

from laion_dask.stages.extract import common
from laion_dask.stages.extract.common import warc_uri

__all__ = [
    "URI_FIELDS",
    "ReaderCannot",
    "NonChunkedGzip",
    "StreamError",
    "Record",
    "BlockReader",
    "iter_fastwarc",
    "iter_fastwarc_raw",
    "fastwarc_record",
    "FASTWARC_METADATA",
    "PrefixedReader",
    "iter_warcio",
    "iter_arc",
    "GunzipStream",
    "iter_gzip_members",
    "inflate_members",
    "record_bounds",
    "read_block",
    "classify_stream_error",
]


#: the WARC header fields whose value is a URI (WARC 1.1 section 5; lower case): WARC 1.0 writes
#: each as ``<uri>``, and :meth:`Record.header` gives the bare URI
URI_FIELDS = frozenset(
    {
        "warc-target-uri",
        "warc-refers-to-target-uri",
        "warc-profile",
        "warc-record-id",
        "warc-refers-to",
        "warc-concurrent-to",
        "warc-warcinfo-id",
        "warc-segment-origin-id",
    }
)


class ReaderCannot(Exception):
    """This reader cannot read the file correctly: the next reader should read it instead."""


class NonChunkedGzip(ReaderCannot):
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

    __slots__ = ("offset", "warc_type", "declared_length", "reader", "_uri", "_ctype", "_get")

    def __init__(
        self,
        offset: int,
        warc_type: str,  # lower case: response, resource, metadata, request, warcinfo, ...
        target_uri: str | None,
        content_type: str | None,
        declared_length: int | None,
        reader: BlockReader,
        # the reader's case-insensitive header lookup (None when absent), for the fields given
        # as None; ARC records have none
        get: Callable[[str], str | None] | None = None,
    ) -> None:
        self.offset = offset
        self.warc_type = warc_type
        self.declared_length = declared_length
        self.reader = reader
        self._uri = target_uri
        self._ctype = content_type
        self._get = get

    @property
    def target_uri(self) -> str:
        """``WARC-Target-URI`` as a bare URI (``""`` when absent)."""
        if self._uri is None:
            self._uri = warc_uri(self._get("WARC-Target-URI"))
        return self._uri

    def header(self, name: str) -> str:
        """A WARC header field (``""`` when absent); URI fields without WARC 1.0's ``<>``.

        Field names are case-insensitive (WARC 1.1 section 4), as both readers' maps are.
        """
        if self._get is None:  # a record whose reader gave its two fields only (ARC)
            return {"warc-target-uri": self.target_uri, "content-type": self.content_type}.get(
                name.lower(), ""
            )
        value = self._get(name) or ""
        return warc_uri(value) if name.lower() in URI_FIELDS else value

    @property
    def content_type(self) -> str:
        """``Content-Type`` of the record (``""`` when absent)."""
        if self._ctype is None:
            self._ctype = self._get("Content-Type") or ""
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


# WARC-Type by FastWARC's integer code (the enum is not hashable); the codes FastWARC gives to
# types it does not know read the WARC-Type header instead
_FASTWARC_TYPES = {
    int(getattr(WarcRecordType, name)): name
    for name in dir(WarcRecordType)
    if not name.startswith("_") and name not in ("any_type", "no_type", "unknown")
}
#: FastWARC's integer code of ``metadata`` records
FASTWARC_METADATA = int(WarcRecordType.metadata)


def iter_fastwarc_raw(stream: BinaryIO) -> Iterator[tuple[Any, int]]:
    """``(FastWARC record, offset)`` of a WARC stream (gzip/zstd/lz4 detected), with stream
    errors classified and several records in one gzip member refused (:class:`NonChunkedGzip`).
    """
    it = FastwarcIterator(stream, parse_http=False, fsspec_args=False, quirks_mode=True)
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
        if rec.content_length == 0 and _int_or_none(rec.headers.get("Content-Length")):
            # field names are case-insensitive (WARC 1.1 section 4), but FastWARC matches them
            # case-sensitively: a ``content-length`` header leaves it a 0-byte block and the
            # record's bytes skipped, so this file is warcio's
            raise ReaderCannot(f"FastWARC cannot read the block of the record at {pos}")
        prev = pos
        yield rec, pos


def fastwarc_record(rec: Any, pos: int, reader: BlockReader | None = None) -> Record:
    """A :class:`Record` over a FastWARC record (``reader`` replaces its block reader)."""
    h = rec.headers
    # the parsed type and length save header lookups; anything unusual reads the header
    warc_type = _FASTWARC_TYPES.get(int(rec.record_type))
    if warc_type is None:
        warc_type = (h.get("WARC-Type") or "").lower()
    length = rec.content_length
    if length <= 0:
        length = _int_or_none(h.get("Content-Length"))
    return Record(pos, warc_type, None, None, length, reader or rec.reader, h.get)


def iter_fastwarc(stream: BinaryIO) -> Iterator[Record]:
    """Records of a WARC stream read with FastWARC (gzip/zstd/lz4 detected)."""
    for rec, pos in iter_fastwarc_raw(stream):
        yield fastwarc_record(rec, pos)


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
    it = WarcioIterator(stream, arc2warc=True, no_record_parse=True, check_digests=False)
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
        # warcio strips the brackets of a wget-style ``<uri>`` itself, not other URI forms
        uri = warc_uri(h.get_header("WARC-Target-URI"))
        yield Record(
            it.offset,  # start of this record; get_record_offset() would read it to the end
            (rec.rec_type or "").lower(),
            uri,
            h.get_header("Content-Type") or "",
            _int_or_none(h.get_header("Content-Length")),
            rec.raw_stream,
            h.get_header,
        )


class GunzipStream(io.RawIOBase):
    """Every gzip member of ``raw``, decompressed, as one stream; a file cut inside a member
    ends where its bytes end (and sets ``cut``) instead of raising.

    ``gzip.GzipFile`` raises ``EOFError`` on a cut member, from inside a reader's buffered read:
    FastWARC then loses the records it had not yet handed on, and warcio takes the error for the
    end of the file, silently. Ending the stream instead lets a reader see the record the cut
    falls in as short (``truncated_record``, its complete tags kept). Corrupt deflate data
    still raises ``zlib.error``; bytes after the last member that are not gzip end the stream.
    """

    def __init__(self, raw: BinaryIO, chunk: int = 1 << 16) -> None:
        super().__init__()
        self._raw, self._chunk = raw, chunk
        self._d = zlib.decompressobj(31)
        self._buf = memoryview(b"")  # decompressed bytes not yet read
        self._done = False
        self._pos = 0
        self._error: zlib.error | None = None  # raised once what came before it is read
        self.cut = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # forward only, as readers skip blocks by seeking (FastWARC does)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._pos + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self._pos:
            raise io.UnsupportedOperation("a gzip stream seeks forward only")
        while self._pos < target and self.read(min(target - self._pos, 1 << 20)):
            pass
        return self._pos

    def readinto(self, b: Any) -> int:
        while not self._buf and not self._done:
            self._fill()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]  # a view: no copy of the rest
        self._pos += n
        return n

    def _fill(self) -> None:
        if self._error is not None:
            raise self._error
        d = self._d
        if d.eof:
            rest = d.unused_data
            while len(rest) < 2:
                more = self._raw.read(self._chunk)
                if not more:
                    break
                rest += more
            if rest[:2] != b"\x1f\x8b":
                self._done = True  # the last member (and any padding after it)
                return
            self._d = d = zlib.decompressobj(31)
            data = rest
        else:
            data = d.unconsumed_tail or self._raw.read(self._chunk)
            if not data:
                self._done = True
                self.cut = True  # the file ends inside a member
                return
        saved = d.copy()
        try:
            # bounded output per call: a small member may inflate to many MB
            out = d.decompress(data, 1 << 20)
        except zlib.error as err:
            # zlib gives nothing of a call that meets corrupt data: decode the same bytes again
            # in small steps, so the records before the corruption are read, then raise
            out, self._error = self._salvage(saved, data), err
        self._buf = memoryview(out)

    @staticmethod
    def _salvage(d: Any, data: bytes, step: int = 512, cap: int = 8 << 20) -> bytes:
        parts, n = [], 0
        for i in range(0, len(data), step):
            try:
                part = d.decompress(data[i : i + step])
            except zlib.error:
                break
            parts.append(part)
            n += len(part)
            if n > cap:
                break
        return b"".join(parts)


#: compressed bytes per ``decompress()`` call of :func:`inflate_members`: a member's end is found
#: from what its last call leaves unused, which zlib returns as a copy, so small steps keep that
#: copy small (Common Crawl's WAT members are 1-5 KB compressed)
_MEMBER_STEP = 1 << 12


def inflate_members(
    buf: bytes, pos: int, final: bool, decompressobj: Callable[[int], Any], error: type, cap: int
) -> tuple[list[tuple[int, bytes]], int, int]:
    """The gzip members that start at ``buf[pos:]``, each inflated whole by a fresh
    ``decompressobj(31)``: ``(members, pos, status)`` as ``_speedups.inflate_members`` (its
    compiled twin, which tests hold equal) documents. ``status``: 0 at the end of ``buf``, 1 when
    the member at ``pos`` needs more bytes, 2 at a member not read here.
    """
    members: list[tuple[int, bytes]] = []
    view = memoryview(buf)
    while pos < len(buf):
        if len(buf) - pos < 2:
            return members, pos, 2 if final else 1
        if buf[pos : pos + 2] != b"\x1f\x8b":
            return members, pos, 2
        d, parts, size, at = decompressobj(31), [], 0, pos
        while True:
            step = view[at : at + _MEMBER_STEP]
            if not step:
                return members, pos, 2 if final else 1
            try:
                out = d.decompress(step)
            except error:
                return members, pos, 2
            parts.append(out)
            size += len(out)
            if d.eof:
                at += len(step) - len(d.unused_data)
                break
            at += len(step)
            if size > cap:
                return members, pos, 2
        members.append((pos, parts[0] if len(parts) == 1 else b"".join(parts)))
        pos = at
    return members, pos, 0


# a plain WARC record header: "Name: value" lines, printable ASCII names, values printable or
# UTF-8 (anything else, folded lines included, is left to FastWARC)
_PLAIN_HEAD = re.compile(rb"WARC/1\.[01]\r\n(?:[!-9;-~]+:[ -~\x80-\xff]*\r\n)+\r\n")
_PLAIN_LENGTH = re.compile(rb"\r\nContent-Length: ([0-9]{1,12})\r\n")
_PLAIN_TYPE = re.compile(rb"\r\nWARC-Type: ([a-z]+)\r\n")


def record_bounds(data: bytes) -> tuple[bytes, int, int] | None:
    """``(warc_type, block_start, block_end)`` of the one WARC record ``data`` holds, when it is
    plain (``_speedups.record_bounds``, its compiled twin, says what that is); None otherwise.
    """
    m = _PLAIN_HEAD.match(data)
    if m is None:
        return None
    head = data[: m.end() - 2]
    low = head.lower()
    length = _PLAIN_LENGTH.search(head)
    wtype = _PLAIN_TYPE.search(head)
    if (
        length is None
        or wtype is None
        or low.count(b"\r\ncontent-length:") != 1
        or low.count(b"\r\nwarc-type:") != 1
    ):
        return None
    end = m.end() + int(length.group(1))
    if len(data) != end + 4 or not data.endswith(b"\r\n\r\n"):
        return None  # several records in the member, or a block not as declared
    if not head.isascii():
        try:  # FastWARC reads invalid UTF-8 with replacement characters: its own way
            head.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return wtype.group(1), m.end(), end


def iter_gzip_members(stream: BinaryIO, cap: int) -> Iterator[tuple[int, bytes | None]]:
    """``(offset, bytes)`` of each gzip member of ``stream`` from where it is, inflated whole.

    The offset is the member's start in ``stream`` (``tell()`` based, as FastWARC's
    ``stream_pos``). The walk ends after yielding ``(offset, None)`` for the first member it
    does not read: not gzip (padding, plain bytes), corrupt, cut short by the end of the file, or
    inflating to more than ``cap`` bytes; the caller hands the stream from ``offset`` on to a
    reader that names what is wrong. It ends silently at the end of the stream.

    zlib-ng inflates Common Crawl's members twice as fast as the zlib FastWARC is built with
    (0.67 s against 1.3 s for a 100 MB WAT here), which is why this walk exists beside FastWARC;
    the loop over members is compiled (``_speedups.inflate_members``) where it was built.
    """
    fast = common.speedups  # read at call time: tests switch it off
    inflate = inflate_members if fast is None else fast.inflate_members
    base, buf, final = stream.tell(), b"", False
    while True:
        if not final:
            more = stream.read(96 << 10)  # under the 128 KB mmap threshold: no page faults a read
            final = not more
            buf += more
        members, pos, status = inflate(buf, 0, final, zlib_ng.decompressobj, zlib_ng.error, cap)
        for offset, data in members:
            yield base + offset, data
        if status == 2:
            yield base + pos, None
            return
        if final and status == 0:
            return
        base += pos
        buf = buf[pos:]


_ARC_MAX_LINE = 1 << 16


# what starts an ARC header line: a URL's scheme (http:, dns:, filedesc:...)
_ARC_URL_START = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*:")


def iter_arc(
    stream: BinaryIO, on_bad: Callable[[int, StreamError], None] | None = None
) -> Iterator[Record]:
    """Records of a plain (decompressed) ARC v1 or v2 stream, offsets in that stream.

    An ARC record is one header line (v1: ``URL IP DATE MIME LENGTH``; v2 adds result code,
    checksum, location, offset and file name before ``LENGTH``) and ``LENGTH`` bytes. Records are
    framed by their lengths alone, so a record not followed by its newline (as Heritrix wrote
    some) does not lose the next one. Fields are counted from the right: a URL may hold spaces.
    The file's ``filedesc://`` record is ``warcinfo``, an ``http(s)`` record ``response`` (its
    block is the HTTP message), anything else (``dns:``...) ``resource``.

    A header line that cannot be read (no length, a negative one, a lying length that lands
    inside the next record) goes to ``on_bad(offset, error)`` and the stream is read on from the
    next line that reads as a header (``invalid_record`` raised when ``on_bad`` is None).
    """
    pos, fields_after_url, lost = 0, 4, False
    while True:
        try:
            line = stream.readline(_ARC_MAX_LINE)
        except (OSError, EOFError, zlib.error, ValueError) as err:
            raise classify_stream_error(err) from err
        if not line:
            return
        offset = pos
        pos += len(line)
        if not line.strip():
            continue  # the newline between records
        fields = line.rstrip(b"\r\n").split(b" ")
        if (
            len(fields) <= fields_after_url
            or not fields[-1].isdigit()
            or _ARC_URL_START.match(fields[0]) is None
        ):
            if lost:
                continue  # still inside the block whose header could not be read
            err = StreamError(
                "invalid_record", f"not an ARC header line at {offset}: {line[:80]!r}"
            )
            if on_bad is None:
                raise err
            on_bad(offset, err)
            lost = True
            continue
        lost = False
        length = int(fields[-1])
        url = warc_uri(b" ".join(fields[:-fields_after_url]).decode("utf-8", "replace"))
        mime = fields[-fields_after_url + 2].decode("latin-1")
        block = LimitReader(stream, length)
        reader: BlockReader = block
        if url.startswith("filedesc://"):
            head = block.read(min(length, 256))
            if head.split(b" ", 1)[0].strip() == b"2":
                fields_after_url = 9  # v2 header lines from here on
            reader = PrefixedReader(head, block)
            warc_type = "warcinfo"
        else:
            warc_type = "response" if url.startswith(("http://", "https://")) else "resource"
        try:
            yield Record(offset, warc_type, url, mime, length, reader)
            while block.read(1 << 20):  # the rest of the block, unread
                pass
        except (OSError, EOFError, zlib.error, ValueError) as err:
            raise classify_stream_error(err) from err
        pos += length


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
