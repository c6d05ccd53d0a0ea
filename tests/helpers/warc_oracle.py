"""An independent reference parse of WARC, ARC and WAT files, for the conformance suite.

It shares no code with ``laion_dask.stages.extract``: warcio frames the records and undoes the
HTTP transfer and content encodings, ``lxml.html`` parses the pages, ``urllib`` resolves the
URLs, ``json`` reads WAT records. Where warcio gives up part-way (a record not followed by its
blank line, a gzip member holding several records), a small scanner of its own frames the
records from the file's decompressed bytes and hands each one to warcio alone.

Where the extractor follows a documented rule that a naive parse would not, the oracle applies
the same rule rather than the suite loosening its bounds:

- WARC 1.0 writes URIs as ``<uri>`` (its grammar's ``uri = "<" <'URI'> ">"``): stripped;
- a page without a usable Content-Type (none, ``text/plain``, ``octet-stream``) is HTML when it
  starts like HTML (``<!doctype html``, ``<html``, ``<head``, ``<body``);
- an ``<img>`` without ``src`` takes the first candidate of its ``srcset``;
- alt text is cleaned only as far as DESIGN.md's rule says: entities, control characters and
  whitespace; a pair needs alt text left after that;
- a record cut short keeps the tags complete before the cut (its text up to the last ``>``).

Run as ``python -m tests.helpers.warc_oracle FILE...`` to print ours against the oracle.
"""

from __future__ import annotations

import codecs
import html
import io
import json
import re
import sys
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import brotli  # FastWARC depends on it, so it is installed with the package
import lxml.html
from lxml import etree
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

__all__ = ["OracleResult", "reference_pairs", "jaccard", "ARCHIVE_SUFFIXES", "archive_files"]

#: the names of the files the suite runs on (``.paths.gz`` listings and plain gzip are left out)
ARCHIVE_SUFFIXES = (
    ".warc",
    ".warc.gz",
    ".wat",
    ".wat.gz",
    ".wet",
    ".wet.gz",
    ".arc",
    ".arc.gz",
    ".warc.gz.bad",
)


def archive_files(root: Path) -> list[str]:
    """Every WARC/ARC/WAT/WET file under ``root``, relative, sorted (``[]`` when absent)."""
    if not root.is_dir():
        return []
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES)
    )


@dataclass
class OracleResult:
    """Pairs ``(url, text, page_url)`` of one file and what the oracle could not use."""

    pairs: list[tuple[str, str, str]] = field(default_factory=list)
    framing: str = "warcio"  # warcio | warcio+gunzip | scan
    html_records: int = 0
    truncated: int = 0  # HTML records cut short (pairs kept from their complete part)
    undecodable: int = 0  # HTML records whose HTTP body warcio could not decode
    pages_with_pairs: set[str] = field(default_factory=set)


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b|; 1.0 for two empty sets."""
    return len(a & b) / len(a | b) if a or b else 1.0


# --- records -----------------------------------------------------------------------------------


@dataclass
class _Rec:
    kind: str  # response | resource | metadata | other
    uri: str
    ctype: str  # the HTTP Content-Type, or the record's for resource/metadata records
    body: bytes | None  # decoded payload; None when warcio could not decode it
    truncated: bool


def _uri(value: str | None) -> str:
    value = (value or "").strip()
    if len(value) >= 2 and value[0] == "<" and value[-1] == ">":
        value = value[1:-1].strip()
    return value


def _read_warcio(fh: io.BufferedIOBase) -> list[_Rec]:
    out = []
    for rec in ArchiveIterator(fh, arc2warc=True, check_digests=False):
        kind = rec.rec_type if rec.rec_type in ("response", "resource", "metadata") else "other"
        if kind == "other":
            continue
        uri = _uri(rec.rec_headers.get_header("WARC-Target-URI"))
        if rec.http_headers is not None and kind == "response":
            ctype = rec.http_headers.get_header("Content-Type") or ""
        else:
            ctype = rec.rec_headers.get_header("Content-Type") or ""
        try:
            body: bytes | None = rec.content_stream().read()
        except (OSError, EOFError, ValueError, zlib.error):
            body = None  # an encoded body that does not decode
        encoding = rec.http_headers.get_header("Content-Encoding") if rec.http_headers else None
        if body is not None and (encoding or "").strip().lower() == "br":
            body = _unbrotli(body)  # warcio decodes br only through brotlicffi
        # bytes the record declared but the file did not hold
        truncated = bool(getattr(rec.raw_stream, "limit", 0))
        out.append(_Rec(kind, uri, ctype, body, truncated))
    return out


def _unbrotli(body: bytes) -> bytes | None:
    if body.lstrip()[:1] == b"<":
        return body  # stored decoded, the header kept
    try:
        return brotli.decompress(body)
    except brotli.error:
        return None


def _gunzip_all(data: bytes) -> bytes:
    """Every gzip member's bytes, keeping what a truncated or corrupt last member gave."""
    if data[:2] != b"\x1f\x8b":
        return data
    out = []
    while data[:2] == b"\x1f\x8b":
        d = zlib.decompressobj(31)
        try:
            out.append(d.decompress(data))
        except zlib.error:
            break
        if not d.eof:
            break
        data = d.unused_data
    return b"".join(out)


