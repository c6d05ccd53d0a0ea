"""Apply thresholds to stored scores and write the dataset: LAION parquet, shards, embeddings.

``RUN/dataset/{en,multi,nolang}/`` gets, per scored partition ``N``:

* ``NNNNN.parquet``: LAION's columns ``URL, TEXT, WIDTH, HEIGHT, similarity, hash, punsafe,
  pwatermark, LANGUAGE`` followed by ours (``key``, ``uid``, ``language_score`` ...);
* ``NNNNN.tar``: a webdataset shard with only the kept samples (img2dataset layout);
* ``embeddings/{img_emb,text_emb,metadata}/..._N``: the kept rows' embeddings
  (clip-retrieval layout).

Plus ``RUN/dataset/thresholds.toml`` (what was applied) and ``RUN/dataset/funnel.json`` (rows
kept and dropped per reason and language group; the counts add up). Re-running with other
thresholds rewrites ``RUN/dataset`` from the stored scores: nothing is re-downloaded or rescored.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import schema
from .config import FilterConfig
from .embeddings import embedding_paths, write_embedding_arrays
from .filters import FINAL_REASON, add_final_reason, dump_thresholds, load_thresholds
from .rundir import RunDir, fingerprint

log = logging.getLogger(__name__)

__all__ = ["materialize", "MaterializeReport", "laion_columns", "read_dataset", "LAION_COLUMNS"]

LAION_COLUMNS = [
    "URL",
    "TEXT",
    "WIDTH",
    "HEIGHT",
    "similarity",
    "hash",
    "punsafe",
    "pwatermark",
    "LANGUAGE",
]
_OURS = [
    schema.KEY,
    schema.UID,
    schema.PAGE_URL,
    schema.LANGUAGE_SCORE,
    schema.LANGUAGE_GROUP,
    schema.WIDTH,
    schema.HEIGHT,
    schema.ORIGINAL_BYTES,
    schema.SHA256,
    schema.SOURCE_FILE,
    schema.RECORD_OFFSET,
]


@dataclass
class MaterializeReport:
    """Rows in, kept per language group, dropped per reason; ``check()`` proves they add up."""

    stage: str = "materialize"
    rows_in: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # language group -> rows
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    out_dir: str = ""
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        return {"kept": sum(self.kept.values()), **self.dropped}

    def check(self) -> None:
        total = sum(self.kept.values()) + sum(self.dropped.values())
        if total != self.rows_in:
            raise AssertionError(f"materialize: {self.rows_in} in, {total} out")


def laion_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Kept rows -> LAION's metadata columns (+ ours). WIDTH/HEIGHT are the original size."""
    out = pd.DataFrame(
        {
            "URL": df[schema.URL].astype("string"),
            "TEXT": df[schema.TEXT].astype("string"),
            "WIDTH": df[schema.ORIGINAL_WIDTH].astype("Int32"),
            "HEIGHT": df[schema.ORIGINAL_HEIGHT].astype("Int32"),
            "similarity": df[schema.SIMILARITY].astype("float32"),
            "hash": df[schema.HASH].astype("int64"),
            "punsafe": df[schema.PUNSAFE].astype("float32"),
            "pwatermark": df[schema.PWATERMARK].astype("float32"),
            "LANGUAGE": df[schema.LANGUAGE].astype("string"),
        }
    )
    for c in _OURS:
        if c in df.columns:
            name = {schema.WIDTH: "stored_width", schema.HEIGHT: "stored_height"}.get(c, c)
            out[name] = df[c].to_numpy()
    return out.reset_index(drop=True)


def _read_embeddings(run: RunDir, part: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame] | None:
    paths = embedding_paths(run.join("embeddings"), part)
    if not run.exists(paths["img"]):
        return None
    fs = run.fs
    with fs.open(paths["img"], "rb") as fh:
        img_emb = np.load(io.BytesIO(fh.read()))
    with fs.open(paths["text"], "rb") as fh:
        txt_emb = np.load(io.BytesIO(fh.read()))
    return img_emb, txt_emb, run.read_parquet(paths["metadata"])


