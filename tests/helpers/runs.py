"""A small scored run directory built by hand (no network, no model) for filter tests."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image

from laion_dask.ground import schema
from laion_dask.ground.config import PipelineConfig
from laion_dask.ground.shards import ShardSample, make_key, write_shard
from laion_dask.orchestration.rundir import RunDir


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(32, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def scored_frame(n: int, part: int, seed: int = 0) -> pd.DataFrame:
    """n candidate rows in every state: rule drops, download failures, scored ones."""
    rng = np.random.default_rng(seed + part)
    groups = rng.choice(["en", "multi", "nolang"], size=n, p=[0.5, 0.35, 0.15])
    lang = np.where(groups == "en", "en", np.where(groups == "multi", "de", "xx"))
    drop = rng.choice([None, None, None, None, "text_too_short", "duplicate"], size=n)
    status = np.where(
        pd.isna(drop),
        rng.choice(["success"] * 6 + ["failed_to_download", "disallowed"], size=n),
        None,
    )
    ok = status == "success"
    score_status = np.where(ok, rng.choice(["success"] * 9 + ["failed_to_decode"], size=n), None)
    scored = score_status == "success"
    sim = np.where(scored, rng.uniform(0.1, 0.45, size=n), np.nan).astype("float32")
    df = pd.DataFrame(
        {
            schema.UID: [f"{part:04x}{i:012x}" for i in range(n)],
            schema.URL: [f"http://img.example/{part}/{i}.jpg" for i in range(n)],
            schema.TEXT: [f"caption number {i} of part {part}" for i in range(n)],
            schema.PAGE_URL: [f"http://page.example/{part}" for _ in range(n)],
            schema.SOURCE_FILE: f"file-{part}.wat.gz",
            schema.RECORD_OFFSET: np.arange(n, dtype="int64") * 100,
            schema.HASH: rng.integers(-(2**62), 2**62, size=n, dtype="int64"),
            schema.LANGUAGE: lang,
            schema.LANGUAGE_SCORE: rng.uniform(0.5, 1, size=n).astype("float32"),
            schema.LANGUAGE_GROUP: groups,
            schema.DROP_REASON: drop,
            schema.STATUS: status,
            schema.ERROR_MESSAGE: None,
            schema.HTTP_STATUS: np.where(ok, 200, 404),
            schema.ORIGINAL_WIDTH: np.where(ok, rng.integers(50, 900, size=n), 0),
            schema.ORIGINAL_HEIGHT: np.where(ok, rng.integers(50, 900, size=n), 0),
            schema.WIDTH: np.where(ok, 48, 0),
            schema.HEIGHT: np.where(ok, 32, 0),
            schema.ORIGINAL_BYTES: np.where(ok, 6000, 0),
            schema.SHA256: None,
            schema.KEY: [make_key(part, i) for i in range(n)],
            schema.SHARD: f"{part:05d}.tar",
            schema.SIMILARITY: sim,
            schema.PUNSAFE: np.where(scored, rng.uniform(0, 1, size=n), np.nan).astype("float32"),
            schema.PWATERMARK: np.where(scored, rng.uniform(0, 1, size=n), np.nan).astype(
                "float32"
            ),
            schema.SCORE_STATUS: score_status,
        }
    )
    for col in (
        schema.ORIGINAL_WIDTH,
        schema.ORIGINAL_HEIGHT,
        schema.WIDTH,
        schema.HEIGHT,
        schema.HTTP_STATUS,
        schema.ORIGINAL_BYTES,
    ):
        df[col] = df[col].where(ok)
    return schema.conform(
        df,
        schema.CANDIDATES_DTYPES,
        schema.DOWNLOAD_DTYPES,
        schema.SHARD_DTYPES,
        schema.SCORE_DTYPES,
    )


def make_scored_run(path, parts: int = 3, rows: int = 40, dim: int = 8) -> RunDir:
    """A run directory with scores parts, image shards and clip-retrieval embeddings."""
    run = RunDir(str(path))
    run.makedirs("scores", "images", "embeddings")
    run.write_config(PipelineConfig())
    for p in range(parts):
        df = scored_frame(rows, p)
        ok = df[schema.STATUS].eq("success").fillna(False).to_numpy(bool)
        write_shard(
            run.join("images", f"{p:05d}.tar"),
            [
                ShardSample(key=k, image=_jpeg(hash(k) % 1000), text="t", meta={})
                for k in df.loc[ok, schema.KEY]
            ],
        )
        run.write_parquet_atomic(run.part_path("scores", p), df)
        scored = df[schema.SCORE_STATUS].eq("success").fillna(False).to_numpy(bool)
        keys = df.loc[scored, schema.KEY].tolist()
        rng = np.random.default_rng(p)
        emb = rng.normal(size=(len(keys), dim)).astype("float32")
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        base = run.join("embeddings")
        for sub in ("img_emb", "text_emb", "metadata"):
            run.fs.makedirs(f"{base}/{sub}", exist_ok=True)
        np.save(f"{base}/img_emb/img_emb_{p}.npy", emb.astype("float16"))
        np.save(f"{base}/text_emb/text_emb_{p}.npy", emb[:, ::-1].astype("float16"))
        run.write_parquet_atomic(
            f"{base}/metadata/metadata_{p}.parquet", df.loc[scored, [schema.KEY, schema.UID]]
        )
        attempted = df[schema.STATUS].eq("success").fillna(False)
        counts = df.loc[attempted, schema.SCORE_STATUS].value_counts().to_dict()
        run.mark_done(
            "scores",
            p,
            {
                "fingerprint": "x",
                "index": p,
                "rows": int(attempted.sum()),
                "score_status": {str(k): int(v) for k, v in counts.items()},
            },
        )
    return run
