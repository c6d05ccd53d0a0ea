"""Keyword arguments for LocalClusters in tests."""

from __future__ import annotations

#: in-process workers that talk TCP on 127.0.0.1 only: inproc addresses are built from the
#: machine's outward IP, and the scheduler's HTTP server starts anyway (on a free loopback port)
LOOPBACK_CLUSTER = dict(
    processes=False, protocol="tcp://", host="127.0.0.1", dashboard_address="127.0.0.1:0"
)
