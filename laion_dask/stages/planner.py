"""The download planner: which host bucket each candidate row goes to, and how buckets are cut
into download chunks (one shard each) and chained into tasks.

Every function here works on one partition, or on the small per-bucket and per-host tables,
with plain pandas and numpy; :mod:`laion_dask.orchestration.pipeline` maps them over the
candidates (a groupby for the host counts, a shuffle on ``_bucket``) and writes the plan.

The plan (fingerprint tag :data:`CHUNKING`):

* ``n_buckets = ceil(candidate rows / rows_per_task)`` (:func:`bucket_count`); a row goes to
  bucket ``host_keys(row) % n_buckets``, so all rows of a host, from every input file, share
  one bucket;
* a *big* host, with more than ``BIG_HOST x rows_per_task`` fetched rows, instead gets buckets
  of its own, numbered after the hashed ones, its rows spread over them by uid
  (:func:`big_host_buckets`, :func:`assign_buckets`); they form one *chain*, downloaded by one
  task bucket after bucket, so no bucket, shuffle partition or chunk grows with the host;
* every other bucket is a chain of one (:func:`chains`);
* a bucket's rows are sorted by (host key, candidates part, row in part)
  (:func:`split_buckets`), so its content and order depend only on the candidates, and cut into
  even chunks of at most ``rows_per_task`` rows (:func:`chunk_bounds`); shard ids number the
  chunks in chain order (:func:`shard_ids`), whatever the number of workers;
* a chain longer than its share of the cluster (one host serving most of the run) is split
  into contiguous runs of its chunks (:func:`chain_chunks`, :func:`chain_parts`,
  :func:`split_chain`), downloaded by that many tasks at once, each with that share of the
  per-host budget, so the hosts still see at most ``per_host_concurrency`` requests in flight.
  Chunks, shard ids and shard contents are the same however a chain is split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from laion_dask.ground import schema

__all__ = [
    "CHUNKING",
    "BIG_HOST",
    "host_keys",
    "chunk_bounds",
    "bucket_count",
    "host_counts",
    "big_host_buckets",
    "assign_buckets",
    "split_buckets",
    "chains",
    "shard_ids",
    "Chunk",
    "chain_chunks",
    "chain_parts",
    "split_chain",
]

#: how candidate rows are cut into download tasks (part of the download fingerprint)
CHUNKING = "host-bucket-v2"

#: a host with more than this many x ``rows_per_task`` fetched rows is big: it gets buckets of
#: its own, each about this size, chained in one task (so no bucket, shuffle partition or
#: download chunk grows with the host)
BIG_HOST = 8

#: the columns :func:`host_counts` reads
HOST_COLUMNS = [schema.UID, schema.URL, schema.DROP_REASON]

#: helper columns :func:`assign_buckets` adds, never written to a bucket file
PLAN_COLUMNS = ("_bucket", "_key", "_part", "_row")

_HOST = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(\[[^\]]*\]|[^/?#:]*)"

HOST_COUNTS_META = pd.DataFrame({"_key": pd.Series(dtype="uint64"), "n": pd.Series(dtype="int64")})

PLAN_META = schema.CANDIDATES.assign(
    _bucket=pd.Series(dtype="int64"),
    _key=pd.Series(dtype="uint64"),
    _part=pd.Series(dtype="int64"),
    _row=pd.Series(dtype="int64"),
)


def host_keys(df: pd.DataFrame) -> np.ndarray:
    """The ``uint64`` key that puts each candidate row into its download bucket.

    A row that will be fetched (no ``drop_reason`` and a URL with a host) is keyed by a hash of
    its URL's host (lower case, without user info, port or trailing dot), so every row of a
    host has the same key whatever input file it came from. A row that is never fetched (a
    ``drop_reason``, or no host to contact) is keyed by its ``uid`` instead: such rows cost no
    request, and keying them by uid spreads them over the buckets rather than piling, say,
    every ``data:`` URI of the crawl into one.

    Parameters
    ----------
    df : pandas.DataFrame
        Candidate rows (``url``, ``uid`` and ``drop_reason`` columns).

    Returns
    -------
    numpy.ndarray
        One ``uint64`` per row; stable across processes, runs and library versions of pandas
        that keep ``pandas.util.hash_array`` (SipHash with a fixed key).
    """
    return _keys_and_fetched(df)[0]


def _keys_and_fetched(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bucket keys, fetched mask, uid hashes) of candidate rows (see :func:`host_keys`)."""
    urls = df[schema.URL].astype("string")
    hosts = urls.str.extract(_HOST, expand=False).str.lower().str.rstrip(".").fillna("")
    host_hash = pd.util.hash_array(hosts.to_numpy(dtype=object))
    uid_hash = pd.util.hash_array(df[schema.UID].astype("string").to_numpy(dtype=object))
    fetched = df[schema.DROP_REASON].isna().to_numpy(dtype=bool) & hosts.ne("").to_numpy(dtype=bool)
    return np.where(fetched, host_hash, uid_hash), fetched, uid_hash


