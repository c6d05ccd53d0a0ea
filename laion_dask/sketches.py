"""Mergeable statistics: fixed-bin histograms, exact counters, bottom-k samples.

Every summary here is a plain dict of ints, floats, lists and dicts, computed from one partition
and merged by :func:`merge` (sums, element-wise sums, min/max, bottom-k), so a report over many
partitions is one pass with a tree reduce of small objects, never a collect of rows.

Histograms use fixed edges (a :class:`HistSpec`), so merging is an element-wise sum and
quantiles come from the merged counts (exact to one bin width). Counters are exact per partition
and merged exactly; at billions of rows a high-cardinality counter (domains) should become a
space-saving / count-min top-k sketch, but at this project's scale exact counts are fine and
make the report's numbers exactly reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["HistSpec", "histogram", "merge", "merge_all", "quantiles", "top_k", "bottom_k"]

#: keys whose values merge by min / max instead of a sum
_MIN_KEYS = {"min"}
_MAX_KEYS = {"max"}
#: key holding bottom-k sample lists (records with a ``prio`` field); its size is ``_K_KEY``
_SAMPLE_KEY = "samples"


@dataclass(frozen=True)
class HistSpec:
    """Fixed histogram edges: ``bins`` bins over ``[lo, hi]``, linear or log-spaced."""

    lo: float
    hi: float
    bins: int
    log: bool = False

    @property
    def edges(self) -> np.ndarray:
        if self.log:
            return np.geomspace(self.lo, self.hi, self.bins + 1)
        return np.linspace(self.lo, self.hi, self.bins + 1)


def histogram(values: np.ndarray, spec: HistSpec) -> dict[str, Any]:
    """One partition's histogram of ``values`` (NaN counted as ``missing``).

    Returns ``counts`` (per bin, ``numpy.histogram`` semantics: the last bin includes ``hi``),
    ``under`` (< lo), ``over`` (> hi), ``missing``, ``n`` (non-missing), ``sum``, ``min``, ``max``.
    """
    v = np.asarray(values, dtype="float64")
    finite = ~np.isnan(v)
    x = v[finite]
    if spec.log:
        counts, _ = np.histogram(x, bins=spec.edges)
    else:  # numpy's equal-width path: same edges (linspace), same counts, no sort
        counts, _ = np.histogram(x, bins=spec.bins, range=(float(spec.lo), float(spec.hi)))
    return {
        "counts": counts.astype("int64").tolist(),
        "under": int((x < spec.lo).sum()),
        "over": int((x > spec.hi).sum()),
        "missing": int((~finite).sum()),
        "n": int(x.size),
        "sum": float(x.sum()),
        "min": float(x.min()) if x.size else None,
        "max": float(x.max()) if x.size else None,
    }


def _merge_value(key: str | None, a: Any, b: Any, k: int) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if key in _MIN_KEYS:
        return min(a, b)
    if key in _MAX_KEYS:
        return max(a, b)
    if isinstance(a, Mapping):
        return {
            kk: _merge_value(kk if key != _SAMPLE_KEY else _SAMPLE_KEY, a.get(kk), b.get(kk), k)
            for kk in {**a, **b}
        }
    if key == _SAMPLE_KEY and isinstance(a, list):
        return bottom_k([*a, *b], k)
    if isinstance(a, list):
        if len(a) != len(b):
            raise ValueError(f"cannot merge lists of length {len(a)} and {len(b)} at {key!r}")
        return [x + y for x, y in zip(a, b, strict=True)]
    if isinstance(a, (int, float)):
        return a + b
    if a == b:  # constants (edges, cut-offs) carried along
        return a
    raise ValueError(f"cannot merge {a!r} and {b!r} at {key!r}")


def merge(a: Mapping[str, Any], b: Mapping[str, Any], k: int = 8) -> dict[str, Any]:
    """Merge two summaries: numbers add, lists add element-wise, ``min``/``max`` keys take the
    min/max, lists under a ``samples`` key keep the ``k`` records with the smallest ``prio``."""
    return _merge_value(None, dict(a), dict(b), k)


def merge_all(summaries: Iterable[Mapping[str, Any]], k: int = 8) -> dict[str, Any]:
    """Merge any number of summaries (a tree reduce calls this on small batches)."""
    out: dict[str, Any] = {}
    for s in summaries:
        out = merge(out, s, k) if out else dict(s)
    return out


def bottom_k(records: Sequence[Mapping[str, Any]], k: int) -> list[dict[str, Any]]:
    """The ``k`` records with the smallest ``(prio, key)``: a mergeable deterministic sample."""
    return [dict(r) for r in sorted(records, key=lambda r: (r["prio"], str(r.get("key"))))[:k]]


def top_k(counts: Mapping[str, int], k: int) -> tuple[list[list[Any]], int]:
    """The ``k`` largest ``[name, count]`` (ties by name) and the sum of the rest."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [[name, int(n)] for name, n in items[:k]], int(sum(n for _, n in items[k:]))


def quantiles(hist: Mapping[str, Any], spec: HistSpec, qs: Sequence[float]) -> list[float | None]:
    """Quantiles from a merged histogram: linear within a bin; under/overflow map to min/max."""
    n = hist["n"]
    if not n:
        return [None for _ in qs]
    edges = spec.edges
    counts = np.asarray(hist["counts"], dtype="float64")
    cum = np.concatenate([[hist["under"]], hist["under"] + np.cumsum(counts)])
    out: list[float | None] = []
    for q in qs:
        target = q * n
        if target <= hist["under"] and hist["under"]:
            out.append(float(hist["min"]))
            continue
        if target > cum[-1]:
            out.append(float(hist["max"]))
            continue
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(max(i, 1), len(edges) - 1)
        lo_c, hi_c = cum[i - 1], cum[i]
        frac = 0.0 if hi_c == lo_c else (target - lo_c) / (hi_c - lo_c)
        val = edges[i - 1] + frac * (edges[i] - edges[i - 1])
        val = min(max(val, hist["min"]), hist["max"])
        out.append(float(val))
    return out
