"""The one way products and stages' runners put work on a Dask cluster.

``run_tasks`` submits ``(name, func, args)`` tasks, reports a failure by partition name (or stops
at the first with ``strict``), and shows progress; ``get_client`` finds the client to use.
Products (materialize, report, index) map their per-partition functions through here, so no
module outside ``laion_dask.orchestration`` talks to Dask.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import distributed

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A partition failed and the run is ``strict`` (or every partition failed)."""


def get_client(client: Any | None = None) -> Any:
    """``client`` when given, else the current default client; a clear error when there is none."""
    if client is not None:
        return client
    try:
        return distributed.get_client()
    except ValueError as err:
        raise RuntimeError(
            "no Dask client: pass client=... or create one with "
            "laion_dask.orchestration.cluster.make_client()"
        ) from err


def run_tasks(
    client: Any,
    stage: str,
    tasks: Sequence[tuple[str, Callable[..., Any], tuple]],
    *,
    strict: bool,
    resources: dict | None = None,
    show_progress: bool = False,
    on_done: Callable[[int, int, str], None] | None = None,
) -> tuple[list[Any], dict[str, str]]:
    """Submit ``(name, func, args)`` tasks; return (results, failures by name).

    ``on_done(finished, total, name)`` is called on the calling thread as each task ends
    (succeeded or failed), for progress bars that are not a terminal (e.g. a dashboard).
    """
    if not tasks:
        return [], {}
    futures = {}
    for name, func, args in tasks:
        fut = client.submit(
            func,
            *args,
            key=f"{stage}-{name}-{time.time_ns()}",
            pure=False,
            resources=resources,
            retries=1,
        )
        futures[fut] = name
    if show_progress:
        distributed.progress(list(futures), notebook=False)
    results: list[Any] = []
    failures: dict[str, str] = {}
    # the futures' own client, which need not be the default one
    for finished, fut in enumerate(
        distributed.as_completed(list(futures), loop=client.loop), start=1
    ):
        name = futures[fut]
        try:
            results.append(fut.result())
        except Exception as err:  # noqa: BLE001 - a partition's failure is data, reported by name
            failures[name] = f"{type(err).__name__}: {err}"
            log.error("%s: partition %s failed: %s", stage, name, failures[name])
            if strict:
                for other in futures:
                    other.cancel()
                raise StageError(f"{stage}: partition {name} failed: {failures[name]}") from err
        finally:
            if on_done is not None:
                on_done(finished, len(futures), name)
    return results, failures
