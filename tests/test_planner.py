"""The download planner over plain frames: host keys, buckets, big-host chains, chunks, shards.

The Dask side (the host-count groupby, the bucket shuffle, the plan files) is exercised by
tests/test_pipeline_download.py and tests/test_download_politeness.py on a real cluster; here
each per-partition function is checked on its own, and a whole plan built with pandas alone
is checked against what the plan promises.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.stages import planner
from laion_dask.stages.planner import (
    assign_buckets,
    big_host_buckets,
    bucket_count,
    chain_chunks,
    chain_parts,
    chains,
    chunk_bounds,
    host_counts,
    host_keys,
    shard_ids,
    split_buckets,
    split_chain,
)


def _candidates(urls: list[str], drop: list[str | None] | None = None) -> pd.DataFrame:
    """Candidate rows (``schema.CANDIDATES`` columns) for ``urls``, uid ``u<i>``."""
    n = len(urls)
    df = pd.DataFrame(
        {
            schema.UID: [f"u{i}" for i in range(n)],
            schema.URL: urls,
            schema.TEXT: [f"caption {i}" for i in range(n)],
            schema.RECORD_OFFSET: range(n),
            schema.HASH: range(n),
            schema.LANGUAGE_SCORE: 0.5,
            schema.DROP_REASON: drop if drop is not None else [None] * n,
        }
    )
    for col in schema.CANDIDATES.columns:
        if col not in df.columns:
            df[col] = None
    return schema.conform(df[list(schema.CANDIDATES.columns)], schema.CANDIDATES_DTYPES)


def _crawl(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` rows over 30 small hosts and one big one (half the rows), some dropped, some
    ``data:`` URIs; host names vary in case, port and user info."""
    rng = np.random.default_rng(seed)
    hosts = np.array([f"h{i}.example" for i in range(30)] + ["big.example"])
    pick = rng.choice(len(hosts), n, p=np.r_[np.full(30, 0.5 / 30), 0.5])
    urls = [
        f"http://{'me@' if i % 7 == 0 else ''}{hosts[h].upper() if i % 5 == 0 else hosts[h]}"
        f"{':8080' if i % 4 == 0 else ''}/img/{i}.jpg"
        for i, h in enumerate(pick)
    ]
    urls[::37] = ["data:image/png;base64,AAAA"] * len(urls[::37])
    drop = [("text_too_short" if r < 0.15 else None) for r in rng.random(n)]
    return _candidates(urls, drop)


def _host(df: pd.DataFrame) -> np.ndarray:
    return (
        df[schema.URL].str.lower().str.extract(r"//(?:[^@/]*@)?([^:/]+)", expand=False).to_numpy()
    )


def test_host_keys_ignore_case_port_user_and_trailing_dot_and_are_stable():
    df = _candidates(
        [
            "http://Img.Example.com:8080/a.jpg",
            "https://user@img.example.com./b.png",
            "data:image/png;base64,xx",
        ]
    )
    keys = host_keys(df)
    assert keys.dtype == np.uint64 and keys[0] == keys[1] != keys[2]
    # SipHash with pandas' fixed key: the same in every process and run. These are the keys of
    # chunking "host-bucket-v2"; a change here must come with a new planner.CHUNKING
    assert [int(k) for k in keys] == [
        16475027925538068536,
        16475027925538068536,
        223635902931355421,
    ]
    assert planner.CHUNKING == "host-bucket-v2"


def test_every_host_lands_in_one_bucket_and_unfetched_rows_spread():
    urls = [f"http://Host{h % 3}.example:80{h % 2}/a/{h}.jpg" for h in range(60)]
    df = _candidates(urls, [None] * 50 + ["text_too_short"] * 10)
    keys = host_keys(df)
    kept = df[schema.DROP_REASON].isna().to_numpy()
    host = _host(df)
    for h in set(host):
        assert len(set(keys[kept & (host == h)])) == 1
    assert len(set(keys[kept])) == 3
    # rows never fetched are keyed by uid: one key each, not their host's
    assert len(set(keys[~kept])) == 10 and not set(keys[~kept]) & set(keys[kept])
    assert (host_keys(df.iloc[::-1]) == keys[::-1]).all()


