"""Interactive what-if over a run's stored scores: the API under the notebooks and dashboards.

``open_run(RUN)`` reads ``RUN/scores`` one task per scores part (mapped by
:func:`laion_dask.orchestration.reduce.map_reduce`), brings into memory only the numeric and small
categorical columns interaction needs (:data:`MEMORY_COLUMNS`: scores, sizes, caption length,
language, the upstream reason), and precomputes per language group what plots and sliders ask for
(sorted score columns, histograms). After that nothing runs on Dask: a threshold change is one
pass of the final-reason engine (:func:`laion_dask.stages.filters.decide`) over in-memory arrays
(:meth:`RunView.kept_at`) or a binary search over a sorted column
(:meth:`RunView.fraction_kept`, :meth:`RunView.threshold_for_fraction`). URLs, captions and keys
stay on disk: :meth:`RunView.details` reads them for the few sampled rows, by scores part and row
position, so memory grows with the numeric columns only. ``kept_at`` calls the engine
``materialize`` calls, so the funnel shown while tuning is the one ``materialize`` writes.

Example
-------
>>> view = open_run("demo-run")                                     # doctest: +SKIP
>>> t = view.threshold_for_fraction("en", 0.3)   # keep the top 30 % # doctest: +SKIP
>>> view.kept_at(FilterConfig(similarity_en=t)).kept                # doctest: +SKIP
>>> view.save_thresholds(FilterConfig(similarity_en=t), "thresholds.toml")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from laion_dask.ground import schema
from laion_dask.ground.config import FilterConfig
from laion_dask.orchestration.reduce import map_reduce
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.neardup import join_part_near_duplicates
from laion_dask.stages.filters import (
    FINAL_REASON,
    TEXT_LENGTH,
    UPSTREAM_REASON,
    decide,
    dump_thresholds,
    fate_columns,
    load_thresholds,
    upstream_reason,
)
from laion_dask.stages.imaging import read_thumbnails, thumbnail_html

log = logging.getLogger(__name__)

__all__ = [
    "open_run",
    "RunView",
    "Funnel",
    "EXPLORE_COLUMNS",
    "MEMORY_COLUMNS",
    "DETAIL_COLUMNS",
    "TEXT_LENGTH",
    "UPSTREAM_REASON",
    "interaction_columns",
    "samples_html",
]

SCORES_PART = "scores_part"  # index of the scores part a row comes from (open_run only)

#: what every row keeps of its scores part (:data:`MEMORY_COLUMNS` adds what is derived from it)
#: (in the order :meth:`RunView.samples_around` shows them, score_status last)
_SCORE_COLUMNS = (
    schema.LANGUAGE_GROUP,
    schema.LANGUAGE,
    schema.SIMILARITY,
    schema.PUNSAFE,
    schema.PWATERMARK,
    schema.ORIGINAL_WIDTH,
    schema.ORIGINAL_HEIGHT,
    schema.SCORE_STATUS,
)
#: read from the scores parts on demand, for sampled rows only (:meth:`RunView.details`)
DETAIL_COLUMNS = (schema.KEY, schema.SHARD, schema.URL, schema.TEXT)
#: the scores columns ``open_run`` reads (per part; only :data:`MEMORY_COLUMNS` are kept)
EXPLORE_COLUMNS = (*_SCORE_COLUMNS, schema.DROP_REASON, schema.STATUS, *DETAIL_COLUMNS)
#: the columns a :class:`RunView` holds per row (strings become categoricals)
MEMORY_COLUMNS = (*_SCORE_COLUMNS, TEXT_LENGTH, UPSTREAM_REASON)
#: strings a view holds as categoricals (the memory it holds per row)
_CATEGORICAL = {
    c: "category"
    for c in (schema.LANGUAGE_GROUP, schema.LANGUAGE, schema.SCORE_STATUS, UPSTREAM_REASON)
}

#: columns ``histogram``/``quantiles`` know, and how a threshold on them keeps rows
NUMERIC = {
    schema.SIMILARITY: "ge",  # kept when value >= threshold
    schema.PUNSAFE: "le",  # kept when value <= threshold
    schema.PWATERMARK: "le",
    schema.ORIGINAL_WIDTH: "ge",
    schema.ORIGINAL_HEIGHT: "ge",
    TEXT_LENGTH: "ge",
}
ALL = "all"  # the group name meaning every language group
_BINS = 50


def interaction_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Return one scores partition with ``text_length`` and ``upstream_reason`` added."""
    text_len = df[schema.TEXT].astype("string").str.len().fillna(0).astype("int64")
    upstream = upstream_reason(df).astype("string")
    return df.assign(**{TEXT_LENGTH: text_len.to_numpy(), UPSTREAM_REASON: upstream.to_numpy()})


