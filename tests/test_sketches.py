"""ground/sketches: accurate against exact counts on skewed data, a merge of any split equals
(or, for Misra-Gries, is as accurate as) one pass, and summaries survive Dask's serialisation."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
from distributed.protocol import deserialize, serialize

from laion_dask.ground.sketches import (
    HistSpec,
    bottom_k,
    distinct_estimate,
    distinct_sketch,
    heavy_hitters,
    histogram,
    merge,
    merge_all,
    quantiles,
    top_k,
)


def _zipf(rng: np.random.Generator, names: int, rows: int) -> np.ndarray:
    """Row -> name index, Zipf(1.1): a few names hold most rows, most names a handful."""
    p = 1.0 / np.arange(1, names + 1) ** 1.1
    return rng.choice(names, size=rows, p=p / p.sum())


def _summary(labels: list[str], codes: np.ndarray, capacity: int) -> dict:
    return heavy_hitters(labels, np.bincount(codes, minlength=len(labels)), capacity)


def _tree(summaries: list[dict], fan_in: int) -> dict:
    while len(summaries) > 1:
        summaries = [merge_all(summaries[i : i + fan_in]) for i in range(0, len(summaries), fan_in)]
    return summaries[0]


def test_heavy_hitters_on_skewed_data_stay_within_their_bound_in_any_merge_order():
    rng = np.random.default_rng(3)
    labels = [f"d{i}.example" for i in range(20_000)]
    codes = _zipf(rng, len(labels), 200_000)
    truth = np.bincount(codes, minlength=len(labels))
    parts = np.array_split(codes, 12)
    one_pass = _summary(labels, codes, 256)
    summaries = [_summary(labels, p, 256) for p in parts]
    for merged in (one_pass, merge_all(summaries), _tree(summaries, 3), _tree(summaries[::-1], 2)):
        assert merged["n"] == len(codes) and len(merged["counts"]) <= 256
        err = merged["error"]
        assert 0 < err <= len(codes) / 257  # pruned, within the Misra-Gries bound
        for i, true in enumerate(truth):
            assert true - err <= merged["counts"].get(labels[i], 0) <= true
        # the heavy names are all there, in the right order
        top, _ = top_k(merged["counts"], 10)
        assert [name for name, _ in top] == [
            labels[i] for i in np.argsort(-truth, kind="stable")[:10]
        ]
    # below capacity every count is exact, error 0, whatever the split
    exact = merge_all([_summary(labels, p, 100_000) for p in parts])
    assert exact["error"] == 0
    assert exact["counts"] == {labels[i]: int(c) for i, c in enumerate(truth) if c}


def test_distinct_counts_exact_below_k_and_within_three_standard_errors_above():
    rng = np.random.default_rng(5)
    names = np.array([f"host{i}.example" for i in range(200_000)])
    few = names[_zipf(rng, 3000, 50_000)]
    sketch = distinct_sketch(few.tolist(), 4096)
    assert distinct_estimate(sketch) == (len(set(few.tolist())), True)
    many = names[_zipf(rng, len(names), 400_000)]
    true = len(set(many.tolist()))
    assert true > 50_000
    for k in (1024, 4096):
        est, exact = distinct_estimate(distinct_sketch(many.tolist(), k))
        assert not exact
        assert abs(est - true) <= 3 * true / np.sqrt(k), (k, est, true)


def test_distinct_merge_equals_one_pass_for_any_split():
    rng = np.random.default_rng(8)
    labels = [f"h{i}" for i in _zipf(rng, 100_000, 150_000)]
    one_pass = distinct_sketch(labels, 1024)
    cuts = sorted(rng.choice(len(labels), size=9, replace=False))
    parts = [distinct_sketch(p, 1024) for p in np.split(np.array(labels), cuts)]
    assert merge_all(parts) == one_pass  # the same k smallest hashes, byte for byte
    assert _tree(parts[::-1], 3) == one_pass
    # exact parts merge exactly; overlaps are counted once
    a, b = distinct_sketch(labels[:500], 4096), distinct_sketch(labels[250:900], 4096)
    assert distinct_estimate(merge(a, b)) == (len(set(labels[:900])), True)
    # a smaller k wins in a merge (the coarser sketch bounds the result)
    assert merge(distinct_sketch(labels, 4096), one_pass)["k"] == 1024


def test_distinct_k_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        distinct_sketch(["a"], 1000)


def test_histogram_merge_equals_one_pass_and_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(0.3, 0.2, 100_000).astype("float32")
    x[rng.random(x.size) < 0.02] = np.nan
    x[:3] = [-5.0, 5.0, 1.0]  # under, over, exactly hi (in the last bin)
    mask = rng.random(x.size) > 0.25
    mask[:3] = True
    spec = HistSpec(-1.0, 1.0, 2000)
    one_pass = histogram(x, spec, mask)
    parts = [
        histogram(v, spec, m)
        for v, m in zip(np.array_split(x, 7), np.array_split(mask, 7), strict=True)
    ]
    merged = merge_all(parts)
    assert merged["sum"] == pytest.approx(one_pass["sum"], rel=1e-9)
    assert {k: v for k, v in merged.items() if k != "sum"} == {
        k: v for k, v in one_pass.items() if k != "sum"
    }
    sel = x[mask].astype("float64")
    fin = sel[~np.isnan(sel)]
    assert one_pass["counts"] == np.histogram(fin, bins=spec.edges)[0].tolist()
    assert one_pass["under"] == int((fin < -1).sum()) >= 1
    assert one_pass["over"] == int((fin > 1).sum()) >= 1
    assert one_pass["missing"] == int(np.isnan(sel).sum())
    # quantiles from the merged counts are within one bin of the exact order statistic
    qs = [0.01, 0.25, 0.5, 0.75, 0.99]
    inner = np.sort(fin)
    for q, got in zip(qs, quantiles(merged, spec, qs), strict=True):
        exact = inner[int(np.ceil(q * len(inner))) - 1]
        assert abs(got - exact) <= spec.quantile_error["abs"], q


def test_summaries_survive_pickle_and_dasks_serialisation_and_still_merge():
    rng = np.random.default_rng(1)
    labels = [f"d{i}" for i in range(5000)]
    codes = _zipf(rng, len(labels), 20_000)
    summary = {
        "rows": 20_000,
        "domains": _summary(labels, codes, 64),
        "distinct": distinct_sketch([labels[i] for i in np.unique(codes)], 1024),
        "hist": histogram(rng.random(100), HistSpec(0.0, 1.0, 10)),
        "samples": [{"prio": float(p), "key": str(i)} for i, p in enumerate(rng.random(20))],
    }
    for back in (
        pickle.loads(pickle.dumps(summary)),
        deserialize(*serialize(summary, serializers=["pickle"])),
    ):
        assert back == summary
        assert merge(back, summary, k=8) == merge(summary, summary, k=8)
    twice = merge(summary, summary, k=8)
    assert twice["rows"] == 40_000 and twice["domains"]["n"] == 40_000
    assert distinct_estimate(twice["distinct"]) == distinct_estimate(summary["distinct"])
    assert twice["samples"] == bottom_k(summary["samples"] * 2, 8)


def test_top_k_orders_ties_by_name_and_sums_the_rest():
    counts = Counter({"b": 5, "a": 5, "c": 2, "d": 1})
    assert top_k(counts, 2) == ([["a", 5], ["b", 5]], 3)
