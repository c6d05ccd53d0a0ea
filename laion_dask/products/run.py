"""The whole run: extract -> download -> score -> materialize, resumable, from one config.

It sits with the products because its last step,
:func:`~laion_dask.products.materialize.materialize`, is one; the first three are
:mod:`laion_dask.orchestration.pipeline`'s stage runners.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from laion_dask.ground.config import PipelineConfig
from laion_dask.orchestration.pipeline import (
    STAGE_ORDER,
    ConfigChanged,
    check_config_changes,
    run_download,
    run_extract,
    run_score,
)
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.materialize import materialize
from laion_dask.stages.consent import load_lists

__all__ = ["STAGE_ORDER", "run_pipeline"]


def run_pipeline(
    run: RunDir,
    cfg: PipelineConfig,
    *,
    client: Any | None = None,
    stages: Iterable[str] = STAGE_ORDER,
    thresholds: Any | None = None,
    show_progress: bool = False,
    force: bool = False,
) -> list[Any]:
    """Run the named stages in order; returns their reports.

    Re-running into the same ``run`` resumes it: finished partitions are skipped. A config that
    would change a stage's finished partitions raises :class:`ConfigChanged` (a
    :class:`~laion_dask.ground.config.ConfigError` naming the stage and the ``section.key`` values)
    before any stage runs, unless ``force``: then those partitions, and everything downstream of
    them, are recomputed.
    """
    stages = list(stages)
    unknown = set(stages) - set(STAGE_ORDER)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; known: {STAGE_ORDER}")
    if "download" in stages:
        load_lists(cfg.consent)  # a missing or malformed list is a ConfigError before any work
    if not force:
        for stage, changes in check_config_changes(run, cfg, stages).items():
            raise ConfigChanged(stage, changes)
    run.write_config(cfg)
    reports: list[Any] = []
    kw = {"client": client, "show_progress": show_progress, "force": force}
    if "extract" in stages:
        reports.append(run_extract(run, cfg, **kw))
    if "download" in stages:
        reports.append(run_download(run, cfg, **kw))
    if "score" in stages:
        reports.append(run_score(run, cfg, **kw))
    if "materialize" in stages:
        reports.append(materialize(run, thresholds or cfg.filters, client=client))
    return reports
