"""clip-retrieval embedding layout: write, read back, aligned rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.stages.embeddings import (
    ScoreResult,
    embedding_paths,
    read_embeddings,
    write_embedding_arrays,
)


def _result(keys: list[str], seed: int) -> ScoreResult:
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(len(keys), 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.normal(size=(len(keys), 8)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    frame = pd.DataFrame({schema.KEY: pd.array(keys, dtype="string")})
    return ScoreResult(frame, img.astype(np.float16), txt.astype(np.float16), keys)


def write_embeddings(out: str, part: int, r: ScoreResult, meta: pd.DataFrame) -> None:
    """What the score stage writes for one scored partition."""
    write_embedding_arrays(out, part, r.keys, r.image_embeddings, r.text_embeddings, meta)


def test_write_read_round_trip_in_clip_retrieval_layout(tmp_path) -> None:
    out = str(tmp_path / "embeddings")
    meta0 = pd.DataFrame({schema.KEY: ["a", "b", "c", "d"], "text": ["A", "B", "C", "D"]})
    r0 = _result(["c", "a"], 0)  # only some rows scored, in their own order
    r1 = _result(["x"], 1)
    write_embeddings(out, 0, r0, meta0)
    write_embeddings(out, 1, r1, pd.DataFrame({schema.KEY: ["x"], "text": ["X"]}))
    for part in (0, 1):
        for p in embedding_paths(out, part).values():
            assert (tmp_path / "embeddings").joinpath(p.split("embeddings/")[1]).is_file()
    assert not list((tmp_path / "embeddings").rglob("*.tmp-*"))
    img, txt, meta = read_embeddings(out)
    assert img.dtype == np.float16 and img.shape == (3, 8) and txt.shape == (3, 8)
    assert meta[schema.KEY].tolist() == ["c", "a", "x"]
    assert meta["text"].tolist() == ["C", "A", "X"]
    np.testing.assert_array_equal(img[:2], r0.image_embeddings)
    np.testing.assert_array_equal(txt[2:], r1.text_embeddings)
    np.testing.assert_array_equal(np.load(embedding_paths(out, 1)["img"]), r1.image_embeddings)


def test_misaligned_part_is_an_error(tmp_path) -> None:
    out = str(tmp_path / "e")
    write_embeddings(out, 0, _result(["a", "b"], 0), pd.DataFrame({schema.KEY: ["a", "b"]}))
    np.save(embedding_paths(out, 0)["img"], np.zeros((1, 8), np.float16))
    with pytest.raises(ValueError, match="differ in length"):
        read_embeddings(out)
    bad = _result(["a"], 0)
    bad.keys = ["a", "b"]
    with pytest.raises(ValueError, match="differ in length"):
        write_embeddings(out, 1, bad, pd.DataFrame({schema.KEY: ["a", "b"]}))


def test_empty_folder_reads_as_empty(tmp_path) -> None:
    img, txt, meta = read_embeddings(str(tmp_path / "none"))
    assert len(img) == len(txt) == len(meta) == 0
