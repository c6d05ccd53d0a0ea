"""Near-duplicate groups as a column: ``RUN/neardup`` joined onto a frame by ``key``.

:func:`laion_dask.products.knn.find_near_duplicates` writes ``RUN/neardup/part-NNNNN.parquet``
(``key``, ``duplicate_group``, ``canonical_key``, ``near_duplicate``, group members only);
this module reads it back. It is the join side only, so materialize, explore and the report
take the ``near_duplicate`` drop reason from here without importing the index code (faiss).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from laion_dask.ground import schema
from laion_dask.orchestration.rundir import RunDir

__all__ = [
    "NEARDUP_DIR",
    "DUPLICATE_GROUP",
    "CANONICAL_KEY",
    "NEAR_DUPLICATE",
    "NEAR_DUPLICATE_REASON",
    "StaleNearDuplicates",
    "read_near_duplicates",
    "add_near_duplicate",
    "join_part_near_duplicates",
]

NEARDUP_DIR = "neardup"
DUPLICATE_GROUP = "duplicate_group"  # int64: index id of the group's canonical image
CANONICAL_KEY = "canonical_key"  # the canonical image's key
NEAR_DUPLICATE = "near_duplicate"  # True for every member of a group but its canonical one
#: the drop reason a near-duplicate gets (see the module docstring of filters for the order)
NEAR_DUPLICATE_REASON = "near_duplicate"
_DTYPES = {
    schema.KEY: "string",
    DUPLICATE_GROUP: "int64",
    CANONICAL_KEY: "string",
    NEAR_DUPLICATE: "bool",
}


class StaleNearDuplicates(ValueError):
    """``RUN/index`` or ``RUN/neardup`` was computed from scores that have changed since."""


def _scores_fingerprint(run: RunDir, part: int) -> str:
    """The fingerprint of scores part ``part`` (``""`` without a marker)."""
    return str((run.done_marker("scores", part) or {}).get("fingerprint", ""))


def read_near_duplicates(run: RunDir | str) -> pd.DataFrame:
    """All group members of ``RUN/neardup`` (``key, duplicate_group, canonical_key,
    near_duplicate``); an empty frame when none were written."""
    run = RunDir(run) if isinstance(run, str | Path) else run
    frames = [run.read_parquet(p) for p in run.parts(NEARDUP_DIR)]
    return pd.concat(frames, ignore_index=True) if frames else schema.empty(_DTYPES)


def add_near_duplicate(df: pd.DataFrame, neardup: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``duplicate_group`` (Int64, <NA> outside groups) and ``near_duplicate``
    (bool, True for every group member but its canonical) joined by ``key``; rows unchanged.

    ``neardup`` is :func:`read_near_duplicates` (whole run) or one part of ``RUN/neardup``
    (a partition joins the part with its own number: groups never move rows across parts).
    """
    lookup = neardup.drop_duplicates(schema.KEY)
    lookup = lookup.set_index(lookup[schema.KEY].astype("string"))
    keys = df[schema.KEY].astype("string")
    group = lookup[DUPLICATE_GROUP].astype("Int64").reindex(keys)
    flag = lookup[NEAR_DUPLICATE].astype(bool).reindex(keys, fill_value=False)
    # positional (.array / numpy): the looked-up rows are indexed by key, not by df's index
    return df.assign(**{DUPLICATE_GROUP: group.array, NEAR_DUPLICATE: flag.to_numpy(bool)})


def join_part_near_duplicates(run: RunDir, part: int, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (scores part ``part``) joined with ``RUN/neardup`` part ``part`` when
    ``find_near_duplicates`` wrote it (:func:`add_near_duplicate`); unchanged otherwise.

    What ``materialize``, ``explore`` and ``report`` call per partition, so a run's
    near-duplicates become the ``near_duplicate`` drop reason everywhere at once.

    Raises
    ------
    StaleNearDuplicates
        The part was re-scored after the groups were found: its keys may now name other
        images, so the groups would drop the wrong rows. Re-run
        ``laion-dask index RUN --near-duplicates`` (or delete ``RUN/neardup``).
    """
    path = run.part_path(NEARDUP_DIR, part)
    if schema.KEY not in df.columns or not run.exists(path):
        return df
    marker = run.done_marker(NEARDUP_DIR, part) or {}
    recorded = marker.get("scores_fingerprint")
    if recorded is not None and recorded != _scores_fingerprint(run, part):
        raise StaleNearDuplicates(
            f"{run.path}: near-duplicate groups of part {part} were found before it was "
            "re-scored: re-run `laion-dask index RUN --near-duplicates`, or delete RUN/neardup"
        )
    return add_near_duplicate(df, run.read_parquet(path))
