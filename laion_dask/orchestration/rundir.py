"""The run directory: resolved config, stage folders, per-partition checkpoints.

Layout (``RUN`` may be local or any fsspec URL)::

    RUN/config.toml                     resolved config of the last run
    RUN/<stage>/part-00003.parquet      one file per partition
    RUN/<stage>/_done/part-00003.json   written last: partition finished (summary, fingerprint)
    RUN/<stage>/_config.json            the config sections the stage's partitions were made with

A partition is finished exactly when its ``_done`` marker exists. Data files are written to a
temporary name and renamed, and the marker is written after the data, so a killed task leaves
either nothing or a complete partition, never half of one. Markers are per partition (no shared
manifest file), so workers never race on a write.

A partition's fingerprint hashes its inputs (file name, upstream fingerprints) and the config
sections that decide its output. On a re-run a partition whose fingerprint still matches is
skipped; ``_config.json`` lets a re-run with another config be refused by name
(:meth:`RunDir.check_stage_config`) instead of silently redoing finished work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tomli_w

from laion_dask.ground.config import (
    RUN_FACTS_SECTION,
    ConfigError,
    PipelineConfig,
    config_from_dict,
    config_to_dict,
)

__all__ = ["RunDir", "ConfigChanged", "config_changes", "fingerprint", "part_name"]

#: what the atomic writers here and in shards.py, embeddings.py, consent.py name a file being
#: written: ``<final name>.tmp-<8 hex digits or a process id>``
_TMP_NAME = re.compile(r"\.tmp-[0-9a-f]+$")


def part_name(index: int) -> str:
    """``part-00003``: the stem shared by a partition's data file and its marker."""
    return f"part-{index:05d}"


