"""A real loopback HTTP image server for the download tests (ThreadingHTTPServer in a thread).

Routes (GET):
  /img/NAME                 bytes registered with ``host.add(NAME, data, content_type, headers)``
  /status/CODE              an empty response with that status
  /flaky/TOKEN              500 the first time per TOKEN, then the ``jpeg`` image
  /ratelimit/TOKEN?after=S  429 with ``Retry-After: S`` the first time per TOKEN, then ``jpeg``
  /hold/ANY?s=S             sleeps S seconds, then ``jpeg``; tracks requests served at once
  /slow-first-byte?s=S      sleeps S seconds before the status line
  /trickle                  Content-Length 200000, then 100 bytes every 0.1 s
  /truncated                Content-Length 60000, sends 10000 bytes of a JPEG and closes
  /big?n=N                  N bytes without Content-Length (read until close)
  /big-declared?n=N         Content-Length N, sends it
  /redirect?to=URL          302 to URL (any scheme)
  /loop                     302 to itself
  /robots?tag=VALUE         the ``jpeg`` image with ``X-Robots-Tag: VALUE``
  any exact path set with ``host.serve(path, body, status, ...)`` (checked first): e.g. the
  host files ``/robots.txt`` and ``/.well-known/tdmrep.json`` (404 until served, as on most hosts),
  with an optional delay before the answer (for timeouts)
Every request is logged in ``host.requests`` as ``(path, monotonic_time, headers)``, and bytes a
route managed to send before the client hung up in ``host.sent``.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

#: paths a consent-checking downloader asks each host for before its images
HOST_FILES = ("/robots.txt", "/.well-known/tdmrep.json")


def noise_image(width: int, height: int, fmt: str, *, seed: int = 0, **save: object) -> bytes:
    """A smooth gradient plus noise, so it compresses like a photo and stays over 5 KB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], axis=-1)
    arr = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(arr, "RGB").save(out, fmt, **save)
    return out.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        return None

    def _send(
        self, code: int, body: bytes = b"", ctype: str = "image/jpeg", **headers: str
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def _first(self, token: str) -> bool:
        with self.server.lock:
            first = token not in self.server.seen
            self.server.seen.add(token)
            return first

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        host = self.server
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        with host.lock:
            host.requests.append((path, time.monotonic(), dict(self.headers)))
        jpeg = host.files["jpeg"][0]
        try:
            fixed = host.fixed.get(path)
            if fixed is not None:
                code, body, ctype, extra, delay = fixed
                if delay:
                    time.sleep(delay)
                self._send(code, body, ctype, **extra)
            elif path.startswith("/img/"):
                data, ctype, extra = host.files[path[5:]]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            elif path.startswith("/status/"):
                self._send(int(path[8:]), b"", "text/plain")
            elif path.startswith("/flaky/"):
                if self._first(path):
                    self._send(500, b"oops", "text/plain")
                else:
                    self._send(200, jpeg)
            elif path.startswith("/ratelimit/"):
                if self._first(path):
                    self._send(429, b"slow down", "text/plain", Retry_After=query.get("after", "1"))
                else:
                    self._send(200, jpeg)
            elif path.startswith("/hold/"):
                with host.lock:
                    host.active += 1
                    host.max_active = max(host.max_active, host.active)
                try:
                    time.sleep(float(query.get("s", "0.2")))
                finally:
                    with host.lock:
                        host.active -= 1
                self._send(200, jpeg)
            elif path == "/slow-first-byte":
                time.sleep(float(query.get("s", "2")))
                self._send(200, jpeg)
            elif path == "/trickle":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "200000")
                self.end_headers()
                self._stream(jpeg[:100] * 2000, 100, 0.1, path)
            elif path == "/truncated":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "60000")
                self.end_headers()
                self.wfile.write(jpeg[:10000])
                self.wfile.flush()
                self.close_connection = True
            elif path in ("/big", "/big-declared"):
                n = int(query.get("n", "1000000"))
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                if path == "/big-declared":
                    self.send_header("Content-Length", str(n))
                self.end_headers()
                self._stream(b"\xff" * n, 65536, 0.0, path)
            elif path == "/redirect":
                self._send(302, b"", "text/plain", Location=query["to"])
            elif path == "/loop":
                self._send(302, b"", "text/plain", Location="/loop")
            elif path == "/robots":
                self._send(200, jpeg, X_Robots_Tag=query["tag"])
            else:
                self._send(404, b"no such route", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up, as the downloader does on purpose for some routes

    def _stream(self, data: bytes, step: int, pause: float, path: str) -> None:
        sent = 0
        try:
            for i in range(0, len(data), step):
                self.wfile.write(data[i : i + step])
                self.wfile.flush()
                sent += len(data[i : i + step])
                if pause:
                    time.sleep(pause)
        finally:
            with self.server.lock:
                self.server.sent[path] = sent
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: the default 5 drops SYNs under concurrent tests

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.seen: set[str] = set()
        self.requests: list[tuple[str, float, dict[str, str]]] = []
        self.sent: dict[str, int] = {}
        self.files: dict[str, tuple[bytes, str, Mapping[str, str]]] = {}
        # exact path -> (status, body, content type, headers, delay in seconds)
        self.fixed: dict[str, tuple[int, bytes, str, dict[str, str], float]] = {}
        self.active = 0  # requests to /hold/ being served right now
        self.max_active = 0


class ImageHost:
    """Handle to a running server: ``url(path)``, ``add(...)``, request log."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self.port = server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(
        self,
        name: str,
        data: bytes,
        ctype: str = "image/jpeg",
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Serve ``data`` at ``/img/NAME``; returns its URL."""
        self._server.files[name] = (data, ctype, dict(headers or {}))
        return self.url(f"/img/{name}")

    def serve(
        self,
        path: str,
        body: bytes | str = b"",
        status: int = 200,
        ctype: str = "text/plain",
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> str:
        """Answer GET ``path`` (exact, query ignored) with this response; returns its URL."""
        data = body.encode("utf-8") if isinstance(body, str) else body
        with self._server.lock:
            self._server.fixed[path] = (status, data, ctype, dict(headers or {}), delay)
        return self.url(path)

    def unserve(self, path: str) -> None:
        """Forget a path set with :meth:`serve` (it answers 404 again)."""
        with self._server.lock:
            self._server.fixed.pop(path, None)

    def content_requests(self) -> list[str]:
        """Paths requested, without the host files (robots.txt, tdmrep.json)."""
        return [p for p, _, _ in self.requests if p not in HOST_FILES]

    @property
    def requests(self) -> list[tuple[str, float, dict[str, str]]]:
        with self._server.lock:
            return list(self._server.requests)

    @property
    def sent(self) -> dict[str, int]:
        with self._server.lock:
            return dict(self._server.sent)

    def reset_max_active(self) -> None:
        with self._server.lock:
            self._server.max_active = 0

    @property
    def max_active(self) -> int:
        """Most /hold/ requests served at once since the last reset."""
        with self._server.lock:
            return self._server.max_active

    def hits(self, path: str) -> list[float]:
        """Times at which ``path`` was requested."""
        return [t for p, t, _ in self.requests if p == path]


@contextmanager
def serve_images() -> Iterator[ImageHost]:
    """Start the server on a free loopback port; stop it (and close its socket) on exit."""
    server = _Server()
    server.files["jpeg"] = (noise_image(320, 240, "JPEG", quality=90), "image/jpeg", {})
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield ImageHost(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
