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

Output subsets (``[filters.subsets.NAME]``, e.g. Re-LAION's ``research-safe`` cut on ``punsafe``)
are written beside the base dataset in the same pass over the scores (each partition read once):
``RUN/dataset/NAME/{en,multi,nolang}/`` with the same files, and ``RUN/dataset/NAME/funnel.json``
(its own funnel: the base reasons, plus the rows of the base's kept ones that the subset's cut-offs
drop, by :data:`~laion_dask.stages.filters.SUBSET_REASONS`). ``RUN/dataset/funnel.json`` then
lists them
under ``subsets``.
"""

from __future__ import annotations

import dataclasses
import functools
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
import pyarrow.parquet as pq

from laion_dask.ground import schema
from laion_dask.ground.config import FilterConfig, check_subset_name
from laion_dask.ground.shards import ShardSample, read_shard_images, write_shard
from laion_dask.orchestration.rundir import RunDir, fingerprint
from laion_dask.orchestration.runner import get_client, run_tasks
from laion_dask.products.explore import Funnel
from laion_dask.products.neardup import join_part_near_duplicates
from laion_dask.stages.embeddings import embedding_paths, read_array, write_embedding_arrays
from laion_dask.stages.filters import (
    FINAL_REASON,
    add_final_reason,
    dump_thresholds,
    group_codes,
    load_thresholds,
    subset_final_reasons,
)

log = logging.getLogger(__name__)

__all__ = [
    "materialize",
    "MaterializeReport",
    "laion_columns",
    "read_dataset",
    "materialized_subsets",
    "LAION_COLUMNS",
]

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


@dataclass(kw_only=True)
class MaterializeReport(Funnel):
    """The funnel ``materialize`` applied (``funnel.json``), where it wrote and how long it took.

    ``subsets`` holds one report per output subset (name -> report, ``{}`` when there are
    none); each has the same ``rows_in`` and its own ``kept``, ``dropped`` and ``out_dir``.
    """

    stage: str = "materialize"
    out_dir: str = ""
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)
    subsets: dict[str, MaterializeReport] = field(default_factory=dict)

    def check(self) -> None:
        """Raise when the counts of the base dataset or of a subset do not add up."""
        super().check()
        for sub in self.subsets.values():
            sub.check()


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
    return read_array(paths["img"]), read_array(paths["text"]), run.read_parquet(paths["metadata"])


def _write_output(
    run: RunDir,
    part: int,
    df: pd.DataFrame,
    kept: np.ndarray,
    groups: pd.Series,
    dest: str,
    images: Callable[[], dict[str, bytes]],
    emb: tuple[np.ndarray, np.ndarray, pd.DataFrame] | None,
) -> dict[str, int]:
    """Write the ``kept`` rows of one partition to ``dest/{group}/``; kept rows per group."""
    kept_counts: dict[str, int] = {}
    for group in schema.LANGUAGE_GROUPS:
        sel = df[kept & groups.eq(group).to_numpy(dtype=bool)]
        kept_counts[group] = len(sel)
        if sel.empty:
            continue
        gdir = f"{dest}/{group}"
        run.fs.makedirs(gdir, exist_ok=True)
        table = laion_columns(sel)
        run.write_parquet_atomic(f"{gdir}/{part:05d}.parquet", table)
        blobs = images()
        samples = (
            ShardSample(
                key=str(row[schema.KEY]),
                image=blobs[str(row[schema.KEY])],
                text=str(row["TEXT"]),
                meta=dict(row.items()),
            )
            for _, row in table.iterrows()
            if str(row[schema.KEY]) in blobs
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
    return kept_counts


def _outcome(reason: pd.Series) -> tuple[np.ndarray, dict[str, int]]:
    kept = reason.isna().to_numpy(dtype=bool)
    return kept, {str(k): int(v) for k, v in reason.dropna().value_counts().items()}


def _materialize_part(part: int, run: RunDir, cfg: FilterConfig, out: str) -> dict:
    """One scored partition -> the base dataset and every subset (the scores, the shard and
    the embeddings are read once, whatever the number of subsets)."""
    df = run.read_parquet(run.part_path("scores", part))
    df = add_final_reason(join_part_near_duplicates(run, part, df), cfg)
    # the engine's groups: a missing or unknown one is nolang, as its similarity cut
    groups = pd.Series(
        np.asarray(schema.LANGUAGE_GROUPS)[group_codes(df[schema.LANGUAGE_GROUP])], index=df.index
    )
    emb = _read_embeddings(run, part)

    @functools.cache
    def images() -> dict[str, bytes]:  # the partition's shard, read on first use only
        shard = df[schema.SHARD].dropna()
        return read_shard_images(run.join("images", str(shard.iloc[0]))) if len(shard) else {}

    kept, dropped = _outcome(df[FINAL_REASON])
    result: dict[str, Any] = {
        "part": part,
        "rows": len(df),
        "kept": _write_output(run, part, df, kept, groups, out, images, emb),
        "dropped": dropped,
        "subsets": {},
    }
    for name, reason in subset_final_reasons(df, cfg).items():
        kept, dropped = _outcome(reason)
        result["subsets"][name] = {
            "kept": _write_output(run, part, df, kept, groups, f"{out}/{name}", images, emb),
            "dropped": dropped,
        }
    return result


def _merge(results: list[dict], key: str | None, **report: Any) -> MaterializeReport:
    """Sum kept per group and dropped per reason over partitions (of a subset, or the base)."""
    kept: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for r in results:
        r = r if key is None else r["subsets"][key]
        kept.update(r["kept"])
        dropped.update(r["dropped"])
    return MaterializeReport(
        kept={g: kept.get(g, 0) for g in schema.LANGUAGE_GROUPS},
        dropped=dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
        **report,
    )


def _write_cut(fs: Any, folder: str, funnel: dict[str, Any], thresholds: str) -> None:
    """``funnel.json`` and ``thresholds.toml`` of the base dataset or of one subset."""
    fs.makedirs(folder, exist_ok=True)
    fs.pipe(f"{folder}/funnel.json", json.dumps(funnel, indent=1).encode())
    fs.pipe(f"{folder}/thresholds.toml", thresholds.encode())


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

    With output subsets (``thresholds.subsets``), each is written to ``RUN/dataset/NAME/`` in
    the same pass, and ``report.subsets[NAME]`` is its funnel.

    Example
    -------
    >>> report = materialize("demo-run", "thresholds.toml")   # doctest: +SKIP
    >>> report.kept["en"]                                      # doctest: +SKIP
    >>> report.subsets["research-safe"].dropped["unsafe"]      # doctest: +SKIP
    """
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
    client = get_client(client)
    t0 = time.perf_counter()
    out = run.join("dataset")
    fs = run.fs
    if fs.exists(out):  # thresholds decide everything in here: start clean
        fs.rm(out, recursive=True)
    fs.makedirs(out, exist_ok=True)
    tasks = [(f"{p:05d}", _materialize_part, (p, run, cfg, out)) for p in parts]
    results, failures = run_tasks(client, "materialize", tasks, strict=True, on_done=progress)
    rows_in = sum(r["rows"] for r in results)
    seconds = time.perf_counter() - t0
    report = _merge(results, None, rows_in=rows_in, out_dir=out, seconds=seconds, failed=failures)
    for name in cfg.subsets or {}:
        stage, sub_dir = f"materialize/{name}", f"{out}/{name}"
        report.subsets[name] = _merge(
            results, name, stage=stage, rows_in=rows_in, out_dir=sub_dir, seconds=seconds
        )
    report.check()
    text = dump_thresholds(cfg)
    funnel: dict[str, Any] = {**report.to_dict(), "thresholds_fingerprint": fingerprint(text)}
    for name, sub in report.subsets.items():
        cut = {k: v for k, v in dataclasses.asdict(cfg.subsets[name]).items() if v is not None}
        sub_funnel = {"subset": name, "cut": cut, **sub.to_dict()}
        funnel.setdefault("subsets", {})[name] = sub_funnel
        note = f"# subset {name!r}: [filters] then [filters.subsets.{name}]\n"
        sub_funnel = {**sub_funnel, "thresholds_fingerprint": funnel["thresholds_fingerprint"]}
        _write_cut(fs, sub.out_dir, sub_funnel, note + text)
    _write_cut(fs, out, funnel, text)
    return report


def read_dataset(run: RunDir | str, group: str = "en", subset: str | None = None) -> pd.DataFrame:
    """The materialized LAION parquet of one language group (shards and embeddings sit beside it,
    as img2dataset lays them out, so read the ``*.parquet`` files, not the folder).

    ``subset`` names an output subset (``RUN/dataset/NAME``); None reads the base dataset. A name
    the last ``materialize`` did not write is a ``FileNotFoundError`` listing the ones it did.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    if group not in schema.LANGUAGE_GROUPS:
        raise ValueError(f"group must be one of {schema.LANGUAGE_GROUPS}, got {group!r}")
    fs = run.fs
    root = run.join("dataset")
    if subset is not None:
        check_subset_name(subset, "subset")
        if not fs.exists(f"{root}/{subset}/funnel.json"):
            raise FileNotFoundError(
                f"{root}: no subset {subset!r} (materialized subsets: "
                f"{', '.join(materialized_subsets(run)) or 'none'})"
            )
        root = f"{root}/{subset}"
    files = sorted(fs.glob(f"{root}/{group}/*.parquet"))
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


def materialized_subsets(run: RunDir | str) -> list[str]:
    """Names of the output subsets the last ``materialize`` wrote (from its ``funnel.json``)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    path = run.join("dataset", "funnel.json")
    return list(run.read_json(path).get("subsets", {})) if run.exists(path) else []
