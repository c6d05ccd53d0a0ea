"""Map a per-partition function over items and merge the results: how products (the report,
explore) run on the cluster without touching Dask themselves.

:func:`map_reduce` is a ``dask.bag`` reduction: one bag partition per item, ``func`` mapped
over it, and ``merge`` applied as a tree (``fan_in`` results per merge task, partition order
kept), so per-partition results never travel to the client together, only the merged one.
This replaces the report's own tree of ``client.submit`` calls: Dask's reduction builds the
same tree, retries and cancels as one graph, and runs unchanged on the local threaded scheduler
when there is no cluster (a notebook, a dashboard opening a run).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import dask
import dask.bag as db
import distributed

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["map_reduce"]


def map_reduce(
    func: Callable[[T], R],
    items: Sequence[T],
    merge: Callable[[list[R]], R],
    *,
    client: Any | None = None,
    fan_in: int = 8,
) -> R:
    """``merge([func(item) for item in items])``, computed as a Dask tree reduction.

    Parameters
    ----------
    func
        A module-level function (or a ``functools.partial`` of one) of one item.
    items
        One task per item (at least one).
    merge
        Merges a list of results, in item order, into one result of the same kind; called on
        groups of at most ``fan_in`` results, then on the merged groups, so it must be
        associative (a sum of counts, a concatenation).
    client
        A ``distributed.Client``; None uses the current default client, else Dask's local
        threaded scheduler.
    """
    if not items:
        raise ValueError("map_reduce needs at least one item")
    if fan_in < 2:
        raise ValueError(f"fan_in must be at least 2, got {fan_in}")
    bag = db.from_sequence(list(items), partition_size=1).map(func)
    tree = bag.reduction(functools.partial(_merge_list, merge), merge, split_every=fan_in)
    if client is None:
        try:
            client = distributed.get_client()
        except ValueError:  # no cluster: the same graph on this process's threads (a bag's
            # own default would be processes), unless a scheduler is configured
            return tree.compute(scheduler=dask.config.get("scheduler", None) or "threads")
    return client.compute(tree, retries=1).result()


def _merge_list(merge: Callable[[list[Any]], Any], part: Any) -> Any:
    """One bag partition (an iterator of results) merged into one result."""
    return merge(list(part))
