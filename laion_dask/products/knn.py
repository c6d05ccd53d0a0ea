"""kNN index, semantic search and near-duplicate groups over a run's CLIP embeddings (faiss).

What LAION published beside its data (kNN indices + a search demo, built by clip-retrieval and
autofaiss), over a user's own run:

* :func:`build_index` writes ``RUN/index/{image,text}.faiss`` over the float16 unit-norm
  embeddings the score stage wrote in clip-retrieval layout (``RUN/embeddings``), plus
  ``RUN/index/metadata.parquet`` (row ``i`` = index id ``i``: key, url, caption, language group,
  punsafe, pwatermark, caption similarity, shard) and ``RUN/index/{image,text}.json``
  (:class:`IndexInfo`: the index type, why it was chosen, and the recall measured at build
  time). The type follows the run's size and a memory budget, after autofaiss: exact
  inner-product ``Flat`` for small runs, ``IVF{nlist},PQ{m}x8`` for large ones, with ``m`` the
  largest code that fits the budget. IVF-PQ is trained on a sample, every embeddings part is
  added to a copy of the trained empty index by its own Dask task (which also computes the
  exact top-k of the evaluation queries over its own rows), and the parts are merged in part
  order; ``nprobe`` is then the smallest that reaches ``target_recall`` on the evaluation
  queries, and the recall reached is written beside the index.
* :func:`search` (``laion-dask search RUN "a red bicycle"``) encodes a text or an image with the
  run's own CLIP (``[clip]`` of ``RUN/config.toml``) and returns the nearest rows with URL,
  caption, similarity and thumbnail; optional filters on language group, punsafe and pwatermark
  (faiss ID selectors: filtered rows never take a result slot); results that are near-duplicates
  of a better-ranked result (cosine >= 0.94, clip-retrieval's rule, or the same
  ``duplicate_group``) are collapsed into it.
* :func:`find_near_duplicates` groups the run's images whose embeddings are within a cosine
  threshold of a canonical image (range search over the index, one Dask task per part) and
  writes ``RUN/neardup/part-NNNNN.parquet`` (``key``, ``duplicate_group``, ``canonical_key``,
  ``near_duplicate``); :mod:`laion_dask.products.neardup` joins it onto any frame with a ``key``.

Flat search is exact: its results equal a brute-force NumPy search over the same float16
vectors. IVF-PQ is approximate; its recall is measured, not assumed. GPU faiss is used to train
the IVF quantizer when the installed faiss has GPUs (``faiss.get_num_gpus() > 0``); ``faiss-cpu``
from PyPI has none.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from laion_dask.ground import schema
from laion_dask.ground.config import IndexConfig
from laion_dask.orchestration.rundir import RunDir
from laion_dask.orchestration.runner import get_client, run_tasks
from laion_dask.products.neardup import (
    CANONICAL_KEY,
    DUPLICATE_GROUP,
    NEAR_DUPLICATE,
    NEARDUP_DIR,
    StaleNearDuplicates,
    _scores_fingerprint,
    add_near_duplicate,
    read_near_duplicates,
)
from laion_dask.stages.clip import encoder_from_config, to_rgb
from laion_dask.stages.embeddings import embedding_parts, embedding_paths, read_array
from laion_dask.stages.imaging import read_thumbnails

__all__ = [
    "IndexConfig",
    "IndexPlan",
    "IndexInfo",
    "KnnIndex",
    "NearDupReport",
    "MODALITIES",
    "RESULT_DEDUP_COSINE",
    "choose_index",
    "build_index",
    "load_index",
    "search",
    "encode_query",
    "collapse_near_duplicates",
    "find_near_duplicates",
]

log = logging.getLogger(__name__)

INDEX_DIR = "index"
MODALITIES = ("image", "text")
#: index id -> this row of ``RUN/index/metadata.parquet``
METADATA_FILE = "metadata.parquet"

#: clip-retrieval collapses search results whose embeddings have cosine >= 0.94
RESULT_DEDUP_COSINE = 0.94
#: the caption-image CLIP score of a result (``similarity`` of a result is the query's cosine)
CAPTION_SIMILARITY = "caption_similarity"

#: scores columns carried into the index metadata (what a search result shows and filters on)
_META_COLUMNS = {
    schema.URL: "string",
    schema.TEXT: "string",
    schema.LANGUAGE_GROUP: "string",
    schema.PUNSAFE: "float32",
    schema.PWATERMARK: "float32",
    schema.SIMILARITY: "float32",
    schema.SHARD: "string",
}


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexPlan:
    """The index :func:`choose_index` picked, with its estimated size in memory."""

    factory: str
    kind: str  # "flat" | "ivfpq" | "custom"
    nlist: int | None
    pq_m: int | None
    estimated_bytes: int
    reason: str


def _default_nlist(n: int) -> int:
    # a power of two near sqrt(n), at least 1 and at most n / 39 (faiss' training minimum)
    want = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n)))))
    return int(max(1, min(want, n // 39 if n >= 39 else 1, 65536)))


def choose_index(n: int, dim: int, cfg: IndexConfig) -> IndexPlan:
    """The index for ``n`` vectors of width ``dim`` under ``cfg`` (after autofaiss' memory rule).

    Ours, not autofaiss' ``get_optimal_index_keys_v2``, measured 2026-12: autofaiss 2.18.0
    (the latest) requires ``numpy<2`` (we run numpy 2.x), ``fire<0.7`` and embedding-reader;
    and its first choice under a roomy budget is ``HNSW{m}``, whose ``merge_from`` faiss does
    not implement, while :func:`build_index` adds every embeddings part in its own task to a
    copy of one trained IVF index and merges them. What we keep of its rule: exact search for
    small runs, and the largest PQ code whose bytes fit the memory budget.

    Exact ``Flat`` when ``n <= cfg.flat_max_vectors`` and ``4 * n * dim`` bytes fit the budget;
    else ``IVF{nlist},PQ{m}x8`` with the largest ``m`` of ``dim/2, dim/4, ...`` (at least 4 dims
    ... down to ``dim/64``) whose codes, ids and centroids fit the budget. Raises ``ValueError``
    when not even the smallest code fits.
    """
    if n <= 0 or dim <= 0:
        raise ValueError(f"nothing to index: {n} vectors of width {dim}")
    budget = cfg.budget_bytes
    if cfg.factory:
        return IndexPlan(cfg.factory, "custom", None, None, 0, "index.factory given")
    flat_bytes = 4 * n * dim
    if n <= cfg.flat_max_vectors and flat_bytes <= budget:
        why = f"{n} <= index.flat_max_vectors = {cfg.flat_max_vectors}: exact search"
        return IndexPlan("Flat", "flat", None, None, flat_bytes, why)
    nlist = cfg.nlist or _default_nlist(n)
    why = f"{n} > index.flat_max_vectors" if n > cfg.flat_max_vectors else "Flat too large"
    # preferred: a short PQ code finds candidates, float16 copies (2 bytes a dim) re-rank them
    # exactly; else the largest plain code that fits
    short = max(dim // 8, min(dim, 8)) if dim % 8 == 0 else dim
    refined = f"candidates re-ranked from float16 vectors fit {budget} bytes"
    options = [(short, 2 * dim, ",Refine(SQfp16)", refined)]
    plain = f"is the largest code within {budget} bytes (no re-ranking)"
    options += [(dim // d, 0, "", plain) for d in (2, 4, 8, 16, 32, 64) if dim % d == 0]
    for m, copies, refine, note in options:
        # codes + int64 ids (+ the direct map search keeps for reconstruct) + copies +
        # centroids + the PQ codebooks (m * 256 centroids of dim / m floats)
        size = n * (m + 16 + copies) + 4 * nlist * dim + 4 * 256 * dim
        if size <= budget:
            factory = f"IVF{nlist},PQ{m}x8{refine}"
            return IndexPlan(factory, "ivfpq", nlist, m, size, f"{why}; PQ{m}x8 {note}")
    raise ValueError(
        f"index.memory_budget = {budget} bytes is too small for {n} vectors of width {dim} "
        "even with the smallest PQ code"
    )


@dataclass
class IndexInfo:
    """What is written beside an index as ``{modality}.json``."""

    modality: str
    factory: str
    kind: str
    n: int
    dim: int
    nlist: int | None
    pq_m: int | None
    nprobe: int | None
    recall_k: int
    recall: float
    recall_floor: float
    exact: bool
    eval_queries: int
    #: recall@k per tried setting: ``"nprobe"`` or ``"nprobe x k_factor"``
    recall_by_setting: dict[str, float]
    index_bytes: int
    memory_budget: int
    train_vectors: int
    parts: int
    build_seconds: float
    gpu: bool
    reason: str
    meets_floor: bool = True
    #: PQ candidates re-ranked per result (IVF-PQ with re-ranking)
    k_factor: int | None = None
    #: the ``scores`` marker fingerprint of each part indexed (empty in indexes built before
    #: this was recorded): near-duplicate groups refuse an index whose scores changed since
    scores_fingerprints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IndexInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- reading the run's embeddings ---------------------------------------------------------------


def _array_path(run: RunDir, part: int, modality: str) -> str:
    paths = embedding_paths(run.join("embeddings"), part)
    return paths["img" if modality == "image" else "text"]


def _npy_shape(run: RunDir, path: str) -> tuple[int, ...]:
    """The shape in a ``.npy`` header, without reading the array."""
    fmt = np.lib.format
    with run.fs.open(path, "rb") as fh:
        version = fmt.read_magic(fh)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, _ = reader(fh)
    return tuple(int(s) for s in shape)


def _read_vectors(run: RunDir, part: int, modality: str) -> np.ndarray:
    return np.ascontiguousarray(read_array(_array_path(run, part, modality)), dtype=np.float32)


def _read_part_metadata(run: RunDir, part: int) -> pd.DataFrame:
    """Rows of one embeddings part, in array order, with the scores columns results show."""
    meta_path = embedding_paths(run.join("embeddings"), part)["metadata"]
    frame = run.read_parquet(meta_path, columns=[schema.KEY]).astype({schema.KEY: "string"})
    scores_path = run.part_path("scores", part)
    scores = pd.DataFrame({schema.KEY: []})
    if run.exists(scores_path):
        with run.fs.open(scores_path, "rb") as fh:
            names = set(pq.read_schema(fh).names)
        cols = [schema.KEY, *(c for c in _META_COLUMNS if c in names)]
        scores = run.read_parquet(scores_path, columns=cols)
    else:
        log.warning(
            "index: %s missing: part %d's results have no URL or caption", scores_path, part
        )
    scores = scores.astype({schema.KEY: "string"}).drop_duplicates(schema.KEY)
    frame = frame.merge(scores, on=schema.KEY, how="left", validate="many_to_one")
    # a column the scores lack is all missing, in the dtype it has everywhere else
    out = frame.reindex(columns=[schema.KEY, *_META_COLUMNS]).astype(_META_COLUMNS)
    return out.rename(columns={schema.SIMILARITY: CAPTION_SIMILARITY}).assign(part=np.int32(part))


# --- faiss helpers ------------------------------------------------------------------------------


def _faiss() -> Any:
    # heavy: faiss takes ~0.4 s to load, paid only by what builds or searches an index (the
    # search page and the CLI import this module for its names)
    import faiss

    return faiss


#: PQ candidates per result that the float16 copies may re-rank (the build picks one)
REFINE_K_FACTORS = (4, 8, 16, 32)


def _params(index: Any, nprobe: int | None, sel: Any = None, k_factor: int | None = None) -> Any:
    """Search parameters for ``index`` (Flat, IVF or IVF + refine)."""
    faiss = _faiss()
    kwargs: dict[str, Any] = {} if sel is None else {"sel": sel}
    if _ivf(index) is None:
        return faiss.SearchParameters(**kwargs) if kwargs else None
    ivf_params = faiss.SearchParametersIVF(nprobe=int(nprobe or 1), **kwargs)
    if isinstance(index, faiss.IndexRefine):
        return faiss.IndexRefineSearchParameters(
            k_factor=float(k_factor or REFINE_K_FACTORS[-1]), base_index_params=ivf_params
        )
    return ivf_params


def _ivf(index: Any) -> Any | None:
    faiss = _faiss()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _train(index: Any, sample: np.ndarray, seed: int) -> bool:
    """Train ``index`` on ``sample``; the IVF k-means runs on the GPUs when faiss has them."""
    faiss = _faiss()
    ivf = _ivf(index)
    gpu = False
    if ivf is not None:
        ivf.cp.seed = seed
        if faiss.get_num_gpus() > 0:
            # faiss' documented way: clustering against a GPU flat index
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(index.d))
            gpu = True
    index.train(sample)
    if ivf is not None:
        ivf.clustering_index = None
    return gpu


def _merge(into: Any, piece: Any, offset: int) -> None:
    """Append the vectors of ``piece`` to ``into``; their ids start at ``offset``."""
    faiss = _faiss()
    if isinstance(into, faiss.IndexRefine):
        # faiss 1.15's IndexRefine has no merge_from: merge its two halves
        for half in ("base_index", "refine_index"):
            down = [faiss.downcast_index(getattr(x, half)) for x in (into, piece)]
            _merge(*down, offset)
        into.ntotal += piece.ntotal
        return
    # an IVF stores the ids it is given; a flat index numbers its rows itself
    into.merge_from(piece, offset if _ivf(into) is not None else 0)


def _serialize(index: Any) -> bytes:
    return _faiss().serialize_index(index).tobytes()


def _deserialize(data: bytes) -> Any:
    return _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int, offset: int) -> tuple:
    """Exact inner-product top ``k`` of each query over ``vectors`` (ids shifted by offset).

    NumPy, not ``faiss.knn``: faiss sums in another order, and its last-bit differences
    reorder near-ties, which moved 15 of 19,800 truth ids and so the recall measured.
    """
    kk = min(k, len(vectors))
    sims = queries @ vectors.T
    idx = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    return np.take_along_axis(sims, idx, axis=1), idx.astype(np.int64) + offset


def _merge_topk(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    sims = np.concatenate([r[0] for r in results], axis=1)
    ids = np.concatenate([r[1] for r in results], axis=1)
    order = np.lexsort((ids, -sims), axis=1)[:, :k]  # by similarity, ties by id: deterministic
    return np.take_along_axis(ids, order, axis=1)


def _recall(found: np.ndarray, truth: np.ndarray, self_ids: np.ndarray, k: int) -> float:
    """Mean |found ∩ truth| / k over queries, the query's own id removed from both lists."""
    hits = 0.0
    for f, t, own in zip(found, truth, self_ids, strict=True):
        want = set([i for i in t if i != own][:k])
        got = [i for i in f if i != own and i >= 0][:k]
        hits += len(set(got) & want) / max(1, len(want))
    return hits / max(1, len(found))


# --- Dask tasks (module level: pickled to the workers) -----------------------------------------


def _sample_task(run: RunDir, part: int, modality: str, take: np.ndarray) -> dict:
    """Rows ``take`` (local positions) of one part's vectors, float32."""
    vectors = _read_vectors(run, part, modality)
    return {"part": part, "rows": vectors[take]}


def _part_file(run: RunDir, modality: str, part: int, ext: str) -> str:
    return run.join(INDEX_DIR, "_parts", f"{modality}-{part:05d}.{ext}")


def _add_task(
    run: RunDir,
    part: int,
    modality: str,
    template: bytes,
    queries: np.ndarray,
    k: int,
    offset: int,
    expected: int,
) -> dict:
    """Add one part to a copy of the trained empty index; exact top-k of the queries here."""
    vectors = _read_vectors(run, part, modality)
    if len(vectors) != expected:
        raise ValueError(f"embeddings part {part} has {len(vectors)} rows, {expected} expected")
    meta = _read_part_metadata(run, part)
    if len(meta) != len(vectors):
        raise ValueError(f"embeddings part {part}: metadata and arrays differ in length")
    index = _deserialize(template)
    index.add(vectors)
    run.fs.makedirs(run.join(INDEX_DIR, "_parts"), exist_ok=True)
    run.write_bytes_atomic(_part_file(run, modality, part, "faiss"), _serialize(index))
    run.write_parquet_atomic(_part_file(run, modality, part, "parquet"), meta)
    top = _exact_topk(queries, vectors, k, offset) if len(queries) else None
    return {"part": part, "rows": len(vectors), "top": top}


def _range_task(
    run: RunDir, part: int, offset: int, threshold: float, index_path: str, nprobe: int | None
) -> dict:
    """Pairs ``(i, j)``, ``i < j``, of index ids with cosine >= threshold, ``i`` in this part."""
    faiss = _faiss()
    vectors = _read_vectors(run, part, "image")
    index = _cached_index(index_path, run.fs.modified(index_path).timestamp())
    refine = isinstance(index, faiss.IndexRefine)
    # PQ distances are approximate: look wider, then check each pair on the float16 copies
    radius = threshold - RANGE_MARGIN if refine else threshold
    base = faiss.downcast_index(index.base_index) if refine else index
    lims, _, ids = base.range_search(vectors, float(radius), params=_params(base, nprobe))
    src = np.repeat(np.arange(len(vectors), dtype=np.int64), np.diff(lims).astype(np.int64))
    ids = ids.astype(np.int64)
    keep = ids > src + offset
    src, ids = src[keep], ids[keep]
    if refine and len(ids):
        exact = np.einsum("ij,ij->i", vectors[src], index.reconstruct_batch(ids))
        ok = exact >= threshold
        src, ids = src[ok], ids[ok]
    return {"src": src + offset, "dst": ids}


#: how much lower an approximate range search looks before the exact check
RANGE_MARGIN = 0.05


@functools.lru_cache(maxsize=2)
def _cached_index(path: str, mtime: float) -> Any:
    """An index file read once per process (``mtime`` makes a rebuilt index a new entry)."""
    with fsspec.open(path, "rb") as fh:
        return _deserialize(fh.read())


# --- building -----------------------------------------------------------------------------------


def build_index(
    run: RunDir | str,
    cfg: IndexConfig | None = None,
    *,
    modality: str = "image",
    client: Any | None = None,
) -> IndexInfo:
    """Build ``RUN/index/{modality}.faiss`` from the run's embeddings, one Dask task per part.

    Parameters
    ----------
    run
        A run directory with finished ``embeddings`` (the score stage).
    cfg
        :class:`IndexConfig`; defaults when None.
    modality
        ``image`` (search images) or ``text`` (search captions).
    client
        The Dask client (default: the current one).

    Returns
    -------
    IndexInfo
        Also written to ``RUN/index/{modality}.json``.

    Example
    -------
    >>> info = build_index("demo-run", client=client)  # doctest: +SKIP
    >>> info.kind, info.recall                           # doctest: +SKIP
    ('flat', 1.0)
    """
    cfg = cfg or IndexConfig()
    run = RunDir(run) if isinstance(run, str | Path) else run
    path = _index_path(run, modality)
    t0 = time.perf_counter()
    parts = embedding_parts(run.join("embeddings"))
    shapes = {p: _npy_shape(run, _array_path(run, p, modality)) for p in parts}
    sizes = {p: s[0] for p, s in shapes.items()}
    dims = {s[1] for s in shapes.values() if len(s) == 2 and s[0] > 0}
    if len(dims) > 1:
        raise ValueError(f"{run.path}: embeddings parts differ in width: {sorted(dims)}")
    n = sum(sizes.values())
    if n == 0 or not dims:
        raise ValueError(f"{run.path}: no embeddings to index (run the score stage first)")
    dim = dims.pop()
    plan = choose_index(n, dim, cfg)
    client = get_client(client)
    parts = [p for p in parts if sizes[p] > 0]
    bounds = np.cumsum([0, *(sizes[p] for p in parts)])
    offsets = dict(zip(parts, bounds[:-1].tolist(), strict=True))

    rng = np.random.default_rng(cfg.seed)
    index = _faiss().index_factory(dim, plan.factory, _faiss().METRIC_INNER_PRODUCT)
    needs_training = not index.is_trained
    n_train = min(n, max(cfg.train_per_list * (plan.nlist or 1), 256 * 39), cfg.max_train_vectors)
    n_queries = 0 if plan.kind == "flat" else min(cfg.eval_queries, n)
    n_sample = (n_train if needs_training else 0) + n_queries
    queries = np.zeros((0, dim), np.float32)
    query_ids = np.zeros(0, np.int64)
    gpu = False
    if n_sample:
        chosen = np.sort(rng.choice(n, size=min(n, n_sample), replace=False))
        which = np.searchsorted(bounds, chosen, side="right") - 1  # the part of each row
        tasks = [
            (f"{p:05d}", _sample_task, (run, p, modality, chosen[which == i] - bounds[i]))
            for i, p in enumerate(parts)
            if (which == i).any()
        ]
        sampled, _ = run_tasks(client, "index-sample", tasks, strict=True)
        # results come back in completion order; ``chosen`` is in part order
        sample = np.concatenate([r["rows"] for r in sorted(sampled, key=lambda r: r["part"])])
        perm = rng.permutation(len(sample))
        q_pos = perm[:n_queries]
        queries = sample[q_pos]
        query_ids = chosen[q_pos]
        if needs_training:
            train = sample[perm[n_queries:]] if len(sample) > n_queries else sample
            gpu = _train(index, np.ascontiguousarray(train), cfg.seed)
    template = _serialize(index)
    k = cfg.recall_k
    add_tasks = [
        (
            f"{p:05d}",
            _add_task,
            (run, p, modality, template, queries, k + 1, offsets[p], sizes[p]),
        )
        for p in parts
    ]
    results, _ = run_tasks(client, "index", add_tasks, strict=True)
    by_part = {r["part"]: r for r in results}

    merged = _deserialize(template)
    metas = []
    for p in parts:
        with run.fs.open(_part_file(run, modality, p, "faiss"), "rb") as fh:
            _merge(merged, _deserialize(fh.read()), offsets[p])
        metas.append(run.read_parquet(_part_file(run, modality, p, "parquet")))
    if merged.ntotal != n:
        raise RuntimeError(f"merged index holds {merged.ntotal} vectors, {n} expected")
    metadata = pd.concat(metas, ignore_index=True)

    nprobe: int | None = None
    k_factor: int | None = None
    recall = 1.0
    curve: dict[str, float] = {}
    if plan.kind != "flat" and n_queries:
        truth = _merge_topk([by_part[p]["top"] for p in parts], k + 1)
        nprobe, k_factor, recall, curve = _tune_nprobe(merged, queries, truth, query_ids, k, cfg)
    run.fs.makedirs(run.join(INDEX_DIR), exist_ok=True)
    blob = _serialize(merged)
    run.write_bytes_atomic(path, blob)
    run.write_parquet_atomic(run.join(INDEX_DIR, METADATA_FILE), metadata)
    info = IndexInfo(
        modality=modality,
        factory=plan.factory,
        kind=plan.kind,
        n=n,
        dim=dim,
        nlist=plan.nlist,
        pq_m=plan.pq_m,
        nprobe=nprobe,
        recall_k=k,
        recall=float(recall),
        recall_floor=float(cfg.target_recall),
        exact=plan.kind == "flat",
        eval_queries=int(n_queries),
        recall_by_setting={str(a): float(b) for a, b in curve.items()},
        k_factor=k_factor,
        index_bytes=len(blob),
        memory_budget=cfg.budget_bytes,
        train_vectors=int(n_train if needs_training else 0),
        parts=len(parts),
        build_seconds=time.perf_counter() - t0,
        gpu=gpu,
        reason=plan.reason,
        meets_floor=bool(recall >= cfg.target_recall),
    )
    info.scores_fingerprints = {str(p): _scores_fingerprint(run, p) for p in parts}
    run.write_json_atomic(run.join(INDEX_DIR, f"{modality}.json"), dataclasses.asdict(info))
    run.fs.rm(run.join(INDEX_DIR, "_parts"), recursive=True)
    if not info.meets_floor:
        log.warning(
            "index: recall@%d %.3f (nprobe %s, k_factor %s) is below index.target_recall %.3f",
            k,
            recall,
            nprobe,
            k_factor,
            cfg.target_recall,
        )
    return info


def _tune_nprobe(
    index: Any,
    queries: np.ndarray,
    truth: np.ndarray,
    query_ids: np.ndarray,
    k: int,
    cfg: IndexConfig,
) -> tuple[int, int | None, float, dict[str, float]]:
    """The cheapest (nprobe, k_factor) whose recall@k reaches ``cfg.target_recall``.

    Settings are tried in order of their estimated cost per query (PQ codes scanned plus
    vectors re-ranked); the first that reaches the target wins, else the best one seen.
    """
    faiss = _faiss()
    ivf = _ivf(index)
    assert ivf is not None
    refine = isinstance(index, faiss.IndexRefine)
    per_list = index.ntotal / max(1, ivf.nlist)
    code = max(1, int(getattr(ivf, "code_size", 1)))
    factors: tuple[int | None, ...] = REFINE_K_FACTORS if refine else (None,)
    probes = sorted({min(2**i, ivf.nlist) for i in range(0, 17)})
    settings = sorted(
        ((p, f) for p in probes for f in factors),
        key=lambda s: s[0] * per_list * code + (s[1] or 0) * k * index.d * 2,
    )
    curve: dict[str, float] = {}
    best: tuple[float, int, int | None] | None = None
    for nprobe, factor in settings:
        _, found = index.search(queries, k + 1, params=_params(index, nprobe, None, factor))
        recall = _recall(found, truth, query_ids, k)
        curve[f"{nprobe}" if factor is None else f"{nprobe}x{factor}"] = recall
        if best is None or recall > best[0]:
            best = (recall, nprobe, factor)
        if recall >= cfg.target_recall:
            return nprobe, factor, recall, curve
    assert best is not None
    return best[1], best[2], best[0], curve


# --- loading and searching ----------------------------------------------------------------------


@dataclass(eq=False)
class KnnIndex:
    """A loaded index with its metadata; :meth:`search_vectors` is the search itself."""

    run: RunDir
    modality: str
    index: Any
    metadata: pd.DataFrame
    info: IndexInfo

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The indexed vectors of ``ids``: exact for Flat and for IVF-PQ with re-ranking (its
        float16 copies), the PQ reconstruction for plain IVF-PQ."""
        return self.index.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    def allowed(
        self,
        *,
        language_group: str | Sequence[str] | None = None,
        max_punsafe: float | None = None,
        max_pwatermark: float | None = None,
    ) -> np.ndarray | None:
        """Rows the filters let through (None: no filter). A missing tag passes a tag cut, as
        the base thresholds treat it (see :mod:`laion_dask.stages.filters`)."""
        if language_group is None and max_punsafe is None and max_pwatermark is None:
            return None
        meta = self.metadata
        mask = np.ones(len(meta), dtype=bool)
        if language_group is not None:
            groups = [language_group] if isinstance(language_group, str) else list(language_group)
            for g in groups:
                if g not in schema.LANGUAGE_GROUPS:
                    raise ValueError(
                        f"language group must be one of {schema.LANGUAGE_GROUPS}, got {g!r}"
                    )
            mask &= meta[schema.LANGUAGE_GROUP].isin(groups).fillna(False).to_numpy(bool)
        for col, limit in ((schema.PUNSAFE, max_punsafe), (schema.PWATERMARK, max_pwatermark)):
            if limit is not None:  # NaN > limit is False: a missing tag passes
                mask &= ~(meta[col].to_numpy(dtype="float64", na_value=np.nan) > limit)
        return mask

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        language_group: str | Sequence[str] | None = None,
        max_punsafe: float | None = None,
        max_pwatermark: float | None = None,
        dedup: float | None = RESULT_DEDUP_COSINE,
    ) -> list[pd.DataFrame]:
        """The ``k`` best rows for each query vector (unit-norm, the index's width).

        With ``dedup``, a result whose vector has cosine >= ``dedup`` with a better-ranked
        result, or shares its ``duplicate_group``, is collapsed into it (``collapsed`` counts
        them); the search widens until ``k`` distinct results are found or the rows run out.
        With an IVF index, a filter can leave the probed lists short of rows: the search then
        probes more lists (x4, up to all of them) rather than return fewer than ``k`` while
        allowed rows remain. Each frame: ``id``, ``similarity`` (the query's cosine),
        ``collapsed`` and the metadata columns.
        """
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise ValueError(f"query width {q.shape[1]} differs from the index's {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        allowed = self.allowed(
            language_group=language_group, max_punsafe=max_punsafe, max_pwatermark=max_pwatermark
        )
        available = len(self) if allowed is None else int(allowed.sum())
        nlist = self.info.nlist if _ivf(self.index) is not None else None
        sel = None
        if allowed is not None:
            # the bitmap and the selector must outlive every search call below
            bitmap = np.packbits(allowed, bitorder="little")
            sel = _faiss().IDSelectorBitmap(bitmap)
        out = []
        for row in q:
            fetch = min(available, k if dedup is None else 3 * k + 10)
            nprobe = self.info.nprobe
            while True:
                if fetch == 0:
                    ids = np.zeros(0, np.int64)
                    sims = np.zeros(0, np.float32)
                else:
                    params = _params(self.index, nprobe, sel, self.info.k_factor)
                    sims, ids = self.index.search(row[None, :], fetch, params=params)
                    sims, ids = sims[0], ids[0]
                    sims, ids = sims[ids >= 0], ids[ids >= 0]
                if len(ids) < fetch and nlist and nprobe and nprobe < nlist:
                    # the probed lists ran out of (allowed) rows: probe more before giving up
                    nprobe = min(nlist, nprobe * 4)
                    continue
                if dedup is None:
                    kept, collapsed = np.arange(len(ids)), np.zeros(len(ids), np.int64)
                else:
                    kept, collapsed = collapse_near_duplicates(
                        self.vectors(ids), dedup, groups=self._groups(ids)
                    )
                if len(kept) >= k or fetch >= available:
                    break
                fetch = min(available, fetch * 4)
            kept = kept[:k]
            frame = self.metadata.iloc[ids[kept]].reset_index(drop=True)
            frame.insert(0, "similarity", sims[kept].astype(np.float32))
            frame.insert(0, "id", ids[kept])
            frame["collapsed"] = collapsed[kept]
            out.append(frame)
        return out

    def _groups(self, ids: np.ndarray) -> np.ndarray | None:
        if DUPLICATE_GROUP not in self.metadata.columns:
            return None
        return self.metadata[DUPLICATE_GROUP].to_numpy(dtype="float64", na_value=np.nan)[ids]


def collapse_near_duplicates(
    vectors: np.ndarray, threshold: float, *, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy collapse of ranked results (clip-retrieval's rule).

    Result ``i`` (in rank order) is kept unless its cosine with an already kept result is
    ``>= threshold`` or it shares a non-NaN ``groups`` value with one; a dropped result is
    counted on the kept result it is most similar to.

    Returns
    -------
    (kept positions, collapsed count per position)
    """
    n = len(vectors)
    collapsed = np.zeros(n, np.int64)
    if n == 0:
        return np.zeros(0, np.int64), collapsed
    v = np.asarray(vectors, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    # einsum, not BLAS: a few dozen rows cost more in BLAS thread start-up than in arithmetic
    sims = np.einsum("ik,jk->ij", v, v)
    dup = sims >= threshold
    if groups is not None:
        g = np.asarray(groups, dtype=np.float64)
        dup |= (g[:, None] == g[None, :]) & ~np.isnan(g)[:, None]
    # plain lists: a few hundred results loop faster in Python than through numpy indexing
    dup_rows, sim_rows = dup.tolist(), sims.tolist()
    kept: list[int] = []
    for i in range(n):
        row = dup_rows[i]
        hits = [j for j in kept if row[j]]
        if hits:
            collapsed[max(hits, key=sim_rows[i].__getitem__)] += 1
        else:
            kept.append(i)
    return np.asarray(kept, np.int64), collapsed


def _index_path(run: RunDir, modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return run.join(INDEX_DIR, f"{modality}.faiss")


def load_index(run: RunDir | str, modality: str = "image") -> KnnIndex:
    """The saved index of ``run`` (read once per process until the files change).

    Near-duplicate groups (:func:`find_near_duplicates`), when written, are joined onto the
    metadata as ``duplicate_group`` so search collapses them.
    """
    run = RunDir(run) if isinstance(run, str | Path) else run
    path = _index_path(run, modality)
    if not run.exists(path):
        raise FileNotFoundError(f"{path} not found: build it with `laion-dask index {run.path}`")
    stamps = tuple(
        run.fs.modified(p).timestamp() if run.exists(p) else 0.0
        for p in (path, run.join(INDEX_DIR, METADATA_FILE), run.join(NEARDUP_DIR, "summary.json"))
    )
    return _load_index(run.path, modality, stamps)


@functools.lru_cache(maxsize=4)
def _load_index(path: str, modality: str, stamps: tuple[float, ...]) -> KnnIndex:
    run = RunDir(path)
    index = _cached_index(_index_path(run, modality), stamps[0])
    info = IndexInfo.from_json(run.read_json(run.join(INDEX_DIR, f"{modality}.json")))
    metadata = run.read_parquet(run.join(INDEX_DIR, METADATA_FILE))
    if len(metadata) != index.ntotal:
        raise ValueError(
            f"{path}/{INDEX_DIR}: {METADATA_FILE} has {len(metadata)} rows, the index "
            f"{index.ntotal}: rebuild with `laion-dask index`"
        )
    ivf = _ivf(index)
    if ivf is not None and not isinstance(index, _faiss().IndexRefine):
        ivf.make_direct_map()  # reconstruct(id), for collapsing near-duplicate results
    if stamps[2]:
        groups = read_near_duplicates(run)
        metadata = add_near_duplicate(metadata, groups)
    return KnnIndex(run=run, modality=modality, index=index, metadata=metadata, info=info)


def encode_query(
    run: RunDir | str,
    *,
    text: str | None = None,
    image: Any = None,
    group: str = "en",
    encoder: Any | None = None,
) -> np.ndarray:
    """One unit-norm float32 query vector from a text or an image, with the run's own CLIP.

    ``image`` may be a PIL image, encoded bytes or a path. ``group`` picks the text tower
    (``multi``/``nolang`` use the run's multilingual tower when it has one).
    """
    if (text is None) == (image is None):
        raise ValueError("give exactly one of text= or image=")
    run = RunDir(run) if isinstance(run, str | Path) else run
    encoder = encoder if encoder is not None else encoder_from_config(run.read_config().clip)
    if text is not None:
        if not str(text).strip():
            raise ValueError("the text query is empty")
        return np.asarray(encoder.encode_texts([str(text)], [group]), np.float32)[0]
    if not isinstance(image, Image.Image):
        data = image if isinstance(image, bytes | bytearray) else Path(image).read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                image = im
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"the query image cannot be decoded: {err}") from err
    # transparency onto white, as the score stage does: a query embeds as its image was scored
    return np.asarray(encoder.encode_images([to_rgb(image)]), np.float32)[0]


def search(
    run: RunDir | str,
    *,
    text: str | None = None,
    image: Any = None,
    vector: np.ndarray | None = None,
    k: int = 10,
    modality: str = "image",
    language_group: str | Sequence[str] | None = None,
    max_punsafe: float | None = None,
    max_pwatermark: float | None = None,
    dedup: float | None = RESULT_DEDUP_COSINE,
    thumbnails: bool = True,
    thumb_size: int = 128,
    query_group: str | None = None,
    encoder: Any | None = None,
) -> pd.DataFrame:
    """The ``k`` rows of ``run`` nearest a text, an image or a vector.

    Parameters
    ----------
    run
        A run with an index (:func:`build_index`).
    text, image, vector
        Exactly one: a text (encoded with the run's CLIP text tower), an image (PIL, bytes or a
        path; its image tower) or a unit-norm vector.
    k
        Results wanted (after collapsing near-duplicates).
    modality
        Which index to search: ``image`` (default) or ``text`` (captions).
    language_group, max_punsafe, max_pwatermark
        Filters on the result rows; a row without a tag passes a tag cut.
    dedup
        Collapse results with cosine >= ``dedup`` to a better one (None: keep all).
    thumbnails
        Add ``thumbnail`` (a PIL image, None when the shard lacks it) from ``RUN/images``.
    query_group
        Text tower for the query (default: ``language_group`` when it names one group, else
        ``en``).
    encoder
        An already loaded encoder (default: the run's ``[clip]`` model, cached per process).

    Returns
    -------
    pandas.DataFrame
        ``rank, id, similarity, key, url, text, language_group, punsafe, pwatermark,
        caption_similarity, shard, collapsed`` (+ ``thumbnail``), best first.

    Example
    -------
    >>> search("demo-run", text="a red circle on a striped blue background", k=5)  # doctest: +SKIP
    """
    run = RunDir(run) if isinstance(run, str | Path) else run
    if sum(x is not None for x in (text, image, vector)) != 1:
        raise ValueError("give exactly one of text=, image= or vector=")
    knn = load_index(run, modality)
    if vector is None:
        if query_group is None:
            query_group = language_group if isinstance(language_group, str) else "en"
        vector = encode_query(run, text=text, image=image, group=query_group, encoder=encoder)
    (frame,) = knn.search_vectors(
        np.asarray(vector, np.float32)[None, :],
        k,
        language_group=language_group,
        max_punsafe=max_punsafe,
        max_pwatermark=max_pwatermark,
        dedup=dedup,
    )
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    if thumbnails:
        frame["thumbnail"] = read_thumbnails(
            run.join("images"), frame[schema.KEY], frame[schema.SHARD], thumb_size
        )
    return frame


# --- near-duplicate groups ----------------------------------------------------------------------


@dataclass(frozen=True)
class NearDupReport:
    """What :func:`find_near_duplicates` found (also ``RUN/neardup/summary.json``)."""

    threshold: float
    images: int
    groups: int
    members: int
    near_duplicates: int
    pairs: int
    index: str
    parts: int
    seconds: float


def _greedy_groups(n: int, src: np.ndarray, dst: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Star groups: in ``order``, an ungrouped image with neighbours becomes a canonical and
    takes every ungrouped neighbour. Returns the canonical id per image (-1: no group)."""
    group = np.full(n, -1, np.int64)
    if len(src) == 0:
        return group
    a = np.concatenate([src, dst])
    b = np.concatenate([dst, src])
    sort = np.argsort(a, kind="stable")
    a, b = a[sort], b[sort]
    starts = np.searchsorted(a, np.arange(n + 1))
    has = np.diff(starts) > 0
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    for i in order[has[order]]:  # only images with a neighbour matter
        if group[i] >= 0:
            continue
        nbrs = b[starts[i] : starts[i + 1]]
        free = nbrs[group[nbrs] < 0]
        if len(free) == 0:
            continue
        group[i] = i
        group[free] = i
    return group


def find_near_duplicates(
    run: RunDir | str,
    threshold: float = RESULT_DEDUP_COSINE,
    *,
    client: Any | None = None,
) -> NearDupReport:
    """Group the run's images whose embeddings are within ``threshold`` cosine of a canonical.

    A range search over the image index (one Dask task per embeddings part) finds every pair
    with cosine >= ``threshold``; then, in canonical order (highest caption similarity first,
    ties by position in the run), each image not yet grouped that has neighbours becomes a
    group's canonical and takes its ungrouped neighbours. Every member is thus within the
    threshold of its canonical (no chaining), and the result is deterministic. With an IVF-PQ
    index the pair search is approximate (the index's nprobe, PQ distances).

    Writes ``RUN/neardup/part-NNNNN.parquet`` (one per embeddings part: ``key``,
    ``duplicate_group`` = the canonical's index id, ``canonical_key``, ``near_duplicate`` =
    not the canonical) for the members of groups only, ``_done`` markers with counts, and
    ``summary.json``. :func:`add_near_duplicate` joins them onto a frame.
    """
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    run = RunDir(run) if isinstance(run, str | Path) else run
    t0 = time.perf_counter()
    knn = load_index(run, "image")
    meta = knn.metadata
    n = len(meta)
    parts = meta["part"].to_numpy()
    starts = {int(p): int(np.flatnonzero(parts == p)[0]) for p in np.unique(parts)}
    current = {str(p): _scores_fingerprint(run, p) for p in starts}
    changed = sorted(
        int(p) for p, fp in knn.info.scores_fingerprints.items() if current.get(p, fp) != fp
    )
    if changed:
        raise StaleNearDuplicates(
            f"{run.path}: RUN/index was built from other scores (parts {changed} were re-scored "
            "since): rebuild it first with `laion-dask index RUN`"
        )
    index_path = _index_path(run, "image")
    client = get_client(client)
    tasks = [
        (f"{p:05d}", _range_task, (run, p, off, float(threshold), index_path, knn.info.nprobe))
        for p, off in sorted(starts.items())
    ]
    results, _ = run_tasks(client, "neardup", tasks, strict=True)
    # pair order does not matter: a canonical takes all its free neighbours at once
    src = np.concatenate([r["src"] for r in results])
    dst = np.concatenate([r["dst"] for r in results])
    sim = meta[CAPTION_SIMILARITY].to_numpy(dtype="float64", na_value=np.nan)
    # highest caption similarity first (the member most likely to pass the filters), NaN last
    order = np.lexsort((np.arange(n), np.nan_to_num(-sim, nan=np.inf)))
    group = _greedy_groups(n, src, dst, order)
    members = group >= 0
    keys = meta[schema.KEY].astype("string").to_numpy(dtype=object)
    frame = pd.DataFrame(
        {
            schema.KEY: pd.array(keys[members], dtype="string"),
            DUPLICATE_GROUP: group[members],
            CANONICAL_KEY: pd.array(keys[group[members]], dtype="string"),
            NEAR_DUPLICATE: group[members] != np.flatnonzero(members),
            "part": parts[members],
        }
    )
    out_dir = run.join(NEARDUP_DIR)
    fs = run.fs
    if fs.exists(out_dir):
        fs.rm(out_dir, recursive=True)  # groups are run-wide: a re-run replaces them all
    run.makedirs(NEARDUP_DIR)
    for p in sorted(starts):
        rows = frame[frame["part"] == p].drop(columns="part").reset_index(drop=True)
        run.write_parquet_atomic(run.part_path(NEARDUP_DIR, p), rows)
        run.mark_done(
            NEARDUP_DIR,
            p,
            {
                "index": p,
                "images": int((parts == p).sum()),
                "members": len(rows),
                "near_duplicates": int(rows[NEAR_DUPLICATE].sum()),
                "threshold": float(threshold),
                "scores_fingerprint": current[str(p)],
            },
        )
    report = NearDupReport(
        threshold=float(threshold),
        images=n,
        groups=int(len(np.unique(group[members]))),
        members=int(members.sum()),
        near_duplicates=int(frame[NEAR_DUPLICATE].sum()),
        pairs=int(len(src)),
        index=knn.info.factory,
        parts=len(starts),
        seconds=time.perf_counter() - t0,
    )
    run.write_json_atomic(run.join(NEARDUP_DIR, "summary.json"), dataclasses.asdict(report))
    return report