_WARC_START = re.compile(rb"WARC/\d+\.\d+\r?\n")
_ARC_LINE = re.compile(rb"(\S+(?: \S+)*?) (\S+) (\d{14}) (\S+) (\d+)\r?\n")
# ARC v2: URL IP DATE MIME RESULT-CODE CHECKSUM LOCATION OFFSET FILENAME LENGTH
_ARC2_LINE = re.compile(rb"(\S+(?: \S+)*?) (\S+) (\d{14}) (\S+) \S+ \S+ \S+ \S+ \S+ (\d+)\r?\n")


def _scan_frames(data: bytes) -> list[bytes]:
    """Records framed by their declared lengths alone, whatever lies between them; ARC v2
    header lines rewritten as v1 lines (warcio reads v1 only)."""
    arc_line = _ARC2_LINE if _arc_version(data) == 2 else _ARC_LINE
    frames, pos, n = [], 0, len(data)
    while pos < n:
        while pos < n and data[pos : pos + 1] in b"\r\n":
            pos += 1
        if pos >= n:
            break
        m = _WARC_START.match(data, pos)
        if m is not None:
            head_end = data.find(b"\r\n\r\n", pos)
            sep = 4
            if head_end < 0 or data.find(b"\n\n", pos, head_end) >= 0:
                head_end, sep = data.find(b"\n\n", pos), 2
            if head_end < 0:
                break
            cl = re.search(rb"(?im)^content-length:[ \t]*(\d+)", data[pos:head_end])
            end = head_end + sep + (int(cl.group(1)) if cl else 0)
        else:
            line_end = data.find(b"\n", pos)
            line = data[pos : line_end + 1] if line_end >= 0 else b""
            a = arc_line.fullmatch(line)
            if a is None:
                nxt = _WARC_START.search(data, pos + 1)
                if nxt is None:
                    break
                pos = nxt.start()
                continue
            end = line_end + 1 + int(a.group(5))
            v1 = b" ".join(a.group(1, 2, 3, 4, 5)) + b"\n"
            frames.append(v1 + data[line_end + 1 : end])
            pos = end
            continue
        frames.append(data[pos:end])
        pos = end
    return frames


def _arc_version(data: bytes) -> int:
    if not data.startswith(b"filedesc://"):
        return 1
    lines = data.split(b"\n", 2)
    return 2 if len(lines) > 1 and lines[1][:2] == b"2 " else 1


def _read_scan(data: bytes) -> list[_Rec]:
    out: list[_Rec] = []
    desc = b""
    for frame in _scan_frames(_gunzip_all(data)):
        if frame.startswith(b"filedesc://"):
            desc = frame  # each ARC record is read with the file's header in front
            continue
        stream = io.BytesIO((desc + b"\n" if desc else b"") + frame + b"\r\n\r\n")
        try:
            out += _read_warcio(stream)
        except Exception:  # noqa: BLE001 - a frame warcio refuses is left out, as its pairs
            continue
    return out


def _records(path: Path) -> tuple[list[_Rec], str]:
    data = path.read_bytes()
    if _arc_version(_gunzip_all(data[:65536]) if data[:2] == b"\x1f\x8b" else data) == 2:
        return _read_scan(data), "scan"  # warcio reads ARC v1 only
    try:
        with open(path, "rb") as fh:
            return _read_warcio(fh), "warcio"
    except ArchiveLoadFailed as err:
        if "non-chunked" in str(err):
            try:
                # decompressed here, keeping a cut last member: warcio over gzip.open would
                # take the EOFError of a cut file for its end and silently drop records
                return _read_warcio(io.BytesIO(_gunzip_all(data))), "warcio+gunzip"
            except (ArchiveLoadFailed, OSError, EOFError, ValueError):
                pass
    except (OSError, EOFError, ValueError):
        pass
    return _read_scan(data), "scan"


# --- HTML --------------------------------------------------------------------------------------

_LOOKS_HTML = re.compile(rb"^\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)", re.I | re.S)
_CHARSET = re.compile(r"charset\s*=\s*[\"']?\s*([\w.:-]+)", re.I)
_WHATWG = {"iso8859-1": "cp1252", "ascii": "cp1252", "latin-1": "cp1252", "gb2312": "gb18030"}


def _is_html(ctype: str, body: bytes) -> bool:
    low = ctype.lower()
    if "html" in low:
        return True
    if low and "text/plain" not in low and "octet-stream" not in low:
        return False
    return _LOOKS_HTML.match(body[:1024]) is not None


