"""Serving a Panel face from the command line: the flags, the logging level, the server.

Shared by ``laion-dask dashboard`` (:mod:`laion_dask.faces.dashboard`) and
``laion-dask search --serve`` (:mod:`laion_dask.faces.search_page`): :func:`face_parser` and
:func:`serve_main` are their ``main``; the CLI takes :func:`log_level` from here too.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["face_parser", "free_port", "log_level", "serve", "serve_main", "set_log_level"]


def free_port(address: str) -> int:
    """A TCP port free on ``address`` now (``--port 0``)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def log_level(verbose: int, quiet: bool = False) -> int:
    """The level of ``-q`` / no flag / ``-v`` / ``-vv``: errors only, warnings, info, debug."""
    return (
        logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    )


def set_log_level(verbose: int, quiet: bool) -> None:
    """``-q`` / ``-v`` / ``-vv`` for a served face (:func:`log_level`).

    The CLI configured logging at WARNING before passing the arguments on; this moves the level
    (the library's loggers and the root's handlers) without adding handlers of its own.
    """
    level = log_level(verbose, quiet)
    logging.getLogger().setLevel(level)
    logging.getLogger("laion_dask").setLevel(level)
    # Bokeh's server logs every websocket open/close at INFO: only with -vv
    logging.getLogger("bokeh").setLevel(
        max(level, logging.INFO if verbose >= 2 else logging.WARNING)
    )


def serve(build: Callable[[], Any], args: argparse.Namespace, *, title: str) -> None:
    """Serve the layout ``build()`` returns (one per session) until interrupted.

    ``args`` holds the flags of :func:`face_parser`. ``localhost`` is allowed as a websocket
    origin beside a loopback/any address.
    """
    # heavy (seconds to import): the CLI imports this module for log_level before any command
    import panel as pn

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


def face_parser(
    prog: str, description: str, *, run_help: str, port: int
) -> argparse.ArgumentParser:
    """A served face's arguments: the run, where to listen, whether to open a browser, logging."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("run", help=run_help)
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
    return parser


def serve_main(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    open_app: Callable[[argparse.Namespace], Callable[[], Any]],
    *,
    title: str,
) -> int:
    """A served face's ``main``: parse ``argv``, set the logging level, open, serve.

    ``open_app(args)`` reads what the face shows and returns its layout builder (called once
    per session). What it raises as ``OSError`` or ``ValueError`` (no run, no index, a broken
    thresholds file, a bad flag) is one line on stderr and exit 2, before anything is served.
    Returns 0 when the server stops.
    """
    args = parser.parse_args(argv)
    set_log_level(args.verbose, args.quiet)
    try:
        build = open_app(args)
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 2
    serve(build, args, title=title)
    return 0
