"""The Dask wiring: the only module that maps stages over Dask collections.

Two faces:

* lazy graphs for notebooks (:func:`candidates_graph`): ``dd.from_map`` + ``map_partitions`` with
  ``meta=`` from :mod:`laion_dask.ground.schema`; nothing runs until the user computes;
* checkpointed stage runners (:func:`run_extract`, :func:`run_download`, :func:`run_score`) that
  write one parquet part + one ``_done`` marker per partition into the run directory, skip
  finished partitions on re-run, and report per-partition failures by name instead of losing the
  run (or stop at the first one with ``strict``).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Any, NamedTuple

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.dataset as pds
from distributed import get_worker

from laion_dask.ground import schema
from laion_dask.ground.config import PipelineConfig, config_to_dict
from laion_dask.ground.shards import ShardSample, make_key, read_shard_images, write_shard
from laion_dask.orchestration.cluster import scoring_resources
from laion_dask.orchestration.rundir import ConfigChanged, RunDir, fingerprint
from laion_dask.orchestration.runner import StageError, get_client, run_tasks
from laion_dask.stages import planner
from laion_dask.stages.clip import (
    check_model_available,
    encoder_from_config,
    encoder_info,
    score_partition,
)
from laion_dask.stages.consent import load_lists
from laion_dask.stages.download import download_images, download_stats, is_transient
from laion_dask.stages.embeddings import embedding_paths, write_embedding_arrays
from laion_dask.stages.extract import CHUNK_ROWS, extract_pairs, stream_file
from laion_dask.stages.language import add_language
from laion_dask.stages.rules import (
    DEDUP_COLUMNS,
    DUPLICATES_META,
    add_drop_reason,
    find_duplicates,
    mark_duplicates,
)
from laion_dask.stages.sources import expand_inputs

log = logging.getLogger(__name__)

__all__ = [
    "StageReport",
    "StageError",
    "ConfigChanged",
    "candidates_graph",
    "run_extract",
    "run_download",
    "run_score",
    "check_config_changes",
    "is_transient_failure",
]


@dataclass
class StageReport:
    """What one stage did: partitions run/resumed/failed and counts that add up."""

    stage: str
    partitions: int = 0
    resumed: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # partition name -> error
    rows_in: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # outcome -> rows
    seconds: float = 0.0

    @property
    def rows_out(self) -> int:
        return sum(self.counts.values())

    def check(self) -> None:
        """Raise if the counts do not add up (rows in = sum of outcomes)."""
        if self.rows_in != self.rows_out:
            raise AssertionError(
                f"{self.stage}: counts do not add up: {self.rows_in} in, "
                f"{self.rows_out} out {self.counts}"
            )


# --- lazy graph for notebooks -------------------------------------------------------------------


def candidates_graph(
    paths: Sequence[str], cfg: PipelineConfig, *, deduplicate: bool = True
) -> dd.DataFrame:
    """A lazy Dask frame of candidates: one partition per input file, duplicates marked.

    Nothing is written and nothing runs until ``.compute()``/``.to_parquet()``; use it in a
    notebook to look at a sample, and :func:`run_extract` for a checkpointed run.
    """
    ddf = dd.from_map(
        extract_pairs, list(paths), cfg=cfg.extract, consent=cfg.consent, meta=schema.PAIRS
    )
    ddf = ddf.map_partitions(add_language, cfg.language, meta=schema.LANGUAGE_TAGGED)
    ddf = ddf.map_partitions(add_drop_reason, cfg.rules, cfg.consent, meta=schema.CANDIDATES)
    if not (deduplicate and cfg.rules.deduplicate):
        return ddf
    dups = ddf[DEDUP_COLUMNS].shuffle(on=schema.HASH)
    dups = dups.map_partitions(find_duplicates, meta=DUPLICATES_META)
    return ddf.map_partitions(_mark_from_frame, dups.compute(), meta=schema.CANDIDATES)


def _mark_from_frame(df: pd.DataFrame, dups: pd.DataFrame) -> pd.DataFrame:
    return mark_duplicates(df, set(dups[schema.UID]))


# --- stage configs ------------------------------------------------------------------------------

#: keys that decide how fast or how politely a stage runs, never what it writes: left out of the
#: fingerprints, so tuning them for a cluster resumes a run instead of redoing it
_SPEED_KEYS = {
    "download": ("concurrency", "per_host_concurrency", "per_host_interval", "decode_threads"),
    "clip": ("loader_threads",),
}

#: stage name (as run_pipeline knows it) -> the folder holding its markers and _config.json
_STAGE_FOLDER = {"extract": "extract", "download": "downloads", "score": "scores"}

#: the ``[consent]`` keys extraction depends on (others only re-run the download)
_PAGE_CONSENT = ("page_meta", "meta_tokens", "meta_names", "tdm_reservation")

#: changes applied on a re-run without ``force``: a new opt-out or blocklist entry must never
#: wait for a flag (the affected partitions are redone, as their fingerprints say)
_ALWAYS_APPLIED = ("consent_lists",)


def _sections(cfg: PipelineConfig, *sections: str) -> dict[str, Any]:
    full = config_to_dict(cfg)
    out = {s: full.get(s) for s in sections}
    for section, keys in _SPEED_KEYS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    return out


def _stage_config(
    cfg: PipelineConfig, stage: str, lists_fingerprint: str | None = None
) -> dict[str, Any]:
    """The config a stage's fingerprints hash: its sections, less the speed knobs."""
    if stage == "extract":
        consent = config_to_dict(cfg)["consent"]
        page = {k: consent[k] for k in _PAGE_CONSENT}
        return _sections(cfg, "extract", "language", "rules") | {"consent_page": page}
    if stage == "download":
        if lists_fingerprint is None:
            lists_fingerprint = load_lists(cfg.consent).fingerprint
        return _sections(cfg, "download", "consent") | {
            "consent_lists": lists_fingerprint,
            "chunks": planner.CHUNKING,
        }
    if stage == "score":
        return _sections(cfg, "clip")
    raise ValueError(f"no stage config for {stage!r}")


