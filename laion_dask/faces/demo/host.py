"""A loopback image host for the demo corpus: real HTTP, several addresses, one port.

``ImageHost(root, hosts=3)`` binds ``127.0.0.1``, ``127.0.0.2``, ... ``127.0.0.{hosts}`` (all of
127/8 is loopback on Linux) on one port and serves ``root/host{i}/`` from address ``i``. The base
URLs are ``http://127.0.0.{i+1}:{port}``. The last host (when there are at least 2) answers every
request with ``X-Robots-Tag: noai``. Missing paths are 404; the content type comes from the file
extension, so a text file named ``.jpg`` is served as ``image/jpeg`` (as broken servers do).

With ``port=0`` the first address picks a free port and the others bind the same one; if one of
them cannot, a new port is tried. :func:`serve_demo_corpus` starts a host and generates (or
reuses) a corpus whose URLs point at it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from laion_dask.products.synthetic.corpus import CorpusSpec, generate_corpus, load_corpus_info

__all__ = ["ImageHost", "serve_demo_corpus", "host_address"]

log = logging.getLogger(__name__)

_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}


def host_address(index: int) -> str:
    """Loopback address of host ``index`` (0 -> 127.0.0.1)."""
    if not 0 <= index < 254:
        raise ValueError(f"host index must be in [0, 254), got {index}")
    return f"127.0.0.{index + 1}"


class _Handler(BaseHTTPRequestHandler):
    server_version = "laion-dask-demo/0.1"
    protocol_version = "HTTP/1.1"

    def _resolve(self) -> Path | None:
        root: Path = self.server.root  # type: ignore[attr-defined]
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        path = (root / rel).resolve()
        if not path.is_relative_to(root.resolve()) or not path.is_file():
            return None
        return path

    def _send(self, head_only: bool) -> None:
        path = self._resolve()
        if path is None:
            body = b"<html><body><h1>404 Not Found</h1></body></html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
        else:
            body = path.read_bytes()
            self.send_response(200)
            ctype = _TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
            self.send_header("Content-Type", ctype or "application/octet-stream")
        if self.server.noai:  # type: ignore[attr-defined]
            self.send_header("X-Robots-Tag", "noai")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(head_only=True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], root: Path, noai: bool) -> None:
        super().__init__(address, _Handler)
        self.root = root
        self.noai = noai

    def handle_error(self, request: Any, client_address: Any) -> None:
        # the downloader hangs up on purpose (bodies over the byte cap, deadlines): not an error
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("client %s went away: %s", client_address, exc)
            return
        super().handle_error(request, client_address)


class ImageHost:
    """Serve ``root/host{i}/`` on ``127.0.0.{i+1}:port`` for ``i < hosts``, in background threads.

    Parameters
    ----------
    root
        Folder holding ``host0/``, ``host1/``, ... (``out_dir/images`` of a demo corpus).
    hosts
        Number of loopback addresses to serve.
    port
        Port for every address; 0 picks a free one.
    noai_hosts
        Host indices that send ``X-Robots-Tag: noai``; default: the last host when ``hosts >= 2``.

    Example
    -------
    >>> with ImageHost(tmp / "images") as host:                       # doctest: +SKIP
    ...     host.base_urls
    ['http://127.0.0.1:40123', 'http://127.0.0.2:40123', 'http://127.0.0.3:40123']
    """

    def __init__(
        self,
        root: str | Path,
        *,
        hosts: int = 3,
        port: int = 0,
        noai_hosts: Sequence[int] | None = None,
    ) -> None:
        if hosts < 1:
            raise ValueError(f"hosts must be >= 1, got {hosts}")
        self.root = Path(root)
        self.hosts = hosts
        self.requested_port = port
        self.noai_hosts = (
            tuple(noai_hosts) if noai_hosts is not None else ((hosts - 1,) if hosts >= 2 else ())
        )
        self.port: int | None = None
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    @property
    def base_urls(self) -> list[str]:
        """``http://127.0.0.{i+1}:{port}`` per host; only known once started."""
        if self.port is None:
            raise RuntimeError(
                "ImageHost is not started: call start() or use it as a context manager"
            )
        return [f"http://{host_address(i)}:{self.port}" for i in range(self.hosts)]

    def _bind(self, port: int) -> list[_Server]:
        servers: list[_Server] = []
        try:
            for i in range(self.hosts):
                servers.append(
                    _Server(
                        (host_address(i), port), self.root / f"host{i}", noai=i in self.noai_hosts
                    )
                )
                port = servers[0].server_address[1]
        except OSError:
            for s in servers:
                s.server_close()
            raise
        return servers

    def start(self) -> ImageHost:
        """Bind every address and serve in daemon threads; ``OSError`` if the port is taken."""
        if self._servers:
            return self
        attempts = 1 if self.requested_port else 20
        for attempt in range(attempts):
            try:
                self._servers = self._bind(self.requested_port)
                break
            except OSError:
                # with port=0 another address may already hold the port the first one got
                if attempt == attempts - 1:
                    raise
        self.port = self._servers[0].server_address[1]
        for s in self._servers:
            t = threading.Thread(
                target=s.serve_forever, name=f"image-host-{s.server_address[0]!s}", daemon=True
            )
            t.start()
            self._threads.append(t)
        log.info("image host serving %s on %s", self.root, ", ".join(self.base_urls))
        return self

    def stop(self) -> None:
        """Shut every server down and close its socket."""
        for s in self._servers:
            s.shutdown()
            s.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> ImageHost:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def serve_demo_corpus(
    out_dir: str | Path, spec: Any = None, *, hosts: int = 3
) -> Iterator[tuple[Any, ImageHost]]:
    """Serve the demo corpus in ``out_dir``, generating it first when needed.

    An existing corpus (``corpus.json`` with the same spec) is reused when its recorded port can
    be bound again on every address; otherwise the host starts on a free port and the corpus is
    regenerated so its URLs point there (same pictures and texts, only the URLs change).

    Yields
    ------
    (CorpusInfo, ImageHost)
    """
    spec = spec if spec is not None else CorpusSpec()
    root = Path(out_dir)
    host: ImageHost | None = None
    info = None
    if (root / "corpus.json").is_file():
        try:
            old = load_corpus_info(root)
        except (OSError, KeyError, ValueError, TypeError, json.JSONDecodeError) as err:
            log.warning("unreadable %s (%s): regenerating", root / "corpus.json", err)
            old = None
        if old is not None and old.spec == spec and len(old.base_urls) == hosts:
            port = int(old.base_urls[0].rsplit(":", 1)[1])
            want = [f"http://{host_address(i)}:{port}" for i in range(hosts)]
            if list(old.base_urls) == want:
                try:
                    host = ImageHost(old.images_dir, hosts=hosts, port=port).start()
                    info = old
                except OSError:
                    log.info("port %d is taken: regenerating the demo corpus on a new port", port)
    if host is None:
        if (root / "images").exists():
            shutil.rmtree(root / "images")
        host = ImageHost(root / "images", hosts=hosts).start()
        info = generate_corpus(root, spec, base_urls=host.base_urls)
    try:
        yield info, host
    finally:
        host.stop()
