"""Webdataset tar shards as img2dataset writes them: ``KEY.jpg``, ``KEY.txt``, ``KEY.json``.

Writing goes to a temporary name and is renamed when complete, so a killed task never leaves a
half shard under the final name. Reading returns the members grouped by key.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pandas as pd

__all__ = [
    "ShardSample",
    "write_shard",
    "iter_shard",
    "read_shard_images",
    "read_images",
    "make_key",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSample:
    """One sample: ``key`` plus its image bytes, caption and JSON metadata."""

    key: str
    image: bytes
    text: str
    meta: Mapping[str, Any]
    ext: str = "jpg"


def make_key(shard_id: int, index: int, *, index_digits: int = 4) -> str:
    """img2dataset's key: zero-padded shard id followed by the row index within the shard."""
    digits = max(index_digits, len(str(index)))
    return f"{shard_id:05d}{index:0{digits}d}"


def _json_value(v: Any) -> Any:
    """Missing values (None, pd.NA, NaN) as JSON null, numpy scalars as Python values."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards: same input, same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples: Iterable[ShardSample]) -> int:
    """Write ``samples`` to the tar at ``path`` (local or fsspec URL); returns samples written."""
    tmp = f"{path}.tmp-{os.getpid()}"
    n = 0
    with (
        fsspec.open(tmp, "wb") as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for s in samples:
            _add(tar, f"{s.key}.{s.ext}", s.image)
            _add(tar, f"{s.key}.txt", s.text.encode("utf-8"))
            _add(
                tar,
                f"{s.key}.json",
                json.dumps(
                    {k: _json_value(v) for k, v in s.meta.items()}, sort_keys=True, default=str
                ).encode("utf-8"),
            )
            n += 1
    fs, _, (real_tmp,) = fsspec.get_fs_token_paths(tmp)
    _, _, (real_path,) = fsspec.get_fs_token_paths(path)
    fs.mv(real_tmp, real_path)
    return n


def iter_shard(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for each sample of one shard, in file order."""
    with fsspec.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        current: str | None = None
        members: dict[str, bytes] = {}
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.rpartition("/")[2].partition(".")
            fh = tar.extractfile(info)
            data = fh.read() if fh is not None else b""
            if current is not None and key != current:
                yield current, members
                members = {}
            current = key
            members[ext] = data
        if current is not None:
            yield current, members


def read_shard_images(path: str, keys: Iterable[str] | None = None) -> dict[str, bytes]:
    """Image bytes by key (``jpg``/``png``/``webp`` member) of one shard, or only of ``keys``."""
    wanted = set(keys) if keys is not None else None
    out: dict[str, bytes] = {}
    for key, members in iter_shard(path):
        if wanted is not None and key not in wanted:
            continue
        for ext in ("jpg", "jpeg", "png", "webp"):
            if ext in members:
                out[key] = members[ext]
                break
    return out


def read_images(image_root: str, keys: Sequence[Any], shards: Sequence[Any]) -> list[bytes | None]:
    """Image bytes of ``keys[i]`` from shard ``shards[i]`` under ``image_root``, in order.

    Each shard is read once. A missing key or shard (None/NA) gives None, and so does every
    key of a shard that cannot be read (missing, not a tar, cut short): logged with its path
    and the number of images it cost, never raised, so one bad shard costs only its rows.
    """
    wanted: dict[str, set[str]] = {}
    for key, shard in zip(keys, shards, strict=True):
        if not pd.isna(key) and not pd.isna(shard):
            wanted.setdefault(str(shard), set()).add(str(key))
    found: dict[tuple[str, str], bytes] = {}
    for shard, names in sorted(wanted.items()):
        path = f"{image_root.rstrip('/')}/{shard}"
        try:
            images = read_shard_images(path, names)
        except (OSError, EOFError, tarfile.TarError) as err:
            log.warning("shard %s unreadable (%s): %d images missing", path, err, len(names))
            continue
        found.update(((shard, k), data) for k, data in images.items())
    return [
        None if pd.isna(k) or pd.isna(s) else found.get((str(s), str(k)))
        for k, s in zip(keys, shards, strict=True)
    ]
