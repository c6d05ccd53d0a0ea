"""Alt-text clean-up and the hashes that identify a pair.

``clean_text`` is applied to every alt text before it becomes a pair, on the WAT and the WARC path
alike, so the two paths agree on the same page.
"""

from __future__ import annotations

import html
import re
import unicodedata

import ftfy
import mmh3
import numpy as np

from laion_dask.stages.extract import common

__all__ = [
    "clean_text",
    "laion_hash",
    "laion_hashes",
    "make_uid",
    "record_hashes",
    "pair_uids",
]

# Only the mojibake repairs: quote uncurling, width folding and ligature splitting would change
# legitimate text, and entities are unescaped once, before ftfy sees the text.
_FTFY = ftfy.TextFixerConfig(
    unescape_html=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    uncurl_quotes=False,
    fix_line_breaks=False,
    normalization="NFC",
    explain=False,
)
# C0/C1 controls that str.split() does not treat as whitespace
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")
_C1 = re.compile("[\x80-\x9f]")
# what UTF-8 read as Latin-1/cp1252 looks like: a lead byte as a letter (Â Ã â ð ...) followed by
# a continuation byte as a symbol (© ¶ € ™ ...). Legitimate text almost never has that pair.
_MOJIBAKE_PAIR = re.compile(
    "[\xc2-\xf4][\x80-\xbf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
    "\u2013\u2014\u2018-\u201a\u201c-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]"
)


def clean_text(text: str, max_chars: int = 2000) -> str:
    """Normalise one alt text: entities, mojibake, whitespace, length.

    Parameters
    ----------
    text
        Raw attribute value (from WAT JSON or HTML).
    max_chars
        Keep at most this many characters (after clean-up).

    Returns
    -------
    str
        The cleaned text; ``""`` when nothing but whitespace or controls remains.

    Examples
    --------
    >>> clean_text("  A&amp;B\\n  caf\\u00c3\\u00a9 ")
    'A&B café'
    """
    if not text:
        return ""
    if "&" in text:
        text = html.unescape(text)
    if not text.isascii():
        # C1 controls are never printable, so printable text skips that search
        if _MOJIBAKE_PAIR.search(text) or (not text.isprintable() and _C1.search(text)):
            # ftfy is the slow part (10-50 us a call), so only text that can be mojibake pays
            text = ftfy.fix_text(text, _FTFY)
        else:
            text = unicodedata.normalize("NFC", text)
    if text.isprintable():
        # the only printable whitespace is " ": split/join changes nothing without a double,
        # leading or trailing space
        if "  " in text or text[:1] == " " or text[-1:] == " ":
            text = " ".join(text.split())
    else:
        text = " ".join(_CONTROLS.sub("", text).split())
    if len(text) > max_chars:
        text = text[:max_chars].rstrip()
    return text


def laion_hashes(urls: list[str], texts: list[str]) -> np.ndarray:
    """:func:`laion_hash` of each pair, as int64."""
    fast = common.speedups
    if fast is not None:
        try:
            return np.frombuffer(fast.pair_hashes(urls, texts), np.int64)
        except TypeError:
            pass  # not lists of str: the Python loop decides
    h64 = mmh3.hash64
    pairs = zip(urls, texts, strict=True)
    return np.fromiter((h64((u + t).encode())[0] for u, t in pairs), np.int64, len(urls))


def laion_hash(url: str, text: str) -> int:
    """LAION's join key: ``mmh3.hash64(url + text)[0]`` (a signed int64).

    Text UTF-8 cannot encode (lone surrogates) raises UnicodeEncodeError; the string is encoded
    here because mmh3 5.3 crashes the interpreter on such a ``str``.

    Examples
    --------
    >>> laion_hash("http://a.b/c.jpg", "a cat") == laion_hash("http://a.b/c.jpg", "a cat")
    True
    """
    return mmh3.hash64((url + text).encode())[0]


_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / phi: spreads consecutive link indices apart
_M64 = (1 << 64) - 1


def _record_key(source_file: str, record_offset: int) -> str:
    return f"{source_file}\0{record_offset}"


def make_uid(source_file: str, record_offset: int, link_index: int) -> str:
    """Deterministic pair id: 16 hex chars identifying (file, record offset, link index).

    The record is hashed once (unsigned mmh3 64-bit of ``f"{source_file}\\0{record_offset}"``)
    and the link index mixed in with the splitmix64 finaliser, so a file's ids are computed
    in bulk by :func:`pair_uids` (one string hash per record, not per pair). The id does not
    depend on how files are split into partitions or on which reader parsed the file.

    Examples
    --------
    >>> make_uid("f.wat.gz", 123, 4) == make_uid("f.wat.gz", 123, 4)
    True
    """
    x = mmh3.hash64(_record_key(source_file, record_offset).encode(), signed=False)[0] & _M64
    x = (x + (link_index + 1) * _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return format(x ^ (x >> 31), "016x")


def record_hashes(source_file: str, offsets: list[int]) -> np.ndarray:
    """Unsigned mmh3 64-bit hash of each record's key (the first step of :func:`make_uid`)."""
    fast = common.speedups
    if fast is not None:
        try:
            prefix = _record_key(source_file, 0)[:-1].encode("utf-8")
            return np.frombuffer(fast.record_hashes(prefix, offsets), np.uint64)
        except (UnicodeEncodeError, ValueError, TypeError, OverflowError):
            pass  # a path UTF-8 cannot encode, an odd offset: the Python loop decides
    h64 = mmh3.hash64
    return np.fromiter(
        # encoded here: mmh3 5.3 crashes on a str holding lone surrogates
        (h64(_record_key(source_file, o).encode(), signed=False)[0] for o in offsets),
        np.uint64,
        len(offsets),
    )


def pair_uids(record_hash: np.ndarray, link_index: np.ndarray) -> np.ndarray:
    """:func:`make_uid` as uint64 for many pairs: ``record_hash`` repeated per pair + indices."""
    with np.errstate(over="ignore"):
        x = record_hash.astype(np.uint64) + (link_index.astype(np.uint64) + np.uint64(1)) * (
            np.uint64(_GOLDEN)
        )
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