def _read_part(part: tuple[int, str], run: RunDir, read_columns: list[str]) -> pd.DataFrame:
    """One scores part ``(index, path)`` reduced to :data:`MEMORY_COLUMNS` plus its index."""
    index, path = part
    df = run.read_parquet(path, columns=read_columns)
    df = interaction_columns(join_part_near_duplicates(run, index, schema.conform(df, _DTYPES)))
    return df[list(MEMORY_COLUMNS)].assign(**{SCORES_PART: np.int32(index)})


_DTYPES = {
    **schema.CANDIDATES_DTYPES,
    **schema.DOWNLOAD_DTYPES,
    **schema.SHARD_DTYPES,
    **schema.SCORE_DTYPES,
}


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Parts' rows in part order (strings as categoricals)."""
    frames = [f for f in frames if len(f)] or frames[:1]
    return pd.concat(frames, ignore_index=True).astype(_CATEGORICAL)


@dataclass(kw_only=True)
class Funnel:
    """Rows in, kept per language group, dropped per reason: every row is one or the other.

    ``rows_in == sum(kept) + sum(dropped)`` always (:meth:`check`). A funnel from
    :meth:`RunView.kept_at` also has ``table``: one row per outcome (``kept`` then each reason
    seen) and one column per language group (a missing or unknown group counts as ``nolang``, as
    the similarity filter treats it). What ``materialize`` returns is a funnel too
    (:class:`~laion_dask.products.materialize.MaterializeReport`): its ``kept`` and ``dropped``
    equal ``kept_at``'s for the same thresholds.
    """

    rows_in: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # language group -> rows
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    table: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def total_kept(self) -> int:
        """Rows kept over all groups."""
        return sum(self.kept.values())

    @property
    def counts(self) -> dict[str, int]:
        """Rows per outcome: ``kept`` (all groups) then each reason (as a stage report's)."""
        return {"kept": self.total_kept, **self.dropped}

    def check(self) -> None:
        """Raise when kept + dropped does not equal rows in."""
        total = self.total_kept + sum(self.dropped.values())
        if total != self.rows_in:
            raise AssertionError(f"funnel: {self.rows_in} in, {total} out")

    def to_dict(self) -> dict[str, Any]:
        """What ``funnel.json`` holds of it: rows in, kept per group, dropped per reason."""
        return {"rows_in": self.rows_in, "kept": self.kept, "dropped": self.dropped}


