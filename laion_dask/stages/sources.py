"""What to read: local files, globs, fsspec URLs and Common Crawl crawl ids.

``expand_inputs`` turns the user's list into concrete file paths/URLs (one per partition);
``open_input`` opens one of them as a binary stream (anonymous for ``s3://``).

A crawl id such as ``CC-MAIN-2024-22`` expands through the crawl's listing,
``{crawl_base_url}crawl-data/CC-MAIN-2024-22/wat.paths.gz`` (or ``warc.paths.gz``), whose lines
are paths relative to ``crawl_base_url``. A local or remote ``*.paths`` / ``*.paths.gz`` listing
given directly expands the same way.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import logging
import os
import random
import re
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import fsspec

from laion_dask.ground.config import InputConfig

__all__ = [
    "expand_inputs",
    "open_input",
    "local_path",
    "is_crawl_id",
    "crawl_listing_url",
    "read_listing",
]

log = logging.getLogger(__name__)

_CRAWL_ID = re.compile(r"^CC-(?:MAIN|NEWS)-\d{4}-\d{2}$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_READ_BLOCK = 1 << 20


def is_crawl_id(text: str) -> bool:
    """``CC-MAIN-2024-22`` style ids (also ``CC-NEWS-2024-05``)."""
    return _CRAWL_ID.match(text) is not None


def crawl_listing_url(crawl_id: str, cfg: InputConfig) -> str:
    """URL of the ``wat.paths.gz`` / ``warc.paths.gz`` listing of one crawl."""
    return _join_base(cfg, f"crawl-data/{crawl_id}/{cfg.crawl_format}.paths.gz")


def _storage_options(path: str) -> dict:
    return {"anon": True} if path.startswith("s3://") else {}


def local_path(path: str) -> str | None:
    """The file system path of a local input (plain or ``file://``), None for a remote URL."""
    if path.startswith("file://"):
        return path[len("file://") :]
    return None if _URL.match(path) else path


@contextlib.contextmanager
def open_input(path: str) -> Iterator[BinaryIO]:
    """Open a local path or fsspec URL for binary reading (``s3://`` anonymously).

    The stream is read sequentially; nothing is loaded whole.

    Raises
    ------
    FileNotFoundError
        The file does not exist (the message names it).
    """
    local = local_path(path)
    if local is not None:
        with open(local, "rb", buffering=_READ_BLOCK) as fh:
            yield fh
        return
    try:
        of = fsspec.open(path, "rb", **_storage_options(path))
        fh = of.open()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"input not found: {path}") from err
    try:
        yield fh
    finally:
        fh.close()


def read_listing(path: str) -> list[str]:
    """Lines of a ``*.paths(.gz)`` listing (local or URL), blank lines dropped."""
    try:
        with open_input(path) as fh:
            raw = fh.read()  # listings are small (~100 kB compressed for a whole crawl)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"path listing not found: {path}") from err
    except OSError as err:
        raise OSError(f"cannot read path listing {path}: {err}") from err
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise OSError(f"path listing {path} is not valid gzip: {err}") from err
    return [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]


def _join_base(cfg: InputConfig, rel: str) -> str:
    if _URL.match(rel) or rel.startswith("/"):
        return rel
    base = cfg.crawl_base_url if cfg.crawl_base_url.endswith("/") else cfg.crawl_base_url + "/"
    return base + rel


def _expand_one(item: str, cfg: InputConfig) -> list[str]:
    if is_crawl_id(item):
        url = crawl_listing_url(item, cfg)
        files = [_join_base(cfg, rel) for rel in read_listing(url)]
        log.info("crawl %s: %d %s files listed in %s", item, len(files), cfg.crawl_format, url)
        if not files:
            raise ValueError(f"crawl listing {url} for {item} is empty")
        return files
    if re.search(r"\.paths(?:\.gz)?$", item):
        files = [_join_base(cfg, rel) for rel in read_listing(item)]
        if not files:
            raise ValueError(f"path listing {item} is empty")
        return files
    local = local_path(item)
    if local is None:
        if _GLOB_CHARS.search(item):
            fs, _, _ = fsspec.core.get_fs_token_paths(item, storage_options=_storage_options(item))
            protocol = item.split("://", 1)[0]
            found = sorted(fs.glob(item))
            if not found:
                raise FileNotFoundError(f"no files match {item}")
            return [p if _URL.match(p) else f"{protocol}://{p}" for p in found]
        return [item]
    if _GLOB_CHARS.search(local):
        found = sorted(p for p in glob.glob(local, recursive=True) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"no files match {item}")
        return found
    if os.path.isdir(local):
        found = sorted(e.path for e in os.scandir(local) if e.is_file() and e.name[0] != ".")
        if not found:
            raise FileNotFoundError(f"input directory is empty: {item}")
        return found
    if not os.path.isfile(local):
        raise FileNotFoundError(f"input not found: {item}")
    return [item]


def expand_inputs(paths: Sequence[str], cfg: InputConfig) -> list[str]:
    """Concrete input files, in a stable order, after sampling and ``limit``.

    Parameters
    ----------
    paths
        Local files, directories, globs, fsspec URLs (``s3://commoncrawl/...``,
        ``https://data.commoncrawl.org/...``), ``*.paths(.gz)`` listings or crawl ids
        (``CC-MAIN-2024-22``). Empty = ``cfg.paths``.
    cfg
        ``crawl_format`` picks the listing of a crawl id; ``sample`` keeps that fraction of the
        files (a seeded, order-preserving choice), then ``limit`` keeps the first ones.

    Returns
    -------
    list[str]
        One entry per input file (duplicates removed, first occurrence kept).

    Raises
    ------
    FileNotFoundError
        A local file, directory or glob matches nothing; the message names the input.

    Examples
    --------
    >>> expand_inputs(["CC-MAIN-2024-22"], InputConfig(limit=2))  # doctest: +SKIP
    ['https://data.commoncrawl.org/crawl-data/CC-MAIN-2024-22/segments/.../...warc.wat.gz', ...]
    """
    items = list(paths) if paths else list(cfg.paths)
    if not items:
        raise ValueError("no inputs given (input.paths is empty)")
    # dict.fromkeys: duplicates removed, the first occurrence kept in place
    files = list(dict.fromkeys(f for item in items for f in _expand_one(str(item).strip(), cfg)))
    if cfg.sample is not None and cfg.sample < 1.0:
        k = max(1, round(len(files) * cfg.sample))
        keep = sorted(random.Random(cfg.seed).sample(range(len(files)), k))
        files = [files[i] for i in keep]
    if cfg.limit is not None:
        files = files[: cfg.limit]
    return files