@pytest.mark.parametrize(("rows", "per_task"), [(42, 10), (10, 3), (5, 5), (1, 4), (2000, 7)])
def test_chunk_bounds_cover_a_bucket_evenly(rows, per_task):
    bounds = chunk_bounds(rows, per_task)
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [b - a for a, b in bounds]
    assert min(sizes) >= 1 and max(sizes) <= per_task
    assert len(bounds) == -(-rows // per_task)  # as few chunks as rows_per_task allows


def test_chunk_bounds_of_an_empty_bucket_and_bucket_count():
    assert chunk_bounds(0, 5) == []
    assert [bucket_count(n, 10) for n in (0, 1, 10, 11)] == [1, 1, 1, 2]


def test_host_counts_sum_over_parts_to_fetched_rows_per_host():
    df = _crawl(900)
    parts = [df.iloc[i : i + 300] for i in range(0, 900, 300)]
    totals = pd.concat([host_counts(p) for p in parts]).groupby("_key")["n"].sum()
    keys = host_keys(df)
    fetched = (df[schema.DROP_REASON].isna() & ~df[schema.URL].str.startswith("data:")).to_numpy()
    expected = pd.Series(keys[fetched]).value_counts()
    assert totals.sort_index().to_dict() == expected.sort_index().to_dict()


def test_big_host_buckets_number_after_the_hashed_ones():
    totals = pd.Series(
        [5, 81, 400, 80], index=pd.Index([7, 3, 1, 9], dtype="uint64"), dtype="int64"
    )
    big = big_host_buckets(totals, rows_per_task=10, n_buckets=50)
    # more than BIG_HOST x rows_per_task = 80 rows: keys 3 and 1 (80 is not more), by key
    assert big["_key"].tolist() == [1, 3]
    assert big["k"].tolist() == [5, 2]  # ceil(400 / 80), ceil(81 / 80)
    assert big["first"].tolist() == [50, 55]
    assert len(big_host_buckets(totals.iloc[:0], 10, 50)) == 0


def _plan(
    df: pd.DataFrame, n_parts: int, rows_per_task: int
) -> tuple[dict[int, pd.DataFrame], int, pd.DataFrame]:
    """A whole plan with pandas alone: what the pipeline does with Dask."""
    parts = np.array_split(np.arange(len(df)), n_parts)
    frames = [df.iloc[idx].reset_index(drop=True) for idx in parts]
    totals = pd.concat([host_counts(f) for f in frames]).groupby("_key")["n"].sum()
    n_buckets = bucket_count(len(df), rows_per_task)
    big = big_host_buckets(totals, rows_per_task, n_buckets)
    tagged = [assign_buckets(f, n_buckets, big, part=i, first_row=0) for i, f in enumerate(frames)]
    # the shuffle delivers rows in any order
    shuffled = pd.concat(tagged).sample(frac=1.0, random_state=n_parts)
    return dict(split_buckets(shuffled)), n_buckets, big


def test_a_plan_keeps_hosts_together_and_spreads_a_big_host_over_its_chain():
    df = _crawl(2000)
    rows_per_task = 25
    buckets, n_buckets, big = _plan(df, 4, rows_per_task)
    assert sum(len(b) for b in buckets.values()) == len(df)
    assert sorted(u for b in buckets.values() for u in b[schema.UID]) == sorted(df[schema.UID])
    assert len(big) == 1 and (big["n"] > planner.BIG_HOST * rows_per_task).all()
    first, k = int(big["first"].iloc[0]), int(big["k"].iloc[0])
    host_bucket: dict[str, set[int]] = {}
    for bucket, rows in buckets.items():
        fetched = rows[rows[schema.DROP_REASON].isna() & ~rows[schema.URL].str.startswith("data:")]
        for h in set(_host(fetched)):
            host_bucket.setdefault(h, set()).add(bucket)
        assert not set(rows.columns) & set(planner.PLAN_COLUMNS)
        assert rows.dtypes.to_dict() == schema.CANDIDATES.dtypes.to_dict()
    # a small host's fetched rows share one hashed bucket; the big host's fill its own buckets
    assert all(
        len(b) == 1 and max(b) < n_buckets for h, b in host_bucket.items() if h != "big.example"
    )
    assert host_bucket["big.example"] == set(range(first, first + k))
    for b in range(first, first + k):  # about BIG_HOST tasks' worth each, spread by uid
        assert len(buckets[b]) <= 1.5 * planner.BIG_HOST * rows_per_task
    # the big host's unfetched rows are keyed by uid like any other: never in its chain
    big_rows = pd.concat([buckets[b] for b in range(first, first + k)])
    assert big_rows[schema.DROP_REASON].isna().all()


def test_a_plan_does_not_depend_on_how_the_candidates_were_cut_or_shuffled():
    df = _crawl(1200, seed=3)
    one, n1, _ = _plan(df, 1, 20)
    three, n3, _ = _plan(df, 3, 20)
    assert n1 == n3 and one.keys() == three.keys()
    for bucket in one:
        pd.testing.assert_frame_equal(
            one[bucket].reset_index(drop=True), three[bucket].reset_index(drop=True)
        )


def test_split_buckets_orders_rows_by_host_then_position_and_skips_empty():
    df = _candidates([f"http://h{i % 2}.example/{i}.jpg" for i in range(6)])
    tagged = assign_buckets(df, 1, None, part=0, first_row=100)
    assert tagged["_row"].tolist() == list(range(100, 106))
    ((bucket, rows),) = list(split_buckets(tagged.iloc[::-1]))
    keys = host_keys(rows)
    assert bucket == 0 and (np.diff(keys.astype(np.float64)) >= 0).all()
    for k in set(keys):  # within a host, candidates order
        uids = rows[schema.UID][keys == k].tolist()
        assert uids == sorted(uids, key=lambda u: int(u[1:]))
    assert list(split_buckets(tagged.iloc[:0])) == []


def test_chains_and_shard_ids_follow_the_plan_order():
    big = pd.DataFrame({"_key": [1], "n": [300], "first": [4], "k": [3]})
    # bucket 2 and big-host bucket 5 came out empty
    assert chains([0, 1, 3, 4, 6], 4, big) == [[0], [1], [3], [4, 6]]
    rows = {0: 12, 1: 5, 3: 10, 4: 21, 6: 1}
    layout = shard_ids(rows, [[0], [1], [3], [4, 6]], rows_per_task=10)
    assert layout == [
        [(0, 12, [0, 1])],
        [(1, 5, [2])],
        [(3, 10, [3])],
        [(4, 21, [4, 5, 6]), (6, 1, [7])],
    ]


def test_chain_chunks_cover_each_bucket_in_order_with_the_plan_shard_ids():
    layout = shard_ids({4: 21, 6: 1}, [[4, 6]], rows_per_task=10)
    chunks = chain_chunks(layout[0], 10)
    assert [c.shard_id for c in chunks] == [0, 1, 2, 3]
    assert [(c.bucket, c.chunk) for c in chunks] == [(4, 0), (4, 1), (4, 2), (6, 0)]
    assert [(c.start, c.stop) for c in chunks[:3]] == chunk_bounds(21, 10)
    assert sum(c.rows for c in chunks) == 22


@pytest.mark.parametrize(
    ("chain_rows", "total", "slots", "n_chunks", "per_host", "want"),
    [
        (5000, 5000, 2, 5, 64, 2),  # one host is the whole run: both slots
        (5000, 5000, 8, 5, 64, 5),  # never more tasks than chunks
        (5000, 5000, 8, 5, 3, 3),  # each task gets at least one request to the host
        (5000, 5000, 2, 5, 1, 1),  # a budget of one request cannot be shared
        (2500, 10_000, 2, 3, 8, 1),  # within its share of the cluster: one task
        (2600, 10_000, 4, 3, 8, 2),
        (5000, 5000, 1, 5, 64, 1),  # one slot: nothing to share
    ],
)
def test_chain_parts(chain_rows, total, slots, n_chunks, per_host, want):
    assert chain_parts(chain_rows, total, slots, n_chunks, per_host) == want


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 50])
def test_split_chain_is_contiguous_complete_and_balanced(parts):
    layout = shard_ids({3: 95, 8: 40, 9: 7}, [[3, 8, 9]], rows_per_task=10)
    chunks = chain_chunks(layout[0], 10)
    runs = split_chain(chunks, parts)
    assert [c for run in runs for c in run] == chunks  # every chunk once, in chain order
    assert len(runs) == min(parts, len(chunks)) and all(runs)
    rows = [sum(c.rows for c in run) for run in runs]
    # no run is more than one chunk over an even share of the rows
    assert max(rows) <= sum(rows) / len(runs) + max(c.rows for c in chunks)
