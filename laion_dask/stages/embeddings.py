"""Embeddings as clip-retrieval lays them out, so its index and search tools read them as is.

``out_dir/img_emb/img_emb_{part}.npy`` and ``text_emb/text_emb_{part}.npy`` hold float16
L2-normalised rows; ``metadata/metadata_{part}.parquet`` holds the same rows, in the same
order, with their ``key``. Each file is written under a temporary name and renamed, the
metadata last, so a part whose metadata exists is complete.

:class:`ScoreResult` (what the scoring stage returns for one partition) is defined here, not in
:mod:`~laion_dask.stages.clip`: it is these rows, and the writer below only needs their shape,
so clip imports this module and never the reverse.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd

from laion_dask.ground import schema

__all__ = [
    "ScoreResult",
    "write_embedding_arrays",
    "read_embeddings",
    "read_array",
    "embedding_parts",
    "embedding_paths",
]

log = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    """One scored partition: the frame plus float16 unit-norm embeddings aligned with ``keys``."""

    frame: pd.DataFrame
    image_embeddings: np.ndarray
    text_embeddings: np.ndarray
    keys: list[str]


def embedding_paths(out_dir: str, part: int) -> dict[str, str]:
    """The three file paths of one part."""
    base = out_dir.rstrip("/")
    return {
        "img": f"{base}/img_emb/img_emb_{part}.npy",
        "text": f"{base}/text_emb/text_emb_{part}.npy",
        "metadata": f"{base}/metadata/metadata_{part}.parquet",
    }


def _atomic_write(path: str, data: bytes) -> None:
    fs, _, (real,) = fsspec.get_fs_token_paths(path)
    fs.makedirs(real.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{real}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, real)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float16))
    return buf.getvalue()


def write_embedding_arrays(
    out_dir: str,
    part: int,
    keys: Sequence[str],
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    metadata: pd.DataFrame,
) -> None:
    """Write one part's image/text embeddings and row-aligned metadata (local or fsspec URL).

    Parameters
    ----------
    out_dir
        ``RUN/embeddings``.
    part
        Partition number, used in the file names.
    keys, image_embeddings, text_embeddings
        Row ``i`` of both arrays belongs to ``keys[i]`` (a :class:`ScoreResult`'s fields).
    metadata
        Rows with a ``key`` column (typically the scored frame); the rows of ``keys`` are
        written in that order.
    """
    n = len(keys)
    if image_embeddings.shape[0] != n or text_embeddings.shape[0] != n:
        raise ValueError("embeddings and keys differ in length")
    key_frame = pd.DataFrame({schema.KEY: pd.array(list(keys), dtype="string")})
    meta = metadata.assign(**{schema.KEY: metadata[schema.KEY].astype("string")})
    meta = key_frame.merge(meta, on=schema.KEY, how="left", validate="one_to_one")
    paths = embedding_paths(out_dir, part)
    _atomic_write(paths["img"], _npy_bytes(image_embeddings))
    _atomic_write(paths["text"], _npy_bytes(text_embeddings))
    buf = io.BytesIO()
    meta.to_parquet(buf, index=False)
    _atomic_write(paths["metadata"], buf.getvalue())
    log.debug("wrote %d embeddings to part %d of %s", n, part, out_dir)


def embedding_parts(out_dir: str) -> list[int]:
    """Complete parts, in order: those whose metadata (written last) exists."""
    fs, _, (root,) = fsspec.get_fs_token_paths(out_dir)
    folder = f"{root}/metadata"
    if not fs.exists(folder):
        return []
    found = (re.search(r"metadata_(\d+)\.parquet$", p) for p in fs.ls(folder, detail=False))
    return sorted(int(m.group(1)) for m in found if m)


def read_array(path: str) -> np.ndarray:
    """One ``.npy`` file (local or fsspec URL), read whole."""
    with fsspec.open(path, "rb") as fh:
        return np.load(io.BytesIO(fh.read()))


def read_embeddings(out_dir: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """All complete parts, in part order: (image float16, text float16, metadata).

    A part counts when its metadata file exists; a part whose arrays are missing or whose
    lengths disagree raises ``ValueError``.
    """
    img_list, txt_list, meta_list = [], [], []
    for part in embedding_parts(out_dir):
        paths = embedding_paths(out_dir, part)
        try:
            img, txt = read_array(paths["img"]), read_array(paths["text"])
        except FileNotFoundError as err:
            raise ValueError(
                f"{out_dir}: part {part} has metadata but no embedding arrays"
            ) from err
        meta = pd.read_parquet(paths["metadata"])
        if not len(img) == len(txt) == len(meta):
            raise ValueError(f"{out_dir}: part {part} arrays and metadata differ in length")
        img_list.append(img)
        txt_list.append(txt)
        meta_list.append(meta)
    if not meta_list:
        return (np.zeros((0, 0), np.float16), np.zeros((0, 0), np.float16), pd.DataFrame())
    return (
        np.concatenate(img_list),
        np.concatenate(txt_list),
        pd.concat(meta_list, ignore_index=True),
    )