def _materialize_part(part: int, run: RunDir, cfg: FilterConfig, out: str) -> dict:
    from .shards import ShardSample, read_shard_images, write_shard

    df = run.read_parquet(run.part_path("scores", part))
    df = add_final_reason(df, cfg)
    reason = df[FINAL_REASON]
    kept = reason.isna().to_numpy(dtype=bool)
    dropped = {str(k): int(v) for k, v in reason.dropna().value_counts().items()}
    groups = df[schema.LANGUAGE_GROUP].astype("string").fillna("nolang")
    kept_counts: dict[str, int] = {}
    images: dict[str, bytes] | None = None
    emb = _read_embeddings(run, part)
    for group in schema.LANGUAGE_GROUPS:
        sel = df[kept & groups.eq(group).to_numpy(dtype=bool)]
        kept_counts[group] = len(sel)
        if sel.empty:
            continue
        gdir = f"{out}/{group}"
        run.fs.makedirs(gdir, exist_ok=True)
        table = laion_columns(sel)
        run.write_parquet_atomic(f"{gdir}/{part:05d}.parquet", table)
        if images is None:
            shard = df[schema.SHARD].dropna()
            images = read_shard_images(run.join("images", str(shard.iloc[0]))) if len(shard) else {}
        samples = (
            ShardSample(
                key=str(row[schema.KEY]),
                image=images[str(row[schema.KEY])],
                text=str(row["TEXT"]),
                meta=dict(row.items()),
            )
            for _, row in table.iterrows()
            if str(row[schema.KEY]) in images
        )
        write_shard(f"{gdir}/{part:05d}.tar", samples)
        if emb is not None:
            img_emb, txt_emb, meta = emb
            pos = pd.Series(np.arange(len(meta)), index=meta[schema.KEY].astype(str))
            idx = pos.reindex(table[schema.KEY].astype(str)).dropna().astype(int).to_numpy()
            keys = meta[schema.KEY].astype(str).to_numpy()[idx]
            write_embedding_arrays(
                f"{gdir}/embeddings", part, keys, img_emb[idx], txt_emb[idx], table
            )
    return {"part": part, "rows": len(df), "kept": kept_counts, "dropped": dropped}


def materialize(
    run: RunDir | str,
    thresholds: FilterConfig | str | Path | None = None,
    *,
    client: Any | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> MaterializeReport:
    """Write ``RUN/dataset`` for ``thresholds`` (a FilterConfig, a thresholds.toml path, or the
    run config's ``[filters]``); returns the funnel. ``progress(done, total, part)`` is called
    as each partition finishes.

    Example
    -------
    >>> report = materialize("demo-run", "thresholds.toml")   # doctest: +SKIP
    >>> report.kept["en"]                                      # doctest: +SKIP
    """
    from .pipeline import _get_client, _run_tasks

    run = run if isinstance(run, RunDir) else RunDir(run)
    if thresholds is None:
        cfg = run.read_config().filters
    elif isinstance(thresholds, FilterConfig):
        cfg = thresholds
    else:
        cfg = load_thresholds(thresholds)
    parts = sorted(run.markers("scores"))
    if not parts:
        raise FileNotFoundError(f"{run.path}: no scores; run the score stage first")
    client = _get_client(client)
    t0 = time.perf_counter()
    out = run.join("dataset")
    fs = run.fs
    if fs.exists(out):  # thresholds decide everything in here: start clean
        fs.rm(out, recursive=True)
    fs.makedirs(out, exist_ok=True)
    tasks = [(f"{p:05d}", _materialize_part, (p, run, cfg, out)) for p in parts]
    results, failures = _run_tasks(
        client, "materialize", tasks, strict=True, on_done=progress
    )
    report = MaterializeReport(out_dir=out, failed=failures)
    kept: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for r in results:
        report.rows_in += r["rows"]
        kept.update(r["kept"])
        dropped.update(r["dropped"])
    report.kept = {g: kept.get(g, 0) for g in schema.LANGUAGE_GROUPS}
    report.dropped = dict(sorted(dropped.items(), key=lambda kv: -kv[1]))
    report.seconds = time.perf_counter() - t0
    report.check()
    fs.pipe(f"{out}/thresholds.toml", dump_thresholds(cfg).encode())
    funnel = {
        "rows_in": report.rows_in,
        "kept": report.kept,
        "dropped": report.dropped,
        "thresholds_fingerprint": fingerprint(dump_thresholds(cfg)),
    }
    fs.pipe(f"{out}/funnel.json", json.dumps(funnel, indent=1).encode())
    return report


def read_dataset(run: RunDir | str, group: str = "en") -> pd.DataFrame:
    """The materialized LAION parquet of one language group (shards and embeddings sit beside it,
    as img2dataset lays them out, so read the ``*.parquet`` files, not the folder)."""
    import pyarrow.parquet as pq

    run = run if isinstance(run, RunDir) else RunDir(run)
    if group not in schema.LANGUAGE_GROUPS:
        raise ValueError(f"group must be one of {schema.LANGUAGE_GROUPS}, got {group!r}")
    fs = run.fs
    files = sorted(fs.glob(run.join("dataset", group, "*.parquet")))
    if not files:
        return laion_columns(
            schema.empty(
                schema.CANDIDATES_DTYPES,
                schema.DOWNLOAD_DTYPES,
                schema.SHARD_DTYPES,
                schema.SCORE_DTYPES,
            )
        )
    return pq.ParquetDataset(files, filesystem=fs).read().to_pandas()
