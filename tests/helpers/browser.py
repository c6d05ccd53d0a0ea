"""Real servers on loopback and Debian's headless Chromium driven by Playwright.

Never ``playwright install``: the browser is ``/usr/bin/chromium`` (``apt-get install chromium``).

The API, for every browser test of the project:

- :func:`browser_skip_reason` -- why Chromium or Playwright is missing (``pytest.skip`` it), or None
- :func:`served` -- run a server command (what a user types) in a subprocess on a free port;
  yields its URL once it answers HTTP, and always terminates (then kills) it
- :func:`panel_server` -- serve an app function in a thread of this process (logic tests)
- :func:`chromium_page` -- a headless page plus the list its console/page errors go to
- :func:`drawn_colours` -- how many distinct colours a screenshot has (1 = a blank canvas)
- :func:`boxes_overlap` -- whether two elements' bounding boxes intersect on the page
- :func:`has_colour` -- whether a screenshot holds a colour (a plot's glyphs were drawn)
- :data:`SET_WIDGET_JS` -- set a Bokeh widget's value by its title, as a drag would
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

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


class ServerFailed(AssertionError):
    """The server command exited or never answered; the message ends with its output."""


@contextlib.contextmanager
def served(
    cmd: Sequence[str],
    port: int,
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path = REPO,
    path: str = "/",
    timeout: float = 120.0,
) -> Iterator[str]:
    """Run ``cmd`` (a server listening on 127.0.0.1:``port``) until the block ends.

    Yields ``http://127.0.0.1:PORT{path}`` once a GET of it answers 200. Raises
    :class:`ServerFailed` with the server's output if it exits first or does not answer within
    ``timeout`` seconds. On exit the process group gets SIGTERM, then SIGKILL after 15 s, so
    nothing it started outlives the test. Output goes to a temporary file, never a pipe (a full
    pipe would block a chatty server).
    """
    url = f"http://127.0.0.1:{port}{path}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            list(cmd),
            cwd=str(cwd),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as one below
        )

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-4000:]

        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise ServerFailed(f"{cmd[0]} exited with {proc.returncode}:\n{output()}")
                try:
                    with urllib.request.urlopen(url, timeout=10) as resp:
                        if resp.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise ServerFailed(f"no answer at {url} in {timeout:.0f} s:\n{output()}")
                time.sleep(0.3)
            yield url
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        proc.wait(timeout=15)


def drawn_colours(png: bytes, *, tolerance: int = 8) -> int:
    """Distinct colours in a PNG screenshot, after rounding away anti-aliasing noise.

    A canvas Bokeh never drew is one flat colour (1); a drawn plot has axes, glyphs and text.
    """
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    step = max(1, tolerance)
    quantised = img.point(lambda v: (v // step) * step)
    return len(quantised.getcolors(maxcolors=1 << 24) or [])


def has_colour(
    png: bytes, rgb: tuple[int, int, int], *, tolerance: int = 24, min_pixels: int = 20
) -> bool:
    """Whether at least ``min_pixels`` pixels of a PNG are within ``tolerance`` of ``rgb``."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    close = (np.abs(arr - np.asarray(rgb, dtype=np.int16)) <= tolerance).all(axis=-1)
    return int(close.sum()) >= min_pixels


def boxes_overlap(a: dict[str, float] | None, b: dict[str, float] | None) -> bool:
    """Whether two Playwright ``bounding_box()`` results intersect (touching edges do not)."""
    if a is None or b is None:
        raise AssertionError("an element is not rendered (no bounding box)")
    return not (
        a["x"] + a["width"] <= b["x"]
        or b["x"] + b["width"] <= a["x"]
        or a["y"] + a["height"] <= b["y"]
        or b["y"] + b["height"] <= a["y"]
    )


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
