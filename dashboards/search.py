"""The search page for ``panel serve``.

    panel serve dashboards/search.py --args RUN
    LAION_DASK_RUN=RUN panel serve dashboards/search.py

The app itself is :func:`laion_dask.faces.search_page.build_search_page` (also
``laion-dask search RUN --serve``); the run needs an index (``laion-dask index RUN``).
"""

from __future__ import annotations

import os
import sys

from laion_dask.faces.search_page import build_search_page

RUN = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LAION_DASK_RUN")
if not RUN:
    raise SystemExit(
        "usage: panel serve dashboards/search.py --args RUN (or set LAION_DASK_RUN=RUN)"
    )

build_search_page(RUN).servable(title="laion-dask search")