def _charset(body: bytes, ctype: str) -> str:
    if body.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    meta = re.search(rb"<meta[^>]+?charset\s*=\s*[\"']?\s*([\w.:-]+)", body[:4096], re.I)
    for cand in (_CHARSET.search(ctype), meta):
        if cand is None:
            continue
        name = cand.group(1)
        name = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            name = codecs.lookup(name).name
        except LookupError:
            continue
        return _WHATWG.get(name, name)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return "cp1252"
    return "utf-8"


def _clean_alt(alt: str) -> str:
    if "&" in alt:
        alt = html.unescape(alt)  # entities written twice (``&amp;amp;``) in the page
    alt = "".join(" " if unicodedata.category(c) == "Cc" else c for c in alt)
    return " ".join(alt.split())


def _join(base: str, url: str) -> str:
    try:
        return urljoin(base, url)
    except ValueError:
        return url


def _html_pairs(body: bytes, ctype: str, page: str) -> list[tuple[str, str, str]]:
    text = body.decode(_charset(body, ctype), "replace")
    parser = lxml.html.HTMLParser(encoding="utf-8")
    try:
        doc = lxml.html.document_fromstring(text.encode("utf-8", "replace"), parser=parser)
    except (etree.ParserError, ValueError):
        return []
    base = page
    for el in doc.iter("base"):
        href = (el.get("href") or "").strip()
        if href:
            base = _join(page, href)
            break
    out = []
    for el in doc.iter("img"):
        alt = el.get("alt")
        src = (el.get("src") or "").strip()
        if not src:
            first = (el.get("srcset") or "").strip().split(",")[0].split()
            src = first[0] if first else ""
        if alt is None or not src:
            continue
        text_ = _clean_alt(alt)
        if text_:
            out.append((_join(base, src), text_, page))
    return out


# --- WAT ---------------------------------------------------------------------------------------


def _wat_pairs(body: bytes, header_uri: str) -> list[tuple[str, str, str]]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    env = doc.get("Envelope") if isinstance(doc, dict) else None
    if not isinstance(env, dict):
        return []
    page = _uri((env.get("WARC-Header-Metadata") or {}).get("WARC-Target-URI")) or header_uri
    meta = (
        (env.get("Payload-Metadata") or {})
        .get("HTTP-Response-Metadata", {})
        .get("HTML-Metadata", {})
    )
    base = (meta.get("Head") or {}).get("Base")
    base = _join(page, base) if base else page
    out = []
    for link in meta.get("Links") or []:
        if link.get("path") != "IMG@/src" or not link.get("url") or link.get("alt") is None:
            continue
        text_ = _clean_alt(link["alt"])
        if text_:
            out.append((_join(base, link["url"].strip()), text_, page))
    return out


# --- the reference -----------------------------------------------------------------------------


def _cut_at_last_tag(body: bytes) -> bytes:
    end = body.rfind(b">")
    return body[: end + 1] if end >= 0 else b""


def reference_pairs(path: Path) -> OracleResult:
    """The pairs an independent parse finds in one WARC, ARC or WAT file."""
    recs, framing = _records(Path(path))
    res = OracleResult(framing=framing)
    for rec in recs:
        if rec.kind == "metadata":
            if rec.body is not None and "json" in rec.ctype.lower() and not rec.truncated:
                found = _wat_pairs(rec.body, rec.uri)
                res.pairs += found
                if found:
                    res.pages_with_pairs.add(found[0][2])
            continue
        if rec.body is None:
            if "html" in rec.ctype.lower():
                res.undecodable += 1
            continue
        if not _is_html(rec.ctype, rec.body):
            continue
        res.html_records += 1
        body = rec.body
        if rec.truncated:
            res.truncated += 1
            body = _cut_at_last_tag(body)
        found = _html_pairs(body, rec.ctype, rec.uri)
        res.pairs += found
        if found:
            res.pages_with_pairs.add(rec.uri)
    res.pairs.sort()
    return res


def _main(argv: list[str]) -> None:
    # here only: the oracle itself never imports the extractor it is compared with
    from laion_dask.ground.config import ExtractConfig
    from laion_dask.stages.extract import extract_file

    root = Path(argv[0]) if len(argv) == 1 and Path(argv[0]).is_dir() else None
    names = archive_files(root) if root else argv
    print(f"{'file':72s} {'ours':>5s} {'oracle':>6s} {'jaccard':>7s}  framing  skips")
    for name in names:
        path = root / name if root else Path(name)
        ours = extract_file(str(path), ExtractConfig(skip_unreadable_files=True))
        ref = reference_pairs(path)
        j = jaccard(set(ours.pairs["url"]), {u for u, _, _ in ref.pairs})
        print(
            f"{name[-72:]:72s} {len(ours.pairs):5d} {len(ref.pairs):6d} {j:7.3f}  "
            f"{ref.framing:8s} {ours.summary.bad_records or ''}"
        )


if __name__ == "__main__":
    _main(sys.argv[1:])