def check_config_changes(
    run: RunDir, cfg: PipelineConfig, stages: Iterable[str] = ("extract", "download", "score")
) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Per stage, the config keys that differ from what its finished partitions were made with.

    Reads only ``RUN/<stage>/_config.json`` and lists ``_done/``; runs nothing. A stage without
    finished partitions (or a run made before stage configs were recorded) reports no change,
    nor does a changed consent list file (always applied, see ``_ALWAYS_APPLIED``).
    """
    out: dict[str, dict[str, tuple[Any, Any]]] = {}
    for stage in stages:
        folder = _STAGE_FOLDER.get(stage)
        if folder is None or not run.has_markers(folder):
            continue  # before _stage_config: it reads the consent lists
        changes = run.stage_config_changes(folder, _stage_config(cfg, stage))
        changes = {k: v for k, v in changes.items() if k not in _ALWAYS_APPLIED}
        if changes:
            out[stage] = changes
    return out


def _start_stage(
    run: RunDir,
    stage: str,
    folders: tuple[str, ...],
    stage_cfg: dict[str, Any],
    force: bool,
    *,
    allowed: Iterable[str] = (),
    scratch: tuple[str, ...] = (),
) -> None:
    """Refuse a changed config (:class:`ConfigChanged`, unless ``force``), create ``folders``,
    then remove what killed tasks of an earlier attempt left half-written in them and in
    ``scratch`` (:meth:`RunDir.remove_tmp_files`: no task of this stage has started yet)."""
    run.check_stage_config(folders[0], stage_cfg, force=force, allowed=allowed)
    run.makedirs(*folders)
    removed = run.remove_tmp_files(*folders, *scratch)
    if removed:
        log.info("%s: removed %d temporary files left by killed tasks", stage, len(removed))


def _resumed(run: RunDir, stage: str, index: int, fp: str) -> dict | None:
    """The marker of a partition already made with fingerprint ``fp``, as a resumed result."""
    marker = run.done_marker(stage, index, fp)
    return None if marker is None else {**marker, "resumed": True}


def _finished(run: RunDir, stage: str, index: int, fp: str, **info: Any) -> dict:
    """Write a partition's marker (after its data) and return it as this run's result."""
    info = {"fingerprint": fp, "index": index, **info}
    run.mark_done(stage, index, info)
    return {**info, "resumed": False}


# --- extract + candidates -----------------------------------------------------------------------


class _FileFailed(Exception):
    def __init__(self, summary: Any) -> None:
        super().__init__(summary.error)
        self.summary = summary


def _extract_task(path: str, index: int, run: RunDir, cfg: PipelineConfig, fp: str) -> dict:
    """One input file -> RUN/extract/part-N.parquet (pairs + language + rule reasons).

    Streamed: the file's pairs arrive in chunks of ``extract.CHUNK_ROWS``
    (:func:`~laion_dask.stages.extract.stream_file`), each tagged and written as one row group, so
    the task holds one chunk whatever the file's size. A file that fails leaves no part.
    """
    if (resumed := _resumed(run, "extract", index, fp)) is not None:
        return resumed
    t0 = time.perf_counter()
    reasons: Counter[str] = Counter()
    try:
        with run.parquet_writer_atomic(run.part_path("extract", index), schema.CANDIDATES) as part:

            def write(pairs: pd.DataFrame) -> None:
                df = add_drop_reason(add_language(pairs, cfg.language), cfg.rules, cfg.consent)
                reasons.update(_value_counts(df[schema.DROP_REASON]))
                part.write(df)

            summary = stream_file(path, cfg.extract, cfg.consent, sink=write)
            if summary.error:
                raise _FileFailed(summary)  # leaves the block: the partial part is removed
    except _FileFailed as failed:
        if cfg.strict:
            raise StageError(f"{path}: {failed.summary.error}") from None
        # no part, no marker: the file is reported by name and retried by the next run
        return {
            "index": index,
            "source_file": path,
            "summary": failed.summary.to_dict(),
            "resumed": False,
            "failed": True,
        }
    return _finished(
        run,
        "extract",
        index,
        fp,
        source_file=path,
        rows=summary.pairs_found,
        row_groups=part.row_groups,
        summary=summary.to_dict(),
        drop_reasons=dict(reasons),
        seconds=time.perf_counter() - t0,
    )


def _value_counts(s: pd.Series) -> dict[str, int]:
    counts = s.fillna("kept").value_counts()
    return {str(k): int(v) for k, v in counts.items()}


def _part_groups(run: RunDir, stage: str, indices: Sequence[int]) -> list[PartGroup]:
    """One item per row group of each finished part of ``stage``, from its marker.

    Dask partitions over these hold one row group (at most ``extract.CHUNK_ROWS`` rows), not one
    input file's rows. A marker from before row groups were recorded gives one whole-part item.
    """
    items: list[PartGroup] = []
    for index in indices:
        path = run.part_path(stage, index)
        groups = (run.done_marker(stage, index) or {}).get("row_groups")
        if not groups:  # an empty part still gives the shuffle its (empty) partition
            items.append(PartGroup(index, path, None, 0))
            continue
        firsts = accumulate(groups[:-1], initial=0)
        items += [PartGroup(index, path, g, first) for g, first in enumerate(firsts)]
    return items


class PartGroup(NamedTuple):
    """A row group of one stage part: ``group`` None = the whole part; ``first_row`` its
    position in the part."""

    index: int
    path: str
    group: int | None
    first_row: int


_DEDUP_META = schema.CANDIDATES[DEDUP_COLUMNS].assign(part=pd.Series(dtype="int64"))


def _load_dedup_part(item: PartGroup, run: RunDir) -> pd.DataFrame:
    df = run.read_parquet_group(item.path, item.group, columns=DEDUP_COLUMNS)
    return df.assign(part=pd.Series(item.index, index=df.index, dtype="int64"))


def _dups_with_part(df: pd.DataFrame) -> pd.DataFrame:
    # equal (url, text) means equal hash: only rows whose hash repeats among kept rows can be
    # duplicates, so find_duplicates sorts those alone (on the bench's 420,000 pairs: 0.85 s of
    # sorting strings before, none after)
    kept = df.loc[df[schema.DROP_REASON].isna(), schema.HASH]
    df = df[df[schema.HASH].isin(kept[kept.duplicated()])]
    dup = find_duplicates(df.drop(columns=["part"]))
    hit = df[schema.UID].isin(set(dup[schema.UID]))
    return df.loc[hit, [schema.UID, "part"]].reset_index(drop=True)


#: runs of up to this many pairs find their duplicates in one task (:func:`_dedup_task`) instead
#: of a Dask shuffle. The task holds the hashes of every row (8 bytes each) and the dedup columns
#: of the rows whose hash repeats (~200 MB at worst here); the shuffle's fixed cost (a graph,
#: the P2P extension on every worker, a parquet dataset) was most of the stage's last seconds
#: on small runs. ``laion-dask extract`` on two 100 MB WATs (420,726 pairs), CPU of the
#: whole process tree: 3.6 s for duplicates + candidates before, ~0.5 s after.
_DEDUP_ONE_TASK_ROWS = 1_000_000


def _dedup_task(items: list[PartGroup], run: RunDir, folder: str) -> int:
    """Run-wide duplicates of the extract parts' row groups ``items`` found in one task, written
    as ``folder/part.0.parquet`` (uid, part), as the shuffle's dataset would hold them.

    Reads the hash and drop reason of every row first; the dedup columns are then read only for
    the row groups holding a kept row whose hash repeats. Returns the number of duplicates.
    """
    kept: list[np.ndarray] = []  # the hashes of each item's kept rows
    for item in items:
        df = run.read_parquet_group(
            item.path, item.group, columns=[schema.HASH, schema.DROP_REASON]
        )
        kept.append(df.loc[df[schema.DROP_REASON].isna(), schema.HASH].to_numpy(dtype="int64"))
    every, counts = np.unique(np.concatenate(kept or [np.zeros(0, "int64")]), return_counts=True)
    repeated = every[counts > 1]
    frames = [_DEDUP_META]
    for item, hashes in zip(items, kept, strict=True):
        if np.isin(hashes, repeated).any():
            df = _load_dedup_part(item, run)
            frames.append(df[df[schema.HASH].isin(repeated)])
    dups = _dups_with_part(pd.concat(frames, ignore_index=True))
    run.fs.makedirs(folder, exist_ok=True)
    run.write_parquet_atomic(f"{folder}/part.0.parquet", dups)
    return len(dups)


def _candidates_task(index: int, run: RunDir, dup_dir: str | None, fp: str) -> dict:
    if (resumed := _resumed(run, "candidates", index, fp)) is not None:
        return resumed
    dup_uids: set[str] = set()
    fs = run.fs
    if dup_dir is not None and fs.exists(dup_dir) and fs.ls(dup_dir):
        table = pds.dataset(dup_dir, format="parquet", filesystem=fs).to_table(
            columns=[schema.UID], filter=pds.field("part") == index
        )
        dup_uids = set(table.column(schema.UID).to_pylist())
    extracted = run.done_marker("extract", index) or {}
    if not dup_uids and "row_groups" in extracted and "drop_reasons" in extracted:
        # nothing to mark: the candidates part is the extract part (same rows, same row groups,
        # same counts), copied instead of decoded and encoded again (~0.35 s per 100 MB WAT)
        path = run.part_path("candidates", index)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"  # RunDir.remove_tmp_files' pattern
        run.fs.copy(run.part_path("extract", index), tmp)
        run.fs.mv(tmp, path)
        groups = extracted["row_groups"]
        reasons = extracted["drop_reasons"]
        return _finished(
            run, "candidates", index, fp, rows=sum(groups), row_groups=groups, drop_reasons=reasons
        )
    reasons: Counter[str] = Counter()
    # row group by row group: the task holds one chunk of the part, whatever the file's size
    with run.parquet_writer_atomic(run.part_path("candidates", index), schema.CANDIDATES) as part:
        for df in run.iter_parquet_groups(run.part_path("extract", index)):
            out = mark_duplicates(df, dup_uids)
            reasons.update(_value_counts(out[schema.DROP_REASON]))
            part.write(out)
    return _finished(
        run,
        "candidates",
        index,
        fp,
        rows=sum(part.row_groups),
        row_groups=part.row_groups,
        drop_reasons=dict(reasons),
    )


def run_extract(
    run: RunDir,
    cfg: PipelineConfig,
    paths: Sequence[str] | None = None,
    *,
    client: Any | None = None,
    show_progress: bool = False,
    force: bool = False,
) -> StageReport:
    """Extract, tag and rule-check every input file, then mark run-wide duplicates.

    Writes ``RUN/extract/`` (one part per input file) and ``RUN/candidates/`` (the same rows with
    ``duplicate`` reasons added). Finished partitions are skipped; an unreadable file fails its
    own partition only (reported by name) unless ``cfg.strict``. A config that would change
    finished partitions raises :class:`ConfigChanged` naming the keys, unless ``force``.
    """
    client = get_client(client)
    t0 = time.perf_counter()
    paths = list(paths) if paths is not None else expand_inputs(cfg.input.paths, cfg.input)
    stage_cfg = _stage_config(cfg, "extract")
    _start_stage(run, "extract", ("extract", "candidates"), stage_cfg, force)
    ex_cfg = (
        cfg
        if not cfg.strict
        else replace(cfg, extract=replace(cfg.extract, skip_unreadable_files=False))
    )
    tasks = [
        (f"{i:05d}", _extract_task, (p, i, run, ex_cfg, fingerprint(p, stage_cfg)))
        for i, p in enumerate(paths)
    ]
    results, failures = run_tasks(
        client, "extract", tasks, strict=cfg.strict, show_progress=show_progress
    )
    results.sort(key=lambda r: r["index"])
    failures = {paths[int(k)]: v for k, v in failures.items()}
    failures |= {r["source_file"]: r["summary"].get("error") for r in results if r.get("failed")}

    # run-wide duplicates: shuffle (hash, url, text, order) so equal pairs meet in one partition
    results = [r for r in results if not r.get("failed")]
    cand_fp = fingerprint([r["fingerprint"] for r in results], stage_cfg)
    done = [r["index"] for r in results]
    dup_dir = None
    if cfg.rules.deduplicate and any(
        run.done_marker("candidates", i, cand_fp) is None for i in done
    ):
        dup_dir = run.join("duplicates", cand_fp)
        if not run.exists(dup_dir):
            items = _part_groups(run, "extract", done)
            tmp = dup_dir + ".tmp"
            if run.exists(tmp):  # left by a run killed mid-write: never mix its files in
                run.fs.rm(tmp, recursive=True)
            if sum(int(r.get("rows") or 0) for r in results) <= _DEDUP_ONE_TASK_ROWS:
                client.submit(_dedup_task, items, run, tmp, pure=False, retries=1).result()
            else:
                ddf = dd.from_map(_load_dedup_part, items, run=run, meta=_DEDUP_META)
                meta = _DEDUP_META[[schema.UID, "part"]]
                dups = ddf.shuffle(on=schema.HASH).map_partitions(_dups_with_part, meta=meta)
                dups.to_parquet(tmp, write_index=False, compute=False).compute()
            run.fs.mv(tmp, dup_dir, recursive=True)
    for stage in ("extract", "candidates"):
        _forget(run, stage, set(run.marker_indices(stage)) - set(done))
    cand_tasks = [(f"{i:05d}", _candidates_task, (i, run, dup_dir, cand_fp)) for i in done]
    cand_results, cand_fail = run_tasks(client, "candidates", cand_tasks, strict=cfg.strict)
    failures |= {f"candidates-{k}": v for k, v in cand_fail.items()}
    # rows in: the pairs of every file whose candidates part is written (the same rows)
    report = _stage_report("extract", len(paths), cand_results, failures, "drop_reasons", t0)
    report.resumed = sum(1 for r in results if r.get("resumed"))
    return report


def _forget(
    run: RunDir,
    stage: str,
    indices: Iterable[int],
    extra: Callable[[int], list[str]] = lambda index: [],
) -> None:
    """Drop partitions ``indices`` of ``stage``: marker, part and the ``extra(index)`` files.

    They were left by an earlier run with other inputs, or by a plan with more shards; later
    stages (materialize, explore, the report) would otherwise read rows this run never made.
    """
    fs = run.fs
    for index in indices:
        for path in [run.marker_path(stage, index), run.part_path(stage, index), *extra(index)]:
            if fs.exists(path):
                fs.rm(path)


# --- download -----------------------------------------------------------------------------------

#: RUN/consent/chain-N/*.jsonl: robots.txt / tdmrep.json results of a chain's hosts, fetched once
#: per run (one journal file per download call; see consent.HostFileCache)
_CONSENT_CACHE = "consent"


#: RUN/download_plan/<fingerprint>/: every candidate row, shuffled into host buckets
_PLAN = "download_plan"


def _host_counts(item: PartGroup, run: RunDir) -> pd.DataFrame:
    df = run.read_parquet_group(item.path, item.group, columns=planner.HOST_COLUMNS)
    return planner.host_counts(df)


def _plan_part(item: PartGroup, run: RunDir, n_buckets: int, big_path: str | None) -> pd.DataFrame:
    """One candidates row group with its bucket, key and position (the plan shuffle's input)."""
    df = schema.conform(run.read_parquet_group(item.path, item.group), schema.CANDIDATES_DTYPES)
    big = run.read_parquet(big_path) if big_path is not None else None
    return planner.assign_buckets(df, n_buckets, big, part=item.index, first_row=item.first_row)


_BUCKET_COUNTS_META = pd.DataFrame(
    {"bucket": pd.Series(dtype="int64"), "rows": pd.Series(dtype="int64")}
)


def _bucket_path(folder: str, bucket: int) -> str:
    return f"{folder}/bucket-{bucket:05d}.parquet"


def _write_buckets(df: pd.DataFrame, run: RunDir, folder: str, rows_per_task: int) -> pd.DataFrame:
    """Write each bucket of one shuffled partition to its own file; return rows per bucket.

    Row groups are the bucket's chunks, so a download task reads one chunk at a time even for a
    huge bucket.
    """
    buckets: list[int] = []
    counts: list[int] = []
    for bucket, frame in planner.split_buckets(df):
        size = planner.chunk_bounds(len(frame), rows_per_task)[0][1]
        run.write_parquet_atomic(_bucket_path(folder, bucket), frame, row_group_rows=size)
        buckets.append(bucket)
        counts.append(len(frame))
    return pd.DataFrame(
        {"bucket": np.array(buckets, dtype="int64"), "rows": np.array(counts, dtype="int64")}
    )


#: runs of up to this many candidates are planned by one task (:func:`_plan_task`), which holds
#: them all (~300 bytes a row), instead of a Dask groupby and shuffle: two graphs and the P2P
#: extension were most of a small download's plan. ``laion-dask download`` of 20 images, whole
#: process tree: 4.8-5.2 s CPU before, 4.4-4.5 s after
_PLAN_ONE_TASK_ROWS = 4 * CHUNK_ROWS


def _plan_task(
    groups: list[PartGroup], run: RunDir, folder: str, n_buckets: int, rows_per_task: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole plan in one task: host counts, big hosts (``_big_hosts.parquet`` when any), the
    bucket files; returns the rows per bucket and the big hosts. The same files as the shuffle
    (:func:`planner.split_buckets` orders each bucket by its rows' origin, not by arrival)."""
    counts = pd.concat([planner.HOST_COUNTS_META, *(_host_counts(g, run) for g in groups)])
    totals = counts.groupby("_key")["n"].sum()
    big = planner.big_host_buckets(totals, rows_per_task, n_buckets)
    big_path = None
    if len(big):
        big_path = f"{folder}/_big_hosts.parquet"
        run.write_parquet_atomic(big_path, big)
    rows = pd.concat([_plan_part(g, run, n_buckets, big_path) for g in groups], ignore_index=True)
    return _write_buckets(rows, run, folder, rows_per_task), big


def _download_plan(
    run: RunDir, cfg: PipelineConfig, cand: dict[int, dict], client: Any
) -> dict[str, Any]:
    """Shuffle every candidate row into host buckets, once per candidates + ``rows_per_task``.

    The buckets, big hosts and chains are :mod:`laion_dask.stages.planner`'s. The shuffle is
    Dask's (disk-backed P2P on a distributed cluster): tasks write
    ``RUN/download_plan/<fp>/bucket-NNNNN.parquet`` and only per-bucket row counts and the big
    hosts come back to the client. ``_plan.json`` is written last: a plan without it (a killed
    run) is redone. Nothing in the plan depends on the number of workers.
    """
    rows = cfg.download.rows_per_task
    total = sum(int(m["rows"]) for m in cand.values())
    parts = sorted(cand)
    plan_fp = fingerprint(
        planner.CHUNKING,
        planner.BIG_HOST,
        rows,
        [(i, cand[i]["fingerprint"], cand[i]["rows"]) for i in parts],
    )
    folder = run.join(_PLAN, plan_fp)
    info_path = f"{folder}/_plan.json"
    fs = run.fs
    if run.exists(info_path):
        return {**run.read_json(info_path), "folder": folder}
    if fs.exists(folder):  # left by a run killed while planning: never mix its files in
        fs.rm(folder, recursive=True)
    fs.makedirs(folder, exist_ok=True)
    n_buckets = planner.bucket_count(total, rows)
    buckets: list[list[int]] = []
    chains: list[list[int]] = []
    if total and total <= _PLAN_ONE_TASK_ROWS:
        groups = _part_groups(run, "candidates", parts)
        args = (groups, run, folder, n_buckets, rows)
        got, big = client.submit(_plan_task, *args, pure=False, retries=1).result()
        buckets = sorted([int(b), int(n)] for b, n in zip(got["bucket"], got["rows"], strict=True))
        chains = planner.chains((b for b, _ in buckets), n_buckets, big)
    elif total:
        # fetched rows per host: per-part counts summed by a Dask groupby; only the big hosts
        # (at most rows / (BIG_HOST x rows_per_task) of them) come back to the client
        groups = _part_groups(run, "candidates", parts)
        counts = dd.from_map(_host_counts, groups, run=run, meta=planner.HOST_COUNTS_META)
        hosts = counts.groupby("_key")["n"].sum(split_out=max(1, len(parts) // 16))
        big = client.compute(hosts[hosts > planner.BIG_HOST * rows]).result()
        big = planner.big_host_buckets(big, rows, n_buckets)
        big_path = None
        if len(big):
            big_path = f"{folder}/_big_hosts.parquet"
            run.write_parquet_atomic(big_path, big)
        ddf = dd.from_map(
            _plan_part,
            groups,
            run=run,
            n_buckets=n_buckets,
            big_path=big_path,
            meta=planner.PLAN_META,
        )
        # output partitions of about one extraction chunk each (never one input file's rows)
        npartitions = max(
            1, min(n_buckets + int(big["k"].sum()), max(len(parts), math.ceil(total / CHUNK_ROWS)))
        )
        counts = ddf.shuffle(on="_bucket", npartitions=npartitions).map_partitions(
            _write_buckets, run, folder, rows, meta=_BUCKET_COUNTS_META
        )
        got = client.compute(counts).result()
        buckets = sorted([int(b), int(n)] for b, n in zip(got["bucket"], got["rows"], strict=True))
        chains = planner.chains((b for b, _ in buckets), n_buckets, big)
    if sum(n for _, n in buckets) != total:
        raise StageError(
            f"download plan holds {sum(n for _, n in buckets)} rows, candidates {total}"
        )
    info = {
        "fingerprint": plan_fp,
        "chunking": planner.CHUNKING,
        "rows_per_task": rows,
        "n_buckets": n_buckets,
        "rows": total,
        "buckets": buckets,  # [bucket, rows] of the non-empty buckets, in bucket order
        "chains": chains,  # buckets downloaded one after the other by one task
    }
    run.write_json_atomic(info_path, info)
    # plans made from other candidates or another rows_per_task are never read again
    for path in fs.ls(run.join(_PLAN), detail=False):
        if path.rstrip("/").rsplit("/", 1)[-1] != plan_fp:
            fs.rm(path, recursive=True)
    return {**info, "folder": folder}


def _download_chain_task(
    chunks: list[planner.Chunk],
    chain: int,
    parts: int,
    plan_fp: str,
    folder: str,
    run: RunDir,
    cfg: PipelineConfig,
    stage_cfg: dict[str, Any],
    retry_failed: bool,
) -> list[dict]:
    """``chunks`` of the chain whose first bucket is ``chain``, one after the other -> one shard
    and one downloads part each.

    The chunks of a chain never run at once within a task; a chain split into ``parts`` tasks
    (:func:`planner.chain_parts`) gives each of them ``1/parts`` of ``per_host_concurrency``,
    so the chain's hosts still see at most ``per_host_concurrency`` requests from the whole
    cluster. Each chunk has its own marker, and its fingerprint does not depend on ``parts``: a
    task killed halfway resumes at its first unfinished chunk, however the chain is split then.
    """
    dl_cfg = cfg.download
    if parts > 1:
        dl_cfg = replace(dl_cfg, per_host_concurrency=dl_cfg.per_host_concurrency // parts)
    out: list[dict] = []
    for c in chunks:
        fp = fingerprint(plan_fp, c.bucket, c.chunk, stage_cfg)
        if retry_failed and run.done_marker("downloads", c.shard_id) is not None:
            out.append(_retry_task(c.shard_id, run, cfg, fp))
        elif (resumed := _resumed(run, "downloads", c.shard_id, fp)) is not None:
            out.append(resumed)
        else:
            rows = run.read_parquet_rows(_bucket_path(folder, c.bucket), c.start, c.stop)
            df = schema.conform(rows, schema.CANDIDATES_DTYPES)
            t0 = time.perf_counter()
            cache = _host_cache(run, chain)
            got = download_images(df, dl_cfg, consent=cfg.consent, host_cache=cache)
            extra = {"chain": chain, "bucket": c.bucket, "chunk": c.chunk}
            seconds = time.perf_counter() - t0
            out.append(_write_download_part(run, c.shard_id, got, fp, seconds, extra))
    return out


def _write_download_part(
    run: RunDir, shard_id: int, out: pd.DataFrame, fp: str, seconds: float, extra: dict
) -> dict:
    """Write the shard (successes only) and the downloads part (every row, no image bytes)."""
    keys = pd.array([make_key(shard_id, i) for i in range(len(out))], dtype="string")
    shard_name = f"{shard_id:05d}.tar"
    out = out.assign(
        **{schema.KEY: keys, schema.SHARD: pd.array([shard_name] * len(out), dtype="string")}
    )
    ok = out[schema.STATUS].eq("success").fillna(False).to_numpy(dtype=bool)
    meta_cols = [c for c in out.columns if c != schema.IMAGE]
    kept = out[ok]
    # one records conversion, not a Series per row (iterrows: 0.6 ms per image of a 1,000-image
    # shard's 0.8); the .json members come out byte for byte the same
    samples = (
        ShardSample(key=str(meta[schema.KEY]), image=image, text=str(meta[schema.TEXT]), meta=meta)
        for meta, image in zip(
            kept[meta_cols].to_dict("records"), kept[schema.IMAGE].tolist(), strict=True
        )
    )
    write_shard(run.join("images", shard_name), samples)
    table = out.drop(columns=[schema.IMAGE])
    run.write_parquet_atomic(run.part_path("downloads", shard_id), table)
    # img2dataset writes NNNNN.parquet and NNNNN_stats.json beside each tar
    run.write_parquet_atomic(run.join("images", f"{shard_id:05d}.parquet"), table[ok])
    stats = download_stats(out, seconds)
    run.write_json_atomic(run.join("images", f"{shard_id:05d}_stats.json"), stats)
    status = out[schema.STATUS].mask(out[schema.DROP_REASON].notna(), "not_attempted")
    return _finished(
        run,
        "downloads",
        shard_id,
        fp,
        rows=len(out),
        stats=stats,
        status=_value_counts(status),
        seconds=seconds,
        **extra,
    )


def is_transient_failure(df: pd.DataFrame) -> pd.Series:
    """Rows whose download failure may succeed later (429, 5xx, timeouts, dropped connections)."""
    flags = [
        is_transient(None if pd.isna(s) else str(s), None if pd.isna(m) else str(m))
        for s, m in zip(df[schema.STATUS], df[schema.ERROR_MESSAGE], strict=True)
    ]
    return pd.Series(flags, index=df.index, dtype=bool)


def _host_cache(run: RunDir, chain: int | None) -> str:
    """The host-file cache folder of a download chain: every row of a host is in one chain, so
    a chain's calls (chunks, resumes, retries) share what they learn about its hosts."""
    name = "unchained" if chain is None else f"chain-{int(chain):05d}"
    return run.join(_CONSENT_CACHE, name)


def _retry_task(shard_id: int, run: RunDir, cfg: PipelineConfig, fp: str) -> dict:
    """Re-fetch the transient failures of one finished part and merge them in place."""
    marker = run.done_marker("downloads", shard_id)
    old = run.read_parquet(run.part_path("downloads", shard_id))
    retry = is_transient_failure(old).to_numpy(dtype=bool)
    if not retry.any():
        return {**(marker or {}), "retried": 0, "resumed": True}
    t0 = time.perf_counter()
    fresh = download_images(
        old.loc[retry, list(schema.CANDIDATES.columns)].reset_index(drop=True),
        cfg.download,
        consent=cfg.consent,
        host_cache=_host_cache(run, (marker or {}).get("chain")),
        refresh_unreachable=True,
    )
    images = read_shard_images(run.join("images", f"{shard_id:05d}.tar"))
    merged = old.drop(columns=[schema.KEY, schema.SHARD]).copy()
    merged[schema.IMAGE] = [images.get(k) for k in old[schema.KEY]]
    merged = merged.astype(
        {c: fresh[c].dtype for c in merged.columns if c in fresh.columns}, errors="ignore"
    )
    merged.loc[retry, list(fresh.columns)] = fresh.set_index(merged.index[retry]).to_numpy()
    merged = schema.conform(merged, schema.DOWNLOAD_DTYPES, schema.CANDIDATES_DTYPES)
    extra = {k: marker[k] for k in ("chain", "bucket", "chunk") if marker and k in marker}
    info = _write_download_part(run, shard_id, merged, fp, time.perf_counter() - t0, extra)
    info["retried"] = int(retry.sum())
    return info


def run_download(
    run: RunDir,
    cfg: PipelineConfig,
    *,
    client: Any | None = None,
    retry_failed: bool = False,
    show_progress: bool = False,
    force: bool = False,
) -> StageReport:
    """Download the kept candidates: ``RUN/images/NNNNN.tar`` shards + ``RUN/downloads/`` parquet.

    Every candidate row, from every input file, is first shuffled into a host bucket
    (:mod:`laion_dask.stages.planner`, ``RUN/download_plan/``), so all rows of a host share one
    bucket, or, for a host with more than 8 x ``rows_per_task`` rows, a chain of buckets of its own.
    One task per chain downloads it in chunks of at most ``download.rows_per_task`` rows, one chunk
    after the other, each chunk writing one shard; a host is therefore fetched by one task at a time
    in the whole cluster and ``download.per_host_concurrency`` bounds what the cluster sends it. A
    chain holding more than its share of the run for the cluster's threads (one host serving most
    of it) is split into that many tasks, each with that share of ``per_host_concurrency``, so the
    bound holds and no core idles while one task downloads the host (not with
    ``per_host_interval``, whose spacing one process keeps); the longest tasks are submitted
    first. Shard ids follow the plan's order, so the same candidates and config give the same
    shards whatever the number of workers. With ``retry_failed`` only rows whose failure was
    transient are fetched again and merged into their finished part (chunk by chunk, in the same
    order).

    Consent lists named in ``[consent]`` are read here first, so a missing file or a malformed entry
    raises :class:`~laion_dask.ground.config.ConfigError` before any task runs; their content is
    part of each task's fingerprint (a changed list re-runs the stage). Host files (robots.txt,
    tdmrep.json) are journaled per chain in ``RUN/consent/chain-N/``. A config that would change
    finished partitions raises :class:`ConfigChanged` naming the keys, unless ``force``. Temporary
    files left by tasks of an earlier, killed attempt are removed first
    (:meth:`RunDir.remove_tmp_files`).
    """
    cand = run.markers("candidates")
    if not cand:  # before anything is created in the run directory
        raise StageError(f"{run.path}: no candidates; run `laion-dask extract ... --out RUN` first")
    lists = load_lists(cfg.consent)
    client = get_client(client)
    t0 = time.perf_counter()
    stage_cfg = _stage_config(cfg, "download", lists.fingerprint)
    folders = ("downloads", "images")
    scratch = (_CONSENT_CACHE, _PLAN)
    _start_stage(
        run, "download", folders, stage_cfg, force, allowed=_ALWAYS_APPLIED, scratch=scratch
    )
    plan = _download_plan(run, cfg, cand, client)
    layout = planner.shard_ids(dict(plan["buckets"]), plan["chains"], cfg.download.rows_per_task)
    n_shards = sum(len(ids) for chain in layout for _, _, ids in chain)
    _forget(  # shards of a plan with more of them
        run,
        "downloads",
        [i for i in run.marker_indices("downloads") if i >= n_shards],
        lambda i: [run.join("images", f"{i:05d}{ext}") for ext in _SHARD_FILES],
    )
    args = (plan["fingerprint"], plan["folder"], run, cfg, stage_cfg, retry_failed)
    tasks = _chain_tasks(layout, cfg, _task_slots(client), args)
    results, failures = run_tasks(
        client, "download", tasks, strict=cfg.strict, show_progress=show_progress
    )
    chunks = [r for bucket_results in results for r in bucket_results]
    return _stage_report("download", n_shards, chunks, failures, "status", t0)


def _task_slots(client: Any) -> int:
    """Tasks the cluster runs at once (its workers' threads); 1 when it cannot say."""
    try:
        return max(1, sum(client.nthreads().values()))
    except (OSError, TimeoutError, AttributeError):
        return 1


def _chain_tasks(
    layout: list[list[tuple[int, int, list[int]]]],
    cfg: PipelineConfig,
    slots: int,
    args: tuple,
) -> list[tuple[str, Callable[..., Any], tuple]]:
    """One download task per chain, or per part of a chain longer than its share of the
    cluster's ``slots`` (:func:`planner.chain_parts`); longest first, since the longest bounds
    the stage's wall time.

    A chain is split only without ``per_host_interval``: the spacing of two requests to one
    host is kept by one process's pacer, which tasks in other processes do not see. The parts
    share the chain's host-file cache, but start together: a host's robots.txt may be fetched
    once per part rather than once per run.
    """
    dl = cfg.download
    total = sum(n for chain in layout for _, n, _ in chain)
    jobs: list[tuple[int, str, list[planner.Chunk], int, int]] = []
    for chain in layout:
        first = chain[0][0]
        chunks = planner.chain_chunks(chain, dl.rows_per_task)
        rows = sum(c.rows for c in chunks)
        parts = 1
        if dl.per_host_interval == 0:
            parts = planner.chain_parts(rows, total, slots, len(chunks), dl.per_host_concurrency)
        runs = planner.split_chain(chunks, parts)
        for p, run_chunks in enumerate(runs):
            name = f"bucket-{first:05d}" + (f"-part{p}" if len(runs) > 1 else "")
            jobs.append((sum(c.rows for c in run_chunks), name, run_chunks, first, len(runs)))
    jobs.sort(key=lambda job: (-job[0], job[1]))
    return [
        (name, _download_chain_task, (run_chunks, first, parts, *args))
        for _, name, run_chunks, first, parts in jobs
    ]


#: the files of one shard in RUN/images/, img2dataset style
_SHARD_FILES = (".tar", ".parquet", "_stats.json")


# --- score --------------------------------------------------------------------------------------


def _score_task(shard_id: int, run: RunDir, cfg: PipelineConfig, fp: str) -> dict:
    if (resumed := _resumed(run, "scores", shard_id, fp)) is not None:
        return resumed
    t0 = time.perf_counter()
    df = run.read_parquet(run.part_path("downloads", shard_id))
    result = score_partition(df, cfg.clip, image_root=run.join("images"), threads=worker_threads())
    frame = result.frame
    run.write_parquet_atomic(run.part_path("scores", shard_id), frame)
    if cfg.clip.write_embeddings:
        meta = frame.set_index(schema.KEY).loc[result.keys].reset_index()
        emb = (result.keys, result.image_embeddings, result.text_embeddings)
        write_embedding_arrays(run.join("embeddings"), shard_id, *emb, meta)
    attempted = frame[schema.STATUS].eq("success").fillna(False)
    return _finished(
        run,
        "scores",
        shard_id,
        fp,
        rows=int(attempted.sum()),
        score_status=_value_counts(frame.loc[attempted, schema.SCORE_STATUS]),
        seconds=time.perf_counter() - t0,
    )


def worker_threads() -> int | None:
    """Threads of the Dask worker running the calling task (None outside a worker): what a CPU
    scoring task gives torch, so the worker's concurrent tasks share its cores."""
    try:
        return int(get_worker().state.nthreads)
    except ValueError:  # not in a worker task (a local scheduler, a notebook)
        return None


def _clip_facts(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in encoder_info(encoder_from_config(cfg)).items() if v is not None}


def run_score(
    run: RunDir,
    cfg: PipelineConfig,
    *,
    client: Any | None = None,
    show_progress: bool = False,
    force: bool = False,
) -> StageReport:
    """CLIP-score every downloaded image: ``RUN/scores/`` + ``RUN/embeddings/``.

    Scoring tasks ask for the ``GPU`` resource when the cluster's workers declare it, so CPU
    stages never queue behind GPUs. A config that would change finished partitions raises
    :class:`ConfigChanged` naming the keys, unless ``force``.
    """
    downloads = run.markers("downloads")
    if not downloads:  # nothing to score is an error, not a report of "0 rows in"
        raise StageError(f"{run.path}: no downloaded shards; run `laion-dask download RUN` first")
    client = get_client(client)
    check_model_available(cfg.clip)  # one clear error before any work
    stage_cfg = _stage_config(cfg, "score")
    _start_stage(run, "score", ("scores", "embeddings"), stage_cfg, force)
    resources = scoring_resources(client)
    # record what "auto" resolved to (revision, device, dtype) where the model really loads
    facts = client.submit(_clip_facts, cfg.clip, resources=resources, pure=False).result()
    run.write_config(cfg, extra={"clip_resolved": facts})
    t0 = time.perf_counter()
    # scores of shards a smaller plan dropped, with their embeddings
    stale = set(run.marker_indices("scores")) - set(downloads)
    _forget(run, "scores", stale, lambda i: [*embedding_paths(run.join("embeddings"), i).values()])
    if stale:
        log.info("score: removed %d scores parts whose shards are gone", len(stale))
    tasks = [
        (
            f"{k:05d}",
            _score_task,
            (k, run, cfg, fingerprint(m["fingerprint"], m.get("retried"), stage_cfg)),
        )
        for k, m in sorted(downloads.items())
    ]
    results, failures = run_tasks(
        client,
        "score",
        tasks,
        strict=cfg.strict,
        resources=resources,
        show_progress=show_progress,
    )
    return _stage_report("score", len(tasks), results, failures, "score_status", t0)


def _stage_report(
    stage: str,
    partitions: int,
    results: list[dict],
    failures: dict[str, str],
    counts_key: str,
    t0: float,
) -> StageReport:
    """Sum the per-partition markers' counts into one report."""
    counter: Counter[str] = Counter()
    for r in results:
        counter.update(r[counts_key])
    return StageReport(
        stage,
        partitions=partitions,
        resumed=sum(1 for r in results if r.get("resumed")),
        failed=failures,
        rows_in=sum(r["rows"] for r in results),
        counts=dict(counter),
        seconds=time.perf_counter() - t0,
    )


# --- all of it ----------------------------------------------------------------------------------

STAGE_ORDER = ("extract", "download", "score", "materialize")
