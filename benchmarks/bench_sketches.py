"""Our sketches against Apache DataSketches' on the report's workload: speed and error.

The report gets, per scores partition, exact per-domain counts (one ``bincount``) and the list
of domains present; it keeps a heavy-hitter summary and a distinct-count sketch of them and
merges the partitions' summaries. This script does that on ``--rows`` Zipf(1.1) rows over
``--names`` names in ``--parts`` parts and compares:

* heavy hitters: our Misra-Gries (:func:`laion_dask.ground.sketches.heavy_hitters`, 4,096
  counters) against ``datasketches.frequent_strings_sketch`` (lg map size 12 and 13): seconds
  for all parts plus the merges, the guaranteed error bound, the largest error over the true
  top 100;
* distinct counts: :func:`~laion_dask.ground.sketches.distinct_sketch` (theta, k = 4,096)
  against ``hll_sketch`` (lg 12): seconds and relative error;
* quantiles: the fixed-bin histogram (2,000 bins over [-1, 1], as the report's similarity)
  against ``kll_floats_sketch`` (k = 200): the worst rank error over 99 quantiles.

    nice -n 10 .venv/bin/python benchmarks/bench_sketches.py          # 10M rows
    .venv/bin/python benchmarks/bench_sketches.py --rows 1000000

Writes ``benchmarks/results/sketches.json``.
"""

from __future__ import annotations

import argparse
import time

import datasketches as ds
import numpy as np
from _results import save

from laion_dask.ground import sketches as sk

CAPACITY = 4096


def heavy(labels: list[str], parts: list[np.ndarray], truth: np.ndarray) -> dict:
    top = np.argsort(-truth)[:100]
    out = {}
    t = time.perf_counter()
    merged = sk.merge_all([sk.heavy_hitters(labels, c, CAPACITY) for c in parts])
    seconds = time.perf_counter() - t
    worst = max(int(truth[i]) - merged["counts"].get(labels[i], 0) for i in top)
    out["ours_misra_gries"] = {"seconds": round(seconds, 2), "bound": merged["error"]}
    out["ours_misra_gries"]["top100_max_error"] = worst
    for lg in (12, 13):
        t = time.perf_counter()
        blobs = []
        for c in parts:
            f = ds.frequent_strings_sketch(lg)
            nz = np.flatnonzero(c)
            for i, w in zip(nz.tolist(), c[nz].tolist(), strict=True):
                f.update(labels[i], w)
            blobs.append(f.serialize())  # what a Dask task would return
        acc = ds.frequent_strings_sketch.deserialize(blobs[0])
        for b in blobs[1:]:
            acc.merge(ds.frequent_strings_sketch.deserialize(b))
        seconds = time.perf_counter() - t
        worst = max(abs(int(truth[i]) - acc.get_estimate(labels[i])) for i in top)
        out[f"datasketches_frequent_lg{lg}"] = {
            "seconds": round(seconds, 2),
            "bound": int(acc.get_upper_bound("\x00 not a name")),
            "top100_max_error": int(worst),
        }
    return out


def distinct(labels: list[str], parts: list[np.ndarray], truth: np.ndarray) -> dict:
    true = int((truth > 0).sum())
    present = [[labels[i] for i in np.flatnonzero(c)] for c in parts]
    t = time.perf_counter()
    est, _ = sk.distinct_estimate(sk.merge_all([sk.distinct_sketch(p, 4096) for p in present]))
    out = {"true": true, "ours_theta_k4096": _err(est, true, time.perf_counter() - t)}
    t = time.perf_counter()
    union = ds.hll_union(12)
    for p in present:
        h = ds.hll_sketch(12)
        for label in p:
            h.update(label)
        union.update(ds.hll_sketch.deserialize(h.serialize_compact()))
    est = union.get_result().get_estimate()
    out["datasketches_hll_lg12"] = _err(est, true, time.perf_counter() - t)
    return out


def _err(est: float, true: int, seconds: float) -> dict:
    return {
        "seconds": round(seconds, 2),
        "estimate": round(est),
        "rel_error": abs(est - true) / true,
    }


def quantile_error(rows: int, rng: np.random.Generator) -> dict:
    x = np.clip(rng.normal(0.3, 0.05, rows), -1, 1).astype("float32")
    spec = sk.HistSpec(-1.0, 1.0, 2000)
    qs = np.linspace(0.01, 0.99, 99)
    exact = np.sort(x)
    t = time.perf_counter()
    hist = sk.histogram(x, spec)
    ours = np.asarray(sk.quantiles(hist, spec, qs.tolist()))
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    kll = ds.kll_floats_sketch(200)
    kll.update(x)
    theirs = np.asarray([kll.get_quantile(q) for q in qs])
    t_kll = time.perf_counter() - t

    def rank_error(values: np.ndarray) -> float:
        return float(np.max(np.abs(np.searchsorted(exact, values) / rows - qs)))

    return {
        "ours_histogram_2000_bins": {"seconds": round(t_ours, 2), "rank_error": rank_error(ours)},
        "ours_value_error": float(np.max(np.abs(ours - exact[np.ceil(qs * rows).astype(int) - 1]))),
        "datasketches_kll_k200": {"seconds": round(t_kll, 2), "rank_error": rank_error(theirs)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--names", type=int, default=1_000_000)
    ap.add_argument("--parts", type=int, default=50)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, args.names + 1) ** 1.1
    codes = rng.choice(args.names, size=args.rows, p=p / p.sum())
    labels = [f"d{i}.example" for i in range(args.names)]
    truth = np.bincount(codes, minlength=args.names)
    parts = [np.bincount(c, minlength=args.names) for c in np.array_split(codes, args.parts)]
    figures = {
        "rows": args.rows,
        "names": args.names,
        "parts": args.parts,
        "heavy_hitters": heavy(labels, parts, truth),
        "distinct": distinct(labels, parts, truth),
        "quantiles": quantile_error(args.rows, rng),
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    save(
        "sketches",
        figures=figures,
        summary="ground/sketches.py against Apache DataSketches on Zipf(1.1) domain counts",
    )


if __name__ == "__main__":
    main()
