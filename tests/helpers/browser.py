"""A real Panel server on loopback and Debian's headless Chromium driven by Playwright.

Never ``playwright install``: the browser is ``/usr/bin/chromium`` (``apt-get install chromium``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

CHROMIUM = os.environ.get("LAION_DASK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def browser_skip_reason() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; never 'playwright install')"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def panel_server(app: Callable[[], Any], *, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` (a function returning a Panel viewable) with ``pn.serve`` in a thread.

    Yields the URL; stops the server on exit.
    """
    import panel as pn

    port = free_port(host)
    server = pn.serve(
        {"/": app},
        port=port,
        address=host,
        websocket_origin=[f"{host}:{port}"],
        show=False,
        threaded=True,
        start=True,
    )
    url = f"http://{host}:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((host, port), timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        server.stop()
        server.join(timeout=10)


@contextlib.contextmanager
def chromium_page() -> Iterator[tuple[Any, list[str]]]:
    """A headless Chromium page and the list its console errors and page errors go to."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on(
                "console",
                lambda msg: (
                    errors.append(f"console {msg.type}: {msg.text}")
                    if msg.type == "error"
                    else None
                ),
            )
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            yield page, errors
        finally:
            browser.close()


#: JavaScript: set the value of the Bokeh widget whose title is ``arg.title`` (returns found);
#: ``value_throttled`` too (a released drag) unless ``arg.release`` is false (still dragging)
SET_WIDGET_JS = """
(arg) => {
  for (const doc of Bokeh.documents) {
    for (const m of doc.all_models) {
      if (m.title === arg.title && 'value' in m) {
        m.value = arg.value;
        if (arg.release !== false && 'value_throttled' in m) { m.value_throttled = arg.value; }
        return true;
      }
    }
  }
  return false;
}
"""
