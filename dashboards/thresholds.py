"""The threshold dashboard for ``panel serve``.

    panel serve dashboards/thresholds.py --args RUN
    LAION_DASK_RUN=RUN panel serve dashboards/thresholds.py

The app itself is :func:`laion_dask.faces.dashboard.build_dashboard` (also ``laion-dask dashboard
RUN``).
"""

from __future__ import annotations

import os
import sys

from laion_dask.faces.dashboard import build_dashboard

RUN = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LAION_DASK_RUN")
if not RUN:
    raise SystemExit(
        "usage: panel serve dashboards/thresholds.py --args RUN (or set LAION_DASK_RUN=RUN)"
    )

build_dashboard(RUN).servable(title="laion-dask thresholds")
