"""The one way products and stages' runners put work on a Dask cluster.

``run_tasks`` submits ``(name, func, args)`` tasks, reports a failure by partition name (or stops
at the first with ``strict``), and shows progress: distributed's bar on a terminal, plain lines
elsewhere (a log file, CI, a notebook's subprocess), where the bar's ``\\r`` frames every 0.1 s
would pile up; ``get_client`` finds the client to use.
Products (materialize, report, index) map their per-partition functions through here, so no
module outside ``laion_dask.orchestration`` talks to Dask.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

import distributed

log = logging.getLogger(__name__)


#: environment variable: seconds between two progress lines when the output is not a terminal
HEARTBEAT_ENV = "LAION_DASK_PROGRESS_INTERVAL"
HEARTBEAT_SECONDS = 10.0


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
    futures = {
        client.submit(
            func,
            *args,
            key=f"{stage}-{name}-{time.time_ns()}",
            pure=False,
            resources=resources,
            retries=1,
        ): name
        for name, func, args in tasks
    }
    lines = None
    if show_progress and sys.stdout.isatty():
        distributed.progress(list(futures), notebook=False)
    elif show_progress:
        lines = LineProgress(stage, len(futures))
        lines.start()
    results: list[Any] = []
    failures: dict[str, str] = {}
    try:
        # the futures' own client, which need not be the default one
        for finished, fut in enumerate(
            distributed.as_completed(list(futures), loop=client.loop), start=1
        ):
            name = futures[fut]
            try:
                results.append(fut.result())
            except Exception as err:  # noqa: BLE001 - a partition's failure is data, by name
                failures[name] = f"{type(err).__name__}: {err}"
                log.error("%s: partition %s failed: %s", stage, name, failures[name])
                if strict:
                    for other in futures:
                        other.cancel()
                    raise StageError(f"{stage}: partition {name} failed: {failures[name]}") from err
            finally:
                if lines is not None:
                    lines.update(finished, len(failures))
                if on_done is not None:
                    on_done(finished, len(futures), name)
    finally:
        if lines is not None:
            lines.close()
    return results, failures


class LineProgress:
    """Progress as whole lines, for output that is not a terminal.

    A line as the stage starts, one every ``interval`` seconds while it runs (``download:
    12/40 partitions, 31 s``), and one as it ends. ``interval`` defaults to
    ``$LAION_DASK_PROGRESS_INTERVAL``, else 10 s. The heartbeat comes from a thread of its own,
    so a stage whose partitions take minutes still shows it is alive.
    """

    def __init__(
        self,
        stage: str,
        total: int,
        *,
        interval: float | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        if interval is None:
            interval = float(os.environ.get(HEARTBEAT_ENV) or HEARTBEAT_SECONDS)
        if not interval > 0:
            raise ValueError(f"{HEARTBEAT_ENV}: must be a positive number of seconds")
        self.stage, self.total, self.interval = stage, total, interval
        self.stream = stream
        self.finished = self.failed = 0
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"progress-{stage}", daemon=True)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        plural = "" if self.total == 1 else "s"
        self._write(f"started, {self.total} partition{plural}")
        self._thread.start()

    def update(self, finished: int, failed: int = 0) -> None:
        self.finished, self.failed = finished, failed

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        failed = f", {self.failed} failed" if self.failed else ""
        self._write(f"finished {self.finished}/{self.total} partitions{failed} in {{:.0f}} s")

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            failed = f" ({self.failed} failed)" if self.failed else ""
            self._write(f"{self.finished}/{self.total} partitions{failed}, {{:.0f}} s")

    def _write(self, line: str) -> None:
        """One line, prefixed with the stage; ``{}`` in ``line`` becomes the seconds elapsed."""
        line = f"{self.stage}: " + line.format(time.perf_counter() - self._t0)
        stream = self.stream or sys.stdout  # looked up late: pytest and notebooks swap it
        with self._lock:
            stream.write(line + "\n")
            stream.flush()
