"""Page-level opt-out signals: robots-style ``<meta>`` directives and TDMRep's reservation.

Extraction records what a page says about itself, not what to do about it: the sorted robots
directives of its ``<meta name=...>`` tags whose name is one of ``[consent].meta_names``
(``robots`` and crawler-specific names such as ``googlebot``) in ``page_robots``, and whether it
carries ``<meta name="tdm-reservation" content="1">`` (W3C TDMRep) in ``page_tdm``. The rules stage
turns those facts into drop reasons under the run's ``[consent]`` policy
(:func:`laion_dask.stages.rules.add_drop_reason`), so a changed policy never needs a re-parse to be
understood, and the facts stay in the candidates for the report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["page_signals", "NO_SIGNALS"]

_SPLIT = re.compile(r"[\s,;]+")
#: what a page without any robots or TDMRep meta gives
NO_SIGNALS: tuple[str | None, bool] = (None, False)


def page_signals(
    metas: Iterable[tuple[Any, Any]], names: frozenset[str]
) -> tuple[str | None, bool]:
    """``(robots, tdm)`` of one page from its ``(name, content)`` meta pairs.

    Parameters
    ----------
    metas
        ``(name, content)`` of each ``<meta>``; values that are not strings are ignored (a WAT
        may hold anything there).
    names
        Lower-case meta names read as robots directives.

    Returns
    -------
    (robots, tdm)
        ``robots``: the directives of matching metas, lower case, unique, sorted and joined by
        ``,`` (``None`` when there are none); ``tdm``: a ``tdm-reservation`` meta says ``1``.

    Examples
    --------
    >>> page_signals([("Robots", "NoAI, noimageai"), ("description", "x")], frozenset({"robots"}))
    ('noai,noimageai', False)
    >>> page_signals([("tdm-reservation", " 1 ")], frozenset({"robots"}))
    (None, True)
    """
    directives: set[str] = set()
    tdm = False
    for name, content in metas:
        if not isinstance(name, str) or not isinstance(content, str):
            continue
        key = name.strip().lower()
        if key == "tdm-reservation":
            tdm = tdm or content.strip() == "1"
        elif key in names:
            directives.update(t for t in _SPLIT.split(content.strip().lower()) if t)
    if not directives:  # nearly every page: no sort, no join (0.1 s of a 100 MB WAT)
        return None, tdm
    return ",".join(sorted(directives)), tdm