def fingerprint(*objs: Any) -> str:
    """A short, stable hash of JSON-able objects (configs, input lists, upstream markers)."""
    blob = json.dumps(objs, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


class ConfigChanged(ConfigError):
    """A re-run's config would change partitions a stage already finished (pass ``force``)."""

    def __init__(self, stage: str, changes: Mapping[str, tuple[Any, Any]]) -> None:
        self.stage = stage
        self.changes = dict(changes)
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in self.changes.items())
        super().__init__(
            f"{listed}: {stage} has finished partitions made with the old value"
            f"{'s' if len(self.changes) > 1 else ''}; re-run with --force (force=True) to "
            "recompute them, or write to a new run directory"
        )


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (old, new)}`` for every leaf that differs (None = absent)."""
    a, b = _flatten(_plain(old)), _flatten(_plain(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, as they are once stored."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


@dataclass(frozen=True)
class RunDir:
    """A run directory; cheap to pickle, so partition tasks take it as an argument."""

    path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path).rstrip("/"))

    # --- filesystem helpers ---------------------------------------------------------------------
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.path)
        return fs

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def makedirs(self, *stages: str) -> None:
        fs = self.fs
        fs.makedirs(self.path, exist_ok=True)
        for stage in stages:
            fs.makedirs(self.join(stage, "_done"), exist_ok=True)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    @contextmanager
    def _atomic(self, path: str) -> Iterator[Any]:
        """A file open on a temporary sibling of ``path``, renamed to ``path`` when the block
        ends and removed when it raises: readers never see a partial file."""
        fs = self.fs
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open(tmp, "wb") as fh:
                yield fh
        except BaseException:
            if fs.exists(tmp):
                fs.rm(tmp)
            raise
        fs.mv(tmp, path)

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        with self._atomic(path) as fh:
            fh.write(data)

    def write_json_atomic(self, path: str, obj: Any) -> None:
        self.write_bytes_atomic(
            path, json.dumps(obj, sort_keys=True, indent=1, default=str).encode()
        )

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as fh:
            return json.load(fh)

    # --- config ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> str:
        return self.join("config.toml")

    def write_config(self, cfg: PipelineConfig, extra: Mapping[str, Any] | None = None) -> None:
        """Write the resolved config to config.toml, with ``extra`` facts (e.g. model revisions)
        as its ``[run]`` table, which :func:`~laion_dask.ground.config.config_from_dict` skips."""
        self.makedirs()
        data = config_to_dict(cfg) | ({RUN_FACTS_SECTION: dict(extra)} if extra else {})
        self.write_bytes_atomic(self.config_path, tomli_w.dumps(data).encode("utf-8"))

    def read_config(self) -> PipelineConfig:
        """The config this run was last started with (the ``[run]`` facts table is skipped)."""
        with self.fs.open(self.config_path, "rb") as fh:
            return config_from_dict(tomllib.load(fh))

    # --- partitions and markers -----------------------------------------------------------------
    def part_path(self, stage: str, index: int, ext: str = "parquet") -> str:
        return self.join(stage, f"{part_name(index)}.{ext}")

    def marker_path(self, stage: str, index: int) -> str:
        return self.join(stage, "_done", f"{part_name(index)}.json")

    def write_parquet_atomic(
        self, path: str, df: pd.DataFrame, row_group_rows: int = 65_536
    ) -> None:
        """Write ``df`` to a temporary sibling one row group at a time, then rename.

        Streaming the row groups straight to the file keeps the extra memory to one row
        group's Arrow copy instead of a copy of the whole frame plus its encoded bytes.
        """
        first = pa.Table.from_pandas(df.iloc[:row_group_rows], preserve_index=False)
        if len(df) > row_group_rows and any(pa.types.is_null(f.type) for f in first.schema):
            # an all-missing object column in the first group: let the whole frame decide types
            first = pa.Table.from_pandas(df, preserve_index=False)
        with (
            self._atomic(path) as fh,
            pq.ParquetWriter(fh, first.schema, compression="zstd") as writer,
        ):
            writer.write_table(first, row_group_size=row_group_rows)
            for start in range(len(first), len(df), row_group_rows):
                chunk = df.iloc[start : start + row_group_rows]
                writer.write_table(
                    pa.Table.from_pandas(chunk, schema=first.schema, preserve_index=False)
                )

    @contextmanager
    def parquet_writer_atomic(self, path: str, meta: pd.DataFrame) -> Iterator[PartWriter]:
        """Write a parquet file frame by frame, under a temporary name renamed to ``path`` when
        the block ends; when the block raises, the temporary file is removed and nothing appears.

        Each :meth:`PartWriter.write` call is one row group of ``meta``'s Arrow schema, so a
        stage can write a part of any size while holding one chunk. A block that writes nothing
        leaves a file with the schema and no rows.
        """
        arrow_schema = pa.Schema.from_pandas(meta, preserve_index=False)
        with (
            self._atomic(path) as fh,
            pq.ParquetWriter(fh, arrow_schema, compression="zstd") as writer,
        ):
            yield PartWriter(writer, arrow_schema)

    def iter_parquet_groups(
        self, path: str, columns: list[str] | None = None
    ) -> Iterator[pd.DataFrame]:
        """The row groups of a parquet file one after another, as frames."""
        with self.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            for i in range(pf.num_row_groups):
                yield pf.read_row_group(i, columns=columns).to_pandas()

    def read_parquet_group(
        self, path: str, group: int | None, columns: list[str] | None = None
    ) -> pd.DataFrame:
        """Row group ``group`` of a parquet file (None: the whole file)."""
        if group is None:
            return self.read_parquet(path, columns=columns)
        with self.fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).read_row_group(group, columns=columns).to_pandas()

    def read_parquet(self, path: str, columns: list[str] | None = None) -> pd.DataFrame:
        with self.fs.open(path, "rb") as fh:
            return pq.read_table(fh, columns=columns).to_pandas()

    def read_parquet_rows(self, path: str, start: int, stop: int) -> pd.DataFrame:
        """Rows ``start:stop`` of a parquet file (:meth:`read_parquet_take` of that range)."""
        if start < 0 or start > stop:
            raise ValueError(f"{path}: rows {start}:{stop} asked")
        return self.read_parquet_take(path, np.arange(start, stop))

    def read_parquet_take(
        self,
        path: str,
        rows: Any,
        *,
        columns: list[str] | None = None,
        expected_rows: int | None = None,
    ) -> pd.DataFrame:
        """``columns`` of the rows at positions ``rows`` of a parquet file, in that order.

        Reads only the row groups that hold them. ``expected_rows``: the file's row count when
        the positions were taken; another count means it was rewritten since (RuntimeError).
        """
        rows = np.asarray(rows, dtype="int64").reshape(-1)
        with self.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            meta = pf.metadata
            if expected_rows is not None and meta.num_rows != expected_rows:
                raise RuntimeError(
                    f"{path} has {meta.num_rows} rows, {expected_rows} when its rows were counted"
                )
            if len(rows) and (rows.min() < 0 or rows.max() >= meta.num_rows):
                raise ValueError(
                    f"{path}: rows {rows.min()}..{rows.max()} asked, the file has {meta.num_rows}"
                )
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes, dtype="int64")])
            group = np.searchsorted(starts, rows, side="right") - 1
            wanted = np.unique(group)
            table = pf.read_row_groups(wanted.tolist(), columns=columns)
        offset = np.concatenate([[0], np.cumsum(np.take(sizes, wanted))])  # of each group read
        at = offset[np.searchsorted(wanted, group)] + rows - starts[group]
        return table.take(pa.array(at, type=pa.int64())).to_pandas()

    def mark_done(self, stage: str, index: int, info: Mapping[str, Any]) -> None:
        self.write_json_atomic(self.marker_path(stage, index), dict(info))

    def done_marker(self, stage: str, index: int, fp: str | None = None) -> dict | None:
        """The marker of a finished partition, or None (also None when ``fp`` differs)."""
        path = self.marker_path(stage, index)
        if not self.fs.exists(path):
            return None
        marker = self.read_json(path)
        if fp is not None and marker.get("fingerprint") != fp:
            return None
        return marker

    def markers(self, stage: str) -> dict[int, dict]:
        """All markers of ``stage`` by partition index."""
        return {i: self.read_json(self.marker_path(stage, i)) for i in self.marker_indices(stage)}

    def marker_indices(self, stage: str) -> list[int]:
        """Indices of the finished partitions of ``stage`` (one listing, no marker read)."""
        folder = self.join(stage, "_done")
        fs = self.fs
        if not fs.exists(folder):
            return []
        names = (os.path.basename(p) for p in fs.ls(folder, detail=False))
        return sorted(int(n[5:-5]) for n in names if n.startswith("part-") and n.endswith(".json"))

    def remove_tmp_files(self, *folders: str) -> list[str]:
        """Delete the ``*.tmp-*`` files under ``folders`` (relative to the run, searched
        recursively, missing ones skipped); return their paths.

        Every writer of a run directory writes ``NAME.tmp-XXXXXXXX`` and renames it to ``NAME``
        when complete, so a task killed mid-write leaves its temporary file behind. A stage
        calls this as it starts, before it submits any task: no task of the current attempt can
        be writing in its folders yet, so what is found is a leftover of an earlier attempt. Its
        partition is either finished (the marker exists) or about to be recomputed. A task of
        an earlier attempt that is somehow still running (its client was killed, not its
        worker) loses its rename and fails; its partition is recomputed or already done. A
        file renamed or removed by someone else meanwhile is skipped.
        """
        fs = self.fs
        removed: list[str] = []
        for folder in folders:
            root = self.join(folder)
            if not fs.exists(root):
                continue
            for path in fs.find(root):
                if not _TMP_NAME.search(os.path.basename(path)):
                    continue
                try:
                    fs.rm_file(path)
                except FileNotFoundError:
                    continue
                removed.append(path)
        return removed

    def parts(self, stage: str) -> list[str]:
        """Finished partition data files of ``stage``, in index order."""
        return [self.part_path(stage, i) for i in sorted(self.markers(stage))]

    def has_markers(self, stage: str) -> bool:
        """True when at least one partition of ``stage`` finished (one listing, no reads)."""
        return bool(self.marker_indices(stage))

    def stage_config_path(self, stage: str) -> str:
        return self.join(stage, "_config.json")

    def check_stage_config(
        self,
        stage: str,
        config: Mapping[str, Any],
        *,
        force: bool = False,
        allowed: Iterable[str] = (),
    ) -> dict[str, tuple[Any, Any]]:
        """Refuse a config that would change ``stage``'s finished partitions, then record it.

        ``config`` holds the sections the stage's fingerprints hash (``{"rules": {...}}``).
        Raises :class:`ConfigChanged` when the stage folder has finished partitions made with
        another config, unless ``force`` or every changed key is in ``allowed``; returns the
        changes, ``{"section.key": (old, new)}`` (partitions whose fingerprint changed are then
        recomputed by the stage).
        """
        changes = self.stage_config_changes(stage, config)
        refused = {k: v for k, v in changes.items() if k not in set(allowed)}
        if refused and not force:
            raise ConfigChanged(stage, refused)
        self.makedirs(stage)
        self.write_json_atomic(self.stage_config_path(stage), _plain(config))
        return changes

    def stage_config_changes(
        self, stage: str, config: Mapping[str, Any]
    ) -> dict[str, tuple[Any, Any]]:
        """What :meth:`check_stage_config` would find changed; reads only, writes nothing."""
        path = self.stage_config_path(stage)
        if not (self.exists(path) and self.has_markers(stage)):
            return {}
        return config_changes(self.read_json(path), config)

    def iter_markers(self, stage: str) -> Iterator[tuple[int, dict]]:
        yield from sorted(self.markers(stage).items())


def open_run(path: str) -> tuple[RunDir, PipelineConfig]:
    """Open an existing run directory and its config."""
    run = RunDir(path)
    if not run.exists(run.config_path):
        raise FileNotFoundError(f"{path} is not a laion-dask run directory (no config.toml)")
    return run, run.read_config()


@dataclass
class PartWriter:
    """What :meth:`RunDir.parquet_writer_atomic` yields: ``write(df)`` adds one row group."""

    writer: pq.ParquetWriter
    schema: pa.Schema
    #: rows of each row group written, in order
    row_groups: list[int] = field(default_factory=list)

    def write(self, df: pd.DataFrame) -> None:
        """Append ``df`` (the writer's columns and dtypes) as one row group; empty frames add
        nothing."""
        if len(df) == 0:
            return
        table = pa.Table.from_pandas(df, schema=self.schema, preserve_index=False)
        self.writer.write_table(table, row_group_size=len(df))
        self.row_groups.append(len(df))