def chunk_bounds(rows: int, rows_per_task: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: a bucket of ``rows`` rows cut into even chunks, none larger
    than ``rows_per_task`` and none empty (each chunk is one shard).

    Examples
    --------
    >>> chunk_bounds(42, 10)
    [(0, 9), (9, 18), (18, 27), (27, 36), (36, 42)]
    """
    n = math.ceil(rows / rows_per_task)
    size = math.ceil(rows / n) if n else 0
    return [(c * size, min(rows, (c + 1) * size)) for c in range(n)]


def bucket_count(total_rows: int, rows_per_task: int) -> int:
    """Hashed buckets for ``total_rows`` candidates: about one download task's rows each."""
    return max(1, math.ceil(total_rows / rows_per_task))


def host_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Fetched rows per host key in one partition (``_key``, ``n``): the big-host count's input."""
    keys, fetched, _ = _keys_and_fetched(df)
    counts = pd.Series(keys[fetched]).value_counts()
    return pd.DataFrame(
        {"_key": counts.index.to_numpy(dtype="uint64"), "n": counts.to_numpy(dtype="int64")}
    )


def big_host_buckets(totals: pd.Series, rows_per_task: int, n_buckets: int) -> pd.DataFrame:
    """The big hosts among ``totals`` (fetched rows per host key), each with its own buckets.

    Returns ``_key, n, first, k`` sorted by key: host ``_key`` (more than ``BIG_HOST x
    rows_per_task`` fetched rows) owns buckets ``first .. first + k - 1``, each about
    ``BIG_HOST x rows_per_task`` rows, numbered after the ``n_buckets`` hashed ones.
    """
    limit = BIG_HOST * rows_per_task
    big = totals[totals > limit].sort_index()
    k = np.ceil(big.to_numpy() / limit).astype("int64")
    first = (n_buckets + np.cumsum(k) - k).astype("int64")
    return pd.DataFrame(
        {
            "_key": big.index.to_numpy(dtype="uint64"),
            "n": big.to_numpy(dtype="int64"),
            "first": first,
            "k": k,
        }
    )


def assign_buckets(
    df: pd.DataFrame,
    n_buckets: int,
    big: pd.DataFrame | None = None,
    *,
    part: int = 0,
    first_row: int = 0,
) -> pd.DataFrame:
    """Candidate rows (``schema.CANDIDATES`` columns; others are dropped) plus ``_bucket``,
    ``_key``, ``_part`` and ``_row`` (``PLAN_META``): the plan shuffle's input.

    ``n_buckets`` is :func:`bucket_count`'s, ``big`` :func:`big_host_buckets` of the whole run
    (None when no host is big). ``part`` and ``first_row`` name the candidates part these rows
    come from and the position of the first one in it: the sort key that makes a bucket's order
    independent of the shuffle.
    """
    df = df[list(schema.CANDIDATES.columns)]
    keys, fetched, uid_hash = _keys_and_fetched(df)
    bucket = (keys % np.uint64(n_buckets)).astype("int64")
    if big is not None and len(big) and len(df):
        big_keys = big["_key"].to_numpy(dtype="uint64")
        pos = np.minimum(np.searchsorted(big_keys, keys), len(big_keys) - 1)
        hit = fetched & (big_keys[pos] == keys)
        # a big host's rows spread over its own buckets by uid: each about BIG_HOST tasks' worth
        first, k = big["first"].to_numpy()[pos[hit]], big["k"].to_numpy()[pos[hit]]
        bucket[hit] = first + (uid_hash[hit] % k.astype("uint64")).astype("int64")
    return df.assign(
        _bucket=bucket,
        _key=keys,
        _part=np.full(len(df), part, dtype="int64"),
        _row=np.arange(first_row, first_row + len(df), dtype="int64"),
    )


def split_buckets(df: pd.DataFrame) -> Iterator[tuple[int, pd.DataFrame]]:
    """``(bucket, rows)`` for each bucket in one shuffled partition of :func:`assign_buckets`.

    Rows are sorted by (host key, candidates part, row in part) without the helper columns, so
    a bucket's content and order depend only on the candidates, never on how the shuffle
    delivered them. An empty partition (more partitions than buckets) yields nothing.
    """
    columns = [c for c in df.columns if c not in PLAN_COLUMNS]
    df = df.sort_values(["_bucket", "_key", "_part", "_row"], kind="stable")
    bucket = df["_bucket"].to_numpy()
    if not len(bucket):
        return
    frame = schema.conform(df[columns].reset_index(drop=True), schema.CANDIDATES_DTYPES)
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    stops = np.r_[starts[1:], len(bucket)]
    for start, stop in zip(starts, stops, strict=True):
        yield int(bucket[start]), frame.iloc[start:stop]


def chains(buckets: Iterable[int], n_buckets: int, big: pd.DataFrame) -> list[list[int]]:
    """Buckets downloaded one after the other by one task: each non-empty hashed bucket alone,
    then each big host's non-empty buckets together (in bucket order)."""
    present = sorted(set(buckets))
    out = [[b] for b in present if b < n_buckets]
    have = set(present)
    for first, k in zip(big["first"], big["k"], strict=True):
        chain = [b for b in range(int(first), int(first + k)) if b in have]
        if chain:
            out.append(chain)
    return out


def shard_ids(
    rows: dict[int, int], chain_list: Sequence[Sequence[int]], rows_per_task: int
) -> list[list[tuple[int, int, list[int]]]]:
    """Per chain, ``(bucket, rows, shard ids)`` of each bucket: one shard per chunk, numbered
    from 0 in chain order, so the same plan gives the same shards on any cluster."""
    out: list[list[tuple[int, int, list[int]]]] = []
    next_id = 0
    for chain in chain_list:
        work = []
        for bucket in chain:
            n_chunks = len(chunk_bounds(rows[bucket], rows_per_task))
            work.append((bucket, rows[bucket], list(range(next_id, next_id + n_chunks))))
            next_id += n_chunks
        out.append(work)
    return out


class Chunk(NamedTuple):
    """One download chunk: rows ``start:stop`` of ``bucket``'s file, the ``chunk``-th of the
    bucket, written as shard ``shard_id``."""

    bucket: int
    chunk: int
    shard_id: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def chain_chunks(
    chain: Sequence[tuple[int, int, Sequence[int]]], rows_per_task: int
) -> list[Chunk]:
    """Every chunk of one chain of :func:`shard_ids`, in chain order.

    Examples
    --------
    >>> [tuple(c) for c in chain_chunks([(4, 21, [4, 5, 6]), (6, 1, [7])], 10)]
    [(4, 0, 4, 0, 7), (4, 1, 5, 7, 14), (4, 2, 6, 14, 21), (6, 0, 7, 0, 1)]
    """
    out = []
    for bucket, rows, ids in chain:
        bounds = chunk_bounds(rows, rows_per_task)
        for chunk, (shard_id, (start, stop)) in enumerate(zip(ids, bounds, strict=True)):
            out.append(Chunk(bucket, chunk, shard_id, start, stop))
    return out


def chain_parts(
    chain_rows: int, total_rows: int, slots: int, n_chunks: int, per_host_concurrency: int
) -> int:
    """How many tasks download one chain at once: 1, unless the chain holds more than its share
    of the run's rows for ``slots`` task slots of the cluster (a host serving most of the run
    would otherwise keep one slot busy while the others idle). Never more than its chunks, nor
    than ``per_host_concurrency`` (each task gets at least one request to a host).

    Examples
    --------
    >>> chain_parts(5000, 5000, slots=2, n_chunks=5, per_host_concurrency=64)
    2
    >>> chain_parts(900, 100_000, slots=8, n_chunks=1, per_host_concurrency=8)
    1
    """
    if chain_rows <= 0 or total_rows <= 0 or slots <= 1:
        return 1
    share = math.ceil(chain_rows * slots / total_rows)
    return max(1, min(share, slots, n_chunks, per_host_concurrency))


def split_chain(chunks: Sequence[Chunk], parts: int) -> list[list[Chunk]]:
    """``chunks`` cut into at most ``parts`` contiguous runs of about equal rows, none empty.

    Contiguous, so each task keeps its hosts' rows together (rows are sorted by host).

    Examples
    --------
    >>> c = chain_chunks([(0, 50, [0, 1, 2, 3, 4])], 10)
    >>> [[x.shard_id for x in run] for run in split_chain(c, 2)]
    [[0, 1], [2, 3, 4]]
    """
    parts = max(1, min(parts, len(chunks)))
    total = sum(c.rows for c in chunks)
    out: list[list[Chunk]] = [[] for _ in range(parts)]
    done = 0
    for c in chunks:
        # the part whose share of the rows this chunk's middle row falls in
        middle = done + c.rows / 2
        out[min(parts - 1, int(middle * parts / total) if total else 0)].append(c)
        done += c.rows
    return [run for run in out if run]