class RunView:
    """A run's scores held for interaction. Build it with :func:`open_run`.

    Attributes
    ----------
    run : RunDir
    rows : pandas.DataFrame
        :data:`MEMORY_COLUMNS` of every row in memory, in part order (strings as categoricals);
        url, caption, key and shard are read on demand (:meth:`details`).
    thresholds : FilterConfig
        The run config's ``[filters]`` (a starting point).
    """

    def __init__(
        self,
        run: RunDir,
        rows: pd.DataFrame,
        thresholds: FilterConfig,
        *,
        part_paths: dict[int, str] | None = None,
    ):
        self.run = run
        # which scores part and row each in-memory row is: parts are contiguous, in index order
        part = rows[SCORES_PART] if SCORES_PART in rows.columns else pd.Series([], dtype="int64")
        if (np.diff(part.to_numpy("int64")) < 0).any():
            raise ValueError("rows must be in scores part order")
        self._part_index, starts = np.unique(part.to_numpy("int64"), return_index=True)
        self._offsets = np.append(starts, len(rows)).astype("int64")
        self._part_paths = dict(part_paths or {})
        self.rows = rows[list(MEMORY_COLUMNS)].reset_index(drop=True).astype(_CATEGORICAL)
        self.thresholds = thresholds
        self._truth: tuple[str, int, np.ndarray, np.ndarray] | None = None
        self._prepare()

    # --- precomputation ---------------------------------------------------------------------
    def _prepare(self) -> None:
        # what decides a row's fate, as small arrays: every threshold change is one pass of
        # the engine over them
        self._fate = fate = fate_columns(self.rows)
        self.groups = tuple(schema.LANGUAGE_GROUPS)
        self._gcode = fate.group
        self.reasons = fate.reasons
        self._values: dict[str, np.ndarray] = {
            schema.SIMILARITY: fate.similarity.astype("float64"),
            schema.PUNSAFE: fate.punsafe,
            schema.PWATERMARK: fate.pwatermark,
            schema.ORIGINAL_WIDTH: fate.width,
            schema.ORIGINAL_HEIGHT: fate.height,
            TEXT_LENGTH: fate.text_len.astype("float64"),
        }
        # per group (and "all"): sorted non-missing values, and default histograms
        self._sorted: dict[tuple[str, str], np.ndarray] = {}
        self._hist: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        for col, values in self._values.items():
            finite = values[np.isfinite(values)]
            lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
            if col in (schema.PUNSAFE, schema.PWATERMARK):
                lo, hi = 0.0, 1.0
            edges = np.linspace(lo, hi if hi > lo else lo + 1.0, _BINS + 1)
            for g in (*self.groups, ALL):
                v = values if g == ALL else values[self._gcode == self._group_index(g)]
                v = np.sort(v[np.isfinite(v)])
                self._sorted[(col, g)] = v
                self._hist[(col, g)] = np.histogram(v, bins=edges)

    def _group_index(self, group: str) -> int:
        if group not in self.groups:
            raise ValueError(f"unknown language group {group!r} (known: {self.groups}, {ALL!r})")
        return self.groups.index(group)

    def _key(self, column: str, group: str = ALL) -> tuple[str, str]:
        """``(column, group)`` of the per-group caches; unknown ones raise a one-line error."""
        if column not in NUMERIC:
            raise ValueError(f"unknown column {column!r} (known: {', '.join(NUMERIC)})")
        if group != ALL:
            self._group_index(group)
        return column, group

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        scored = int(np.isfinite(self._values[schema.SIMILARITY]).sum())
        return f"RunView({self.run.path!r}, rows={len(self)}, scored={scored})"

    # --- thresholds -> funnel ---------------------------------------------------------------
    def reasons_at(self, thresholds: FilterConfig) -> pd.Series:
        """Per-row final reason at ``thresholds`` (``<NA>`` = kept), as ``add_final_reason``."""
        return pd.Series(decide(self._fate, thresholds).names(), dtype="string", name=FINAL_REASON)

    def kept_at(self, thresholds: FilterConfig) -> Funnel:
        """The funnel at ``thresholds``: kept per group, dropped per reason (numpy, no Dask job).

        Equals ``filters.add_final_reason`` over the same rows, counted.
        """
        codes = decide(self._fate, thresholds).final
        k = len(self.reasons) + 1
        cell = self._gcode.astype(np.intp) * k + codes
        counts = np.bincount(cell, minlength=len(self.groups) * k)
        counts = counts.reshape(len(self.groups), k).T  # outcome x group
        table = pd.DataFrame(counts, index=["kept", *self.reasons], columns=list(self.groups))
        table = table.loc[(table.index == "kept") | (table.sum(axis=1) > 0)]
        kept = {g: int(table.at["kept", g]) for g in self.groups}
        totals = table.drop(index="kept").sum(axis=1)
        dropped = {str(r): int(v) for r, v in totals.items() if v}
        return Funnel(rows_in=len(self.rows), kept=kept, dropped=dropped, table=table)

    def compare(
        self, a: FilterConfig, b: FilterConfig, names: tuple[str, str] = ("a", "b")
    ) -> pd.DataFrame:
        """Two threshold sets side by side: rows per outcome (``kept_<group>``, reasons)."""
        cols = {}
        for name, cfg in zip(names, (a, b), strict=True):
            f = self.kept_at(cfg)
            cols[name] = pd.Series({**{f"kept_{g}": v for g, v in f.kept.items()}, **f.dropped})
        out = pd.DataFrame(cols).fillna(0).astype("int64")
        order = [f"kept_{g}" for g in self.groups] + list(self.reasons)
        out = out.reindex([r for r in order if r in out.index])
        out["change"] = out[names[1]] - out[names[0]]
        return out

    # --- threshold <-> kept fraction --------------------------------------------------------
    def fraction_kept(self, group: str, threshold: float, column: str = schema.SIMILARITY) -> float:
        """Fraction of ``group``'s rows with a ``column`` value that pass ``threshold`` alone.

        Similarity, sizes and text length keep ``value >= threshold``; punsafe and pwatermark keep
        ``value <= threshold``. Similarity is compared in float32, as the filters do.
        """
        v = self._sorted[self._key(column, group)]
        if not len(v):
            return float("nan")
        t = float(_as_stored(column, threshold))
        if NUMERIC[column] == "ge":
            return float(len(v) - np.searchsorted(v, t, side="left")) / len(v)
        return float(np.searchsorted(v, t, side="right")) / len(v)

    def threshold_for_fraction(
        self, group: str, fraction: float, column: str = schema.SIMILARITY
    ) -> float:
        """The threshold that keeps the top ``fraction`` of ``group`` ("keep the top 30 %").

        Returns a value present in the data (ties may keep slightly more); ``fraction == 0``
        gives a threshold just past the extreme, keeping nothing.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        v = self._sorted[self._key(column, group)]
        if not len(v):
            raise ValueError(f"group {group!r} has no {column} values")
        k = int(round(fraction * len(v)))
        if NUMERIC[column] == "ge":
            if k == 0:
                return _past(column, v[-1], +1)
            return float(v[len(v) - k])
        if k == 0:
            return _past(column, v[0], -1)
        return float(v[k - 1])

    # --- distributions ----------------------------------------------------------------------
    def histogram(self, column: str, group: str = ALL) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` of ``column`` over ``group``'s rows with a value (precomputed).

        The edges are shared across groups, so the groups' histograms overlay.
        """
        counts, edges = self._hist[self._key(column, group)]
        return counts.copy(), edges.copy()

    def describe(self, column: str = schema.SIMILARITY) -> pd.DataFrame:
        """Count, mean, min, quartiles and max of ``column`` per language group (from the cache)."""
        stats = {
            g: pd.Series(self._sorted[self._key(column, g)]).describe() for g in (*self.groups, ALL)
        }
        return pd.DataFrame(stats).T.drop(columns="std")

    def language_counts(self, group: str = ALL, top: int = 20) -> pd.Series:
        """Rows per detected language (most frequent first), within ``group``."""
        lang = self.rows[schema.LANGUAGE].astype("string").fillna("<none>")
        if group != ALL:
            lang = lang[self._gcode == self._group_index(group)]
        return lang.value_counts().head(top)

    # --- samples at the edge of a threshold -------------------------------------------------
    def samples_near(
        self,
        threshold: float,
        group: str = ALL,
        side: Literal["above", "below"] = "above",
        n: int = 8,
        *,
        column: str = schema.SIMILARITY,
        thumb_size: int = 128,
        images: bool = True,
    ) -> pd.DataFrame:
        """The ``n`` rows of ``group`` closest to ``threshold`` on ``side``, nearest first.

        The sides split the rows as the filter does: for similarity, sizes and text length
        ``above`` is ``value >= threshold`` (kept) and ``below`` is ``value < threshold``; for
        punsafe and pwatermark ``below`` is ``value <= threshold`` (kept) and ``above`` is
        ``value > threshold``. Ties in distance are ordered by position in the run (part, row):
        deterministic. Columns: key, shard, url, text (read from the scores parts for these rows
        only), language_group, language, similarity, punsafe, pwatermark, original sizes,
        distance and (``images=True``) ``thumbnail``, a PIL image no larger than ``thumb_size``
        px (None when the image is not in the shards).
        """
        return self.samples_around(
            threshold, group, n, column=column, thumb_size=thumb_size, images=images, sides=(side,)
        )[side]

    def samples_around(
        self,
        threshold: float,
        group: str = ALL,
        n: int = 8,
        *,
        column: str = schema.SIMILARITY,
        thumb_size: int = 128,
        images: bool = True,
        sides: tuple[str, ...] = ("above", "below"),
    ) -> dict[str, pd.DataFrame]:
        """:meth:`samples_near` for several sides at once: ``{side: frame}``.

        The rows of every side are read together, so each scores part (and image shard)
        involved is opened once: what a view showing both sides of a cut-off wants.
        """
        for side in sides:
            if side not in ("above", "below"):
                raise ValueError(f"side must be 'above' or 'below', got {side!r}")
        col, g = self._key(column, group)
        near = [self._nearest(col, g, threshold, side, n) for side in sides]
        idx = np.concatenate([i for i, _ in near]) if near else np.zeros(0, dtype="int64")
        held = self.rows.iloc[idx][list(_SCORE_COLUMNS[:-1])].reset_index(drop=True)
        held = held.astype({schema.LANGUAGE_GROUP: "string", schema.LANGUAGE: "string"})
        both = pd.concat([self.details(idx), held], axis=1)
        both["distance"] = np.concatenate([d for _, d in near]) if near else np.zeros(0)
        if images:
            keys, shards = both[schema.KEY], both[schema.SHARD]
            both["thumbnail"] = read_thumbnails(self.run.join("images"), keys, shards, thumb_size)
        ends = np.cumsum([len(i) for i, _ in near], dtype="int64")
        return {
            side: both.iloc[end - len(i) : end].reset_index(drop=True)
            for side, (i, _), end in zip(sides, near, ends, strict=True)
        }

    def _nearest(
        self, col: str, group: str, threshold: float, side: str, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions and distances of the ``n`` rows nearest ``threshold`` on ``side``."""
        if n <= 0:
            return np.zeros(0, dtype="int64"), np.zeros(0)
        values = self._values[col]
        t = float(_as_stored(col, threshold))
        with np.errstate(invalid="ignore"):  # NaN (no value) is on neither side
            if NUMERIC[col] == "ge":
                mask = values >= t if side == "above" else values < t
            else:
                mask = values > t if side == "above" else values <= t
        if group != ALL:
            mask &= self._gcode == self._group_index(group)
        idx = np.flatnonzero(mask)
        dist = np.abs(values[idx] - float(t))
        if len(idx) > n:  # the n nearest (and every tie of the n-th) without a full sort
            cut = np.partition(dist, n - 1)[n - 1]
            near = dist <= cut
            idx, dist = idx[near], dist[near]
        order = np.lexsort((idx, dist))[:n]
        return idx[order], dist[order]

    def details(self, positions: Any, columns: tuple[str, ...] = DETAIL_COLUMNS) -> pd.DataFrame:
        """``columns`` of the rows at ``positions`` (row numbers of :attr:`rows`), read from disk.

        Only the parquet row groups holding those rows are read, one scores part at a time, so
        a handful of samples costs a handful of row groups whatever the run's size. The result
        has one row per position, in the order given.
        """
        pos = np.asarray(positions, dtype="int64").reshape(-1)
        cols = list(columns)
        if not len(pos):
            return schema.empty({c: _DTYPES.get(c, "string") for c in cols})
        if (pos < 0).any() or (pos >= len(self.rows)).any():
            raise IndexError(f"row positions out of range 0..{len(self.rows) - 1}")
        if not self._part_paths:
            raise RuntimeError(
                "this RunView was built from in-memory rows without scores parts: "
                "use open_run to read details"
            )
        which = np.searchsorted(self._offsets, pos, side="right") - 1
        frames = []
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            part = int(self._part_index[k])
            local = pos[sel] - self._offsets[k]
            expected = int(self._offsets[k + 1] - self._offsets[k])
            try:
                df = self.run.read_parquet_take(
                    self._part_paths[part], local, columns=cols, expected_rows=expected
                )
            except RuntimeError as err:  # the part was rewritten since open_run read it
                raise RuntimeError(f"{err}: open_run it again") from None
            frames.append(df.set_axis(sel))
        out = pd.concat(frames).sort_index().reset_index(drop=True)
        return schema.conform(out, _DTYPES)

    # --- ground truth (demo runs) -----------------------------------------------------------
    def precision_recall(
        self, thresholds: FilterConfig, ground_truth: str | Path | None = None
    ) -> dict[str, Any]:
        """Precision/recall of ``thresholds`` against a ground truth parquet (url, text, matches).

        Over the scored pairs (``score_status == success``) that have a ground-truth row: a pair
        is relevant when ``matches``; it is retrieved when kept at ``thresholds`` (every filter,
        not only similarity). ``ground_truth`` defaults to ``RUN/corpus/ground_truth.parquet``.
        Also per language group under ``"groups"``.
        """
        path = str(ground_truth or self.run.join("corpus", "ground_truth.parquet"))
        if self._truth is None or self._truth[0] != path:
            self._truth = (path, *self._join_truth(path))
        _, scored, pos, truth = self._truth
        kept = decide(self._fate, thresholds).final[pos] == 0
        gcode = self._gcode[pos]
        out = _pr(kept, truth)
        out["scored_pairs"] = scored
        out["with_ground_truth"] = len(pos)
        out["groups"] = {
            g: _pr(kept[gcode == i], truth[gcode == i])
            for i, g in enumerate(self.groups)
            if (gcode == i).any()
        }
        return out

    def _join_truth(self, path: str) -> tuple[int, np.ndarray, np.ndarray]:
        """How many pairs are scored, and the positions and ``matches`` of those in ``path``.

        Url and text are read from the scores parts (:meth:`details`), not held in memory.
        """
        gt = pd.read_parquet(path, columns=[schema.URL, schema.TEXT, "matches"])
        gt = gt.dropna(subset=[schema.TEXT]).drop_duplicates([schema.URL, schema.TEXT])
        gt = gt.astype({schema.URL: "string", schema.TEXT: "string"})
        ok = self.rows[schema.SCORE_STATUS].eq("success").fillna(False).to_numpy(dtype=bool)
        scored = np.flatnonzero(ok)
        pairs = self.details(scored, (schema.URL, schema.TEXT)).assign(_pos=scored)
        m = pairs.merge(gt, on=[schema.URL, schema.TEXT], how="inner").sort_values("_pos")
        return len(scored), m["_pos"].to_numpy("int64"), m["matches"].astype(bool).to_numpy()

    # --- thresholds.toml --------------------------------------------------------------------
    def save_thresholds(self, thresholds: FilterConfig, path: str | Path | None = None) -> str:
        """Write ``thresholds`` as the ``thresholds.toml`` materialize reads; returns the path.

        ``path`` defaults to ``RUN/thresholds.toml``.
        """
        target = str(path) if path is not None else self.run.join("thresholds.toml")
        text = dump_thresholds(thresholds)
        self.run.write_bytes_atomic(target, text.encode("utf-8"))
        return target

    def load_thresholds(self, path: str | Path) -> FilterConfig:
        """Read a ``thresholds.toml`` (missing keys from this run's config)."""
        return load_thresholds(path, base=self.thresholds)

    def with_similarity(self, **by_group: float) -> FilterConfig:
        """This run's thresholds with ``similarity_<group>`` replaced, e.g. ``en=0.3``."""
        changes = {f"similarity_{g}": float(v) for g, v in by_group.items()}
        return dataclasses.replace(self.thresholds, **changes)


def open_run(path: str | Path | RunDir, *, client: Any | None = None) -> RunView:
    """Open a run's scores for interaction (one Dask job now; none per threshold change).

    Parameters
    ----------
    path
        The run directory (local path or fsspec URL) with finished ``scores`` partitions.
    client
        A ``distributed.Client`` to read the parts on; None uses the default client, else
        this process's threads.
    """
    run = path if isinstance(path, RunDir) else RunDir(str(path))
    part_paths = {i: run.part_path("scores", i) for i in sorted(run.markers("scores"))}
    if not part_paths:
        raise FileNotFoundError(f"{run.path}: no finished scores partitions (run the pipeline)")
    parts = list(part_paths.items())
    read = functools.partial(_read_part, run=run, read_columns=list(EXPLORE_COLUMNS))
    rows = map_reduce(read, parts, _concat, client=client)
    try:
        thresholds = run.read_config().filters
    except FileNotFoundError:
        thresholds = FilterConfig()
    log.info("explore: %d rows from %d scores parts of %s", len(rows), len(parts), run.path)
    view = RunView(run, rows, thresholds, part_paths=part_paths)
    del rows
    pa.default_memory_pool().release_unused()  # the parts' string buffers are freed: give back
    return view


# --- samples ------------------------------------------------------------------------------------


def samples_html(
    samples: pd.DataFrame,
    title: str = "",
    score: str = schema.SIMILARITY,
    *,
    cell_class: str = "sample",
) -> str:
    """An HTML grid of sampled rows (``samples_around``) or search results (``knn.search``).

    One cell per row: its base64 PNG ``thumbnail``, ``#rank`` (search results), ``score``, the
    near-duplicates folded into it (``collapsed``), the caption, and a link to an http(s) URL.
    """
    cells = []
    for _, row in samples.iterrows():
        rank = f"#{int(row['rank'])} " if "rank" in row else ""
        folded = int(row.get("collapsed", 0))
        extra = f" (+{folded} near-dup)" if folded else ""
        url, caption = (
            "" if pd.isna(row.get(c)) else str(row[c]) for c in (schema.URL, schema.TEXT)
        )
        href = html.escape(url, quote=True)
        link = f'<br><a href="{href}" rel="noreferrer" target="_blank">link</a>'
        link = link if url.startswith(("http://", "https://")) else ""
        cells.append(
            f'<div class="{cell_class}" style="width:140px;margin:4px;font-size:11px">'
            f"{thumbnail_html(row.get('thumbnail'))}"
            f"<br><b>{rank}{score} {float(row[score]):.3f}</b>{extra}"
            f"<br>{html.escape(caption[:80])}{link}</div>"
        )
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    return f'{head}<div style="display:flex;flex-wrap:wrap">{"".join(cells)}</div>'


# --- helpers ------------------------------------------------------------------------------------


def _as_stored(column: str, value: float) -> np.floating:
    """``value`` as the filters compare it (similarity in float32)."""
    return (np.float32 if column == schema.SIMILARITY else np.float64)(value)


def _past(column: str, value: float, direction: int) -> float:
    """The stored value next to ``value`` towards ``direction`` (a threshold keeping nothing)."""
    v = _as_stored(column, value)
    return float(np.nextafter(v, v.dtype.type(direction * np.inf)))


def _pr(kept: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    tp = int((kept & truth).sum())
    nk, nt = int(kept.sum()), int(truth.sum())
    precision = tp / nk if nk else float("nan")
    recall = tp / nt if nt else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "kept": nk,
        "true_pairs": nt,
        "true_kept": tp,
        "pairs": len(truth),
    }
