"""Runs to index: drawn demo scenes scored by the real score stage, and synthetic vectors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd

from laion_dask.ground import schema
from laion_dask.ground.config import PipelineConfig
from laion_dask.ground.shards import ShardSample, make_key, write_shard
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.synthetic.draw import (
    Scene,
    caption,
    draw_scene,
    encode_image,
    random_scene,
)
from laion_dask.stages.embeddings import write_embedding_arrays
from tests.helpers.clip import _all_dtypes


def scene_config() -> PipelineConfig:
    """LAION defaults with the committed demo CLIP on CPU (float32, deterministic)."""
    from laion_dask.products.train import demo_model_dir

    return PipelineConfig().replace(
        "clip",
        model=str(demo_model_dir()),
        device="cpu",
        dtype="float32",
        batch_size=32,
        loader_threads=1,
    )


def make_scene_run(
    path: Path, client, *, parts: int = 2, per_part: int = 16, seed: int = 0
) -> tuple[RunDir, dict[str, Scene]]:
    """Drawn scenes downloaded into shards, then scored by ``pipeline.run_score``.

    Returns the run and the scene behind each key. Row 0 of part 1 repeats row 0 of part 0's
    scene drawn with the same seed (an exact duplicate image under another URL).
    """
    from laion_dask.orchestration.pipeline import run_score

    rng = random.Random(seed)
    run = RunDir(str(path))
    run.makedirs("downloads", "images")
    cfg = scene_config()
    run.write_config(cfg)
    scenes: dict[str, Scene] = {}
    for p in range(parts):
        rows, samples = [], []
        for i in range(per_part):
            scene = random_scene(rng)
            draw_seed = seed * 1000 + p * 100 + i
            if p == 1 and i == 0:
                scene, draw_seed = scenes[make_key(0, 0)], seed * 1000
            key = make_key(p, i)
            scenes[key] = scene
            img = encode_image(draw_scene(scene, (96, 96), random.Random(draw_seed)), "JPEG")
            samples.append(ShardSample(key=key, image=img, text=caption(scene), meta={}))
            rows.append(
                {
                    schema.UID: f"{p}-{i}",
                    schema.URL: f"http://img.example/{p}/{i}.jpg",
                    schema.TEXT: caption(scene),
                    schema.PAGE_URL: f"http://page.example/{p}",
                    schema.SOURCE_FILE: "scenes.wat.gz",
                    schema.RECORD_OFFSET: i,
                    schema.HASH: p * 1000 + i,
                    schema.LANGUAGE: "en",
                    schema.LANGUAGE_SCORE: 1.0,
                    schema.LANGUAGE_GROUP: "en" if i % 3 else "multi",
                    schema.STATUS: "success",
                    schema.WIDTH: 96,
                    schema.HEIGHT: 96,
                    schema.ORIGINAL_WIDTH: 96,
                    schema.ORIGINAL_HEIGHT: 96,
                    schema.KEY: key,
                    schema.SHARD: f"{p:05d}.tar",
                }
            )
        write_shard(run.join("images", f"{p:05d}.tar"), samples)
        frame = pd.concat([schema.DOWNLOADS.copy(), pd.DataFrame(rows)], ignore_index=True)
        run.write_parquet_atomic(
            run.part_path("downloads", p), schema.conform(frame, *_all_dtypes())
        )
        run.mark_done("downloads", p, {"fingerprint": f"scenes-{seed}-{p}", "index": p})
    report = run_score(run, cfg, client=client)
    assert not report.failed, report.failed
    return run, scenes


def make_vector_run(path: Path, parts: list[np.ndarray], *, seed: int = 0) -> RunDir:
    """A run whose embeddings are ``parts`` (float16 rows per part) with matching scores."""
    run = RunDir(str(path))
    run.makedirs("scores")
    run.write_config(PipelineConfig())
    rng = np.random.default_rng(seed)
    groups = np.array(schema.LANGUAGE_GROUPS)
    for p, vectors in enumerate(parts):
        n = len(vectors)
        keys = [make_key(p, i) for i in range(n)]
        frame = pd.DataFrame(
            {
                schema.KEY: pd.array(keys, dtype="string"),
                schema.SHARD: f"{p:05d}.tar",
                schema.URL: [f"http://img.example/{p}/{i}.jpg" for i in range(n)],
                schema.TEXT: [f"vector {i} of part {p}" for i in range(n)],
                schema.LANGUAGE_GROUP: groups[rng.integers(0, 3, n)],
                schema.SIMILARITY: rng.uniform(0.2, 0.4, n).astype("float32"),
                schema.PUNSAFE: rng.uniform(0, 1, n).astype("float32"),
                schema.PWATERMARK: rng.uniform(0, 1, n).astype("float32"),
                schema.STATUS: "success",
                schema.SCORE_STATUS: "success",
            }
        )
        run.write_parquet_atomic(run.part_path("scores", p), frame)
        run.mark_done("scores", p, {"fingerprint": "x", "index": p, "rows": n})
        vec = np.asarray(vectors, dtype=np.float16)
        write_embedding_arrays(run.join("embeddings"), p, keys, vec, vec[:, ::-1], frame)
    return run


def clustered_vectors(n: int, dim: int, *, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """``n`` unit rows around ``clusters`` centres (neighbours are meaningful), float16."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)
