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

__all__ = ["clean_text", "laion_hash", "make_uid"]

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


def laion_hash(url: str, text: str) -> int:
    """LAION's join key: ``mmh3.hash64(url + text)[0]`` (a signed int64).

    Examples
    --------
    >>> laion_hash("http://a.b/c.jpg", "a cat") == laion_hash("http://a.b/c.jpg", "a cat")
    True
    """
    return mmh3.hash64(url + text)[0]


def make_uid(source_file: str, record_offset: int, link_index: int) -> str:
    """Deterministic pair id: 16 hex chars of the unsigned mmh3 64-bit hash of the location.

    The key is ``f"{source_file}\\0{record_offset}\\0{link_index}"``, so the id does not depend on
    how files are split into partitions or on which reader parsed the file.
    """
    key = f"{source_file}\0{record_offset}\0{link_index}"
    return format(mmh3.hash64(key, signed=False)[0], "016x")
