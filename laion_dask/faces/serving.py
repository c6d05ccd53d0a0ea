"""Serving a Panel face from the command line: the flags, the logging level, the server.

Shared by ``laion-dask dashboard`` (:mod:`laion_dask.faces.dashboard`) and
``laion-dask search --serve`` (:mod:`laion_dask.faces.search_page`).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

import panel as pn

__all__ = ["add_serve_arguments", "free_port", "serve", "set_log_level"]


def free_port(address: str) -> int:
    """A TCP port free on ``address`` now (``--port 0``)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def set_log_level(verbose: int, quiet: bool) -> None:
    """``-q`` / ``-v`` / ``-vv`` for a served face: warnings only, info, debug.

    The CLI configured logging at WARNING before passing the arguments on; this moves the level
    (the library's loggers and the root's handlers) without adding handlers of its own.
    """
    level = (
        logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    )
    logging.getLogger().setLevel(level)
    logging.getLogger("laion_dask").setLevel(level)
    # Bokeh's server logs every websocket open/close at INFO: only with -vv
    logging.getLogger("bokeh").setLevel(
        max(level, logging.INFO if verbose >= 2 else logging.WARNING)
    )


def serve(build: Callable[[], Any], args: argparse.Namespace, *, title: str) -> None:
    """Serve the layout ``build()`` returns (one per session) until interrupted.

    ``args`` holds the flags of :func:`add_serve_arguments`. ``localhost`` is allowed as a
    websocket origin beside a loopback/any address.
    """

    def app() -> Any:
        # Panel calls only plain functions and methods as app factories: anything else, a
        # functools.partial included, is rendered as an object (its repr), not as an app
        return build()

    address, show, quiet = args.address, not args.no_show, args.quiet
    port = args.port or free_port(address)
    origins = [f"{address}:{port}"]
    if address in ("127.0.0.1", "0.0.0.0"):
        origins.append(f"localhost:{port}")
    if not quiet:
        print(f"{title} at http://{address}:{port}/", file=sys.stderr)
    pn.serve(
        {"/": app},
        port=port,
        address=address,
        show=show,
        websocket_origin=origins,
        title=title,
        verbose=False,
    )


def add_serve_arguments(parser: argparse.ArgumentParser, *, port: int) -> None:
    """The flags every served face takes: where to listen, whether to open a browser, logging."""
    parser.add_argument(
        "--port", type=int, default=port, help=f"port (default {port}; 0 = a free one)"
    )
    parser.add_argument(
        "--address", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--no-show", action="store_true", help="do not open a browser")
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only; no URL line")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
