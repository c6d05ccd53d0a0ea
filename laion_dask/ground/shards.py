"""Webdataset tar shards as img2dataset writes them: ``KEY.jpg``, ``KEY.txt``, ``KEY.json``.

Writing goes to a temporary name and is renamed when complete, so a killed task never leaves a
half shard under the final name. Reading returns the members grouped by key.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import pandas as pd

__all__ = ["ShardSample", "write_shard", "iter_shard", "read_shard_images", "make_key"]


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
