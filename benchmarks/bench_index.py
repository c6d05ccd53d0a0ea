"""kNN index benchmark: build time, size, recall@10 against exact search, query latency.

Writes ``benchmarks/results/index.json``.

    nice -n 10 .venv/bin/python benchmarks/bench_index.py [--n 1000000] [--dim 512]

Synthetic float16 unit vectors with neighbourhood structure (1,000 centres, 10 sub-centres
each, points around a sub-centre: what CLIP embeddings look like more than uniform noise, on
which no index beats brute force), written as a run's embeddings in clip-retrieval layout,
indexed by ``laion_dask.products.knn.build_index`` on a 2-worker LocalCluster (the index type is
``build_index``'s own choice). Recall@10 is measured on fresh queries (rows of the run, their
own id excluded, plus perturbed copies) against exact NumPy search. Latency: one query at a
time through ``KnnIndex.search_vectors`` (k = 10, near-duplicate collapsing on), and for text
queries ``knn.search(text=...)`` with the committed demo CLIP encoding each query (it is 128-d,
so its vector is tiled to the index width before searching; the encode cost is what counts).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _results import save


def synth(n: int, dim: int, seed: int, spread: float = 0.6) -> np.ndarray:
    """``n`` float16 unit rows: centre + sub-centre + point noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    subs = np.repeat(centres, 10, axis=0)
    subs += rng.standard_normal(subs.shape, dtype=np.float32) * np.float32(0.8 / np.sqrt(dim))
    out = np.empty((n, dim), np.float16)
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        x = subs[rng.integers(0, len(subs), m)]
        x = x + rng.standard_normal((m, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + m] = x
    return out


def write_run(root: Path, data: np.ndarray, parts: int):
    from laion_dask.ground import schema
    from laion_dask.ground.config import PipelineConfig
    from laion_dask.orchestration.rundir import RunDir
    from laion_dask.products.train import demo_model_dir
    from laion_dask.stages.embeddings import write_embedding_arrays

    run = RunDir(str(root))
    run.makedirs("scores")
    run.write_config(PipelineConfig().replace("clip", model=str(demo_model_dir()), device="cpu"))
    bounds = np.linspace(0, len(data), parts + 1).astype(int)
    for p in range(parts):
        chunk = data[bounds[p] : bounds[p + 1]]
        keys = [f"{p:05d}{i:07d}" for i in range(len(chunk))]
        frame = pd.DataFrame(
            {
                schema.KEY: pd.array(keys, dtype="string"),
                schema.URL: [f"http://img.example/{k}.jpg" for k in keys],
                schema.TEXT: "synthetic",
                schema.LANGUAGE_GROUP: "en",
                schema.SIMILARITY: np.float32(0.3),
                schema.SHARD: f"{p:05d}.tar",
            }
        )
        run.write_parquet_atomic(run.part_path("scores", p), frame)
        write_embedding_arrays(run.join("embeddings"), p, keys, chunk, chunk, frame[[schema.KEY]])
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--parts", type=int, default=10)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--text-queries", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--spread",
        type=float,
        default=0.6,
        help="point noise around a sub-centre (larger: neighbours spread over more IVF lists)",
    )
    ap.add_argument("--out", help="keep the run here (default: a temporary directory)")
    args = ap.parse_args()

    from laion_dask.ground.config import ClusterConfig
    from laion_dask.orchestration.cluster import cluster_client
    from laion_dask.products import knn

    t0 = time.perf_counter()
    data = synth(args.n, args.dim, seed=0, spread=args.spread)
    t_gen = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp) / "run"
        run = write_run(root, data, args.parts)
        cluster = ClusterConfig(
            n_workers=args.workers, threads_per_worker=1, gpu="never", dashboard_address=None
        )
        with cluster_client(cluster) as client:
            t0 = time.perf_counter()
            info = knn.build_index(run, client=client)
            t_build = time.perf_counter() - t0
        index = knn.load_index(run)
        size = Path(run.join("index", "image.faiss")).stat().st_size

        # recall@10 on fresh queries: rows (own id excluded) and perturbed copies
        rng = np.random.default_rng(123)
        vectors = data.astype(np.float32)
        qids = rng.choice(args.n, args.queries, replace=False)
        noisy = vectors[qids[: args.queries // 2]] + rng.standard_normal(
            (args.queries // 2, args.dim), dtype=np.float32
        ) * np.float32(0.3 / np.sqrt(args.dim))
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        queries = np.concatenate([vectors[qids], noisy])
        own = np.concatenate([qids, np.full(len(noisy), -1)])
        # exact truth first, in its own loop: a 1M-row NumPy scan between timed queries would
        # evict the index from the caches and bill that to the query
        truths = []
        for q, o in zip(queries, own, strict=True):
            exact = np.argsort(-(vectors @ q), kind="stable")[:11]
            truths.append([i for i in exact if i != o][:10])
        hits, lat = 0, []
        for q, o, truth in zip(queries, own, truths, strict=True):
            t = time.perf_counter()
            (res,) = index.search_vectors(q, 11, dedup=None)
            lat.append(time.perf_counter() - t)
            found = [i for i in res["id"] if i != o][:10]
            hits += len(set(found) & set(truth))
        recall = hits / (10 * len(queries))
        lat_dedup = []
        for q in queries[:100]:
            t = time.perf_counter()
            index.search_vectors(q, 10)
            lat_dedup.append(time.perf_counter() - t)

        # text queries with the demo CLIP (encode included)
        from laion_dask.stages.clip import encoder_from_config

        encoder = encoder_from_config(run.read_config().clip)
        words = ["red", "green", "blue", "yellow", "circle", "square", "star", "car", "house"]
        n_text = args.text_queries
        texts = [f"a {words[i % 4]} {words[4 + i % 5]} on a beach" for i in range(n_text)]
        encoder.encode_texts(texts[:1], ["en"])  # warm-up
        reps = -(-args.dim // encoder.dim)
        text_lat = []
        for text in texts:
            t = time.perf_counter()
            v = encoder.encode_texts([text], ["en"])[0]
            v = np.tile(v, reps)[: args.dim]
            v /= np.linalg.norm(v)
            index.search_vectors(v, 10)
            text_lat.append(time.perf_counter() - t)

    def pct(xs, p):
        return float(np.percentile(np.asarray(xs) * 1000, p))

    out = {
        "n": args.n,
        "dim": args.dim,
        "spread": args.spread,
        "generate_s": round(t_gen, 1),
        "index": info.factory,
        "nprobe": info.nprobe,
        "k_factor": info.k_factor,
        "build_s": round(t_build, 1),
        "index_bytes": size,
        "recall_at_10_build_time": round(info.recall, 4),
        "recall_at_10_fresh_queries": round(recall, 4),
        "vector_query_ms_p50": round(pct(lat, 50), 2),
        "vector_query_ms_p95": round(pct(lat, 95), 2),
        "vector_query_dedup_ms_p50": round(pct(lat_dedup, 50), 2),
        "vector_query_dedup_ms_p95": round(pct(lat_dedup, 95), 2),
        "text_query_ms_p50": round(pct(text_lat, 50), 2),
        "text_query_ms_p95": round(pct(text_lat, 95), 2),
        "targets": "recall@10 >= 0.95 at p95 <= 20 ms per vector query",
    }
    print(json.dumps(out, indent=1))
    save(
        "index",
        figures=out,
        summary="knn.build_index's own index choice: build time, recall@10 against exact "
        "NumPy search, query latency",
    )


if __name__ == "__main__":
    main()
