"""Small pieces the WAT and WARC parsers share."""

from __future__ import annotations

import importlib
import os
import re
from types import ModuleType
from typing import NamedTuple
from urllib.parse import urljoin, urlsplit

__all__ = ["BadRecord", "RawLink", "resolve_url", "Resolver", "speedups", "warc_uri"]


def _load_speedups() -> ModuleType | None:
    if os.environ.get("LAION_DASK_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        # by its full name: the compiled module is a leaf (it imports nothing of ours), but
        # import graphs cannot see a compiled module, so ``from <package> import _speedups``
        # reads to them as an import of the package's __init__, which imports this module
        return importlib.import_module(f"{__package__}._speedups")
    except ImportError:  # built without a C compiler: the Python twins give the same output
        return None


#: the compiled fast paths (``laion_dask/stages/extract/_speedups.c``), or None when they were
#: not built or ``LAION_DASK_PURE_PYTHON=1``: then the pure-Python code runs, with the same
#: output, slower. Read it as ``common.speedups`` at call time (tests switch it off).
speedups = _load_speedups()


def warc_uri(value: str | None) -> str:
    """A URI-valued WARC header field as the URI it holds (``""`` when absent).

    WARC 1.0's grammar writes every URI field as ``"<" uri ">"`` (section 5: ``uri = "<"
    <'URI' per RFC3986> ">"``), and wget, among others, writes ``WARC-Target-URI: <http://...>``;
    WARC 1.1 drops the brackets for ``WARC-Target-URI``, ``WARC-Refers-To-Target-URI`` and
    ``WARC-Profile``. Both forms give the bare URI: surrounding whitespace and one enclosing
    pair of angle brackets are removed, and a space inside is written ``%20``.

    Examples
    --------
    >>> warc_uri(" <http://a.example/x> ")
    'http://a.example/x'
    >>> warc_uri("http://a.example/x")
    'http://a.example/x'
    """
    if not value:
        return ""
    value = value.strip()
    if len(value) >= 2 and value[0] == "<" and value[-1] == ">":
        value = value[1:-1].strip()
    # a URI holds no space; some writers (and ARC headers) keep the one a link had, and
    # warcio encodes it: both readers give the same URI
    return value.replace(" ", "%20") if " " in value else value


class BadRecord(Exception):
    """One record cannot be used; ``kind`` is the counter it goes to in ``bad_records``."""

    def __init__(self, kind: str, message: str = "") -> None:
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind


class RawLink(NamedTuple):
    """An image link as found in a record, before alt-text clean-up."""

    index: int  # position among the record's links (WAT) or <img> elements (WARC)
    url: str  # absolute when it could be resolved, else as written
    alt: str


def resolve_url(base: str, url: str) -> str:
    """``urljoin`` that keeps the URL as written when it cannot be parsed (bad IPv6 host...)."""
    url = url.strip()
    if not base or url.startswith(("http://", "https://", "data:")):
        return url
    try:
        return urljoin(base, url)
    except ValueError:
        return url


# dot segments, a possible scheme, characters urljoin strips or treats specially
_NEEDS_URLJOIN = re.compile(r"\./|/\.|[\t\n\r:\\]")
# scheme, netloc (up to / ? #), path (up to ? #) of a simple absolute base URL
_SIMPLE_BASE = re.compile(r"(https?)://([^/?#\[\]]+)(?=[/?#]|$)([^?#]*)")


class Resolver:
    """``resolve_url`` against one base, with a fast path for the common relative forms.

    ``urljoin`` costs ~10 us; most image URLs are absolute, ``/path`` or ``dir/file`` without
    dot segments, where joining is string concatenation. Anything else (dot segments, ``?``/``#``
    only, a colon that may start a scheme, characters urljoin strips) goes to ``urljoin``, so the
    result is always what ``urljoin`` gives.
    """

    __slots__ = ("base", "root", "folder")

    def __init__(self, base: str) -> None:
        self.base = base
        self.root = self.folder = ""
        m = _SIMPLE_BASE.match(base) if base.isprintable() and " " not in base else None
        if m is not None and m.group(2).isascii():
            # what urlsplit gives for a lower-case http(s) URL, printable, no space, its host
            # ASCII without IPv6 brackets (only a non-ASCII host is checked further by urlsplit,
            # a path may be any text): the same split without its ~4 us of bookkeeping
            scheme, netloc, path = m.groups()
        else:
            try:
                parts = urlsplit(base)
            except ValueError:
                return
            scheme, netloc, path = parts.scheme, parts.netloc, parts.path
        if scheme in ("http", "https") and netloc:
            self.root = f"{scheme}://{netloc}"
            path = path or "/"
            if "/." in path:
                self.root = ""  # a base with dot segments: let urljoin normalise it
                return
            self.folder = self.root + path[: path.rfind("/") + 1]

    def __call__(self, url: str) -> str:
        """Absolute form of ``url``."""
        url = url.strip()
        if url.startswith(("http://", "https://")) or not self.root:
            return (
                url
                if url.startswith(("http://", "https://", "data:"))
                else resolve_url(self.base, url)
            )
        if not url or url[0] in "?#." or _NEEDS_URLJOIN.search(url):
            return resolve_url(self.base, url)
        if url.startswith("//"):
            if len(url) > 2 and url[2].isalnum():
                return self.root.split("//", 1)[0] + url
            return resolve_url(self.base, url)
        if url[0] == "/":
            return self.root + url
        return self.folder + url
