"""The download stage against a real loopback HTTP server (tests/helpers/imagehost.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pytest
from PIL import Image

from laion_dask.ground import schema
from laion_dask.ground.config import DownloadConfig
from laion_dask.stages import netguard
from laion_dask.stages.download import (
    download_images,
    download_stats,
    is_transient,
    robots_disallowed,
)
from tests.helpers.imagehost import ImageHost, noise_image, serve_images

# small timeouts: no test waits more than a couple of seconds on a real timeout
FAST = DownloadConfig(
    allow_private_networks=True,
    connect_timeout=1.0,
    read_timeout=0.75,
    deadline=2.0,
    retries=2,
    retry_backoff=0.05,
    max_retry_after=2.0,
    max_bytes=1_000_000,
)


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    with serve_images() as h:
        yield h


@pytest.fixture(scope="module")
def other_host() -> Iterator[ImageHost]:
    with serve_images() as h:
        yield h


def _frame(urls: list[str], drop: list[str | None] | None = None) -> pd.DataFrame:
    n = len(urls)
    return pd.DataFrame(
        {
            schema.UID: pd.array([f"u{i}" for i in range(n)], dtype="string"),
            schema.URL: pd.array(urls, dtype="string"),
            schema.TEXT: pd.array([f"caption {i}" for i in range(n)], dtype="string"),
            schema.DROP_REASON: pd.array(drop or [None] * n, dtype="string"),
        }
    )


def _animated_gif() -> bytes:
    frames = [
        Image.open(io.BytesIO(noise_image(200, 150, "PNG", seed=s))).convert("P") for s in range(3)
    ]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _huge_png_header() -> bytes:
    """A 6 KB PNG whose header claims 10000 x 10000 pixels (1e8, over max_pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    return _pad(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat))


def _pad(data: bytes, size: int = 6000) -> bytes:
    """Trailing bytes after the image's end marker: still the same image, now over min_bytes."""
    return data + b"\0" * max(0, size - len(data))


def test_every_route_ends_with_the_right_status(host: ImageHost, corpus: Path) -> None:
    pillow = corpus / "python-pillow-Pillow"
    jpeg = noise_image(640, 480, "JPEG", seed=1, quality=90)
    anim = _animated_gif()
    cases = {
        host.add("a.jpg", jpeg): ("success", 200),
        host.add("a.png", noise_image(300, 200, "PNG", seed=2), "image/png"): ("success", 200),
        host.add("a.webp", noise_image(300, 200, "WEBP", seed=3, quality=90), "image/webp"): (
            "success",
            200,
        ),
        host.add("a.gif", anim, "image/gif"): ("unsupported_format", 200),  # GIF not allowed
        host.url("/status/404"): ("failed_to_download", 404),
        host.url("/status/403"): ("failed_to_download", 403),
        host.url("/flaky/route-table"): ("success", 200),  # 500, then 200 on retry
        host.url("/slow-first-byte?s=2"): ("failed_to_download", None),
        host.url("/trickle"): ("failed_to_download", 200),
        host.url("/truncated"): ("failed_to_download", 200),
        host.url("/big?n=30000000"): ("too_large", 200),
        host.url("/big-declared?n=30000000"): ("too_large", 200),
        host.add("bomb.gif", _pad((pillow / "decompression_bomb.gif").read_bytes()), "image/gif"): (
            "too_large",
            200,
        ),
        host.add("huge.png", _huge_png_header(), "image/png"): ("too_large", 200),
        host.add("page.jpg", b"<html><body>not an image</body></html>" * 200): (
            "failed_to_decode",
            200,
        ),
        host.add("tiny.jpg", noise_image(16, 16, "JPEG", seed=4)): ("too_small", 200),
        host.url("/loop"): ("failed_to_download", 302),
        host.url("/redirect?to=data:image/png;base64,iVBORw0KGgo="): ("failed_to_download", 302),
        host.url("/redirect?to=ftp://127.0.0.1/a.jpg"): ("failed_to_download", 302),
        host.url("/redirect?to=/img/a.jpg"): ("success", 200),  # relative redirect
        host.url("/robots?tag=noai"): ("disallowed", 200),
        host.url("/robots?tag=noindex,%20nofollow"): ("disallowed", 200),
        host.url("/robots?tag=laion-dask:%20noimageai"): ("disallowed", 200),
        host.url("/robots?tag=otherbot:%20noai"): ("success", 200),  # another crawler's rule
        host.add(
            "exif.png", (pillow / "exif_imagemagick_orientation.png").read_bytes(), "image/png"
        ): ("success", 200),
        "ftp://127.0.0.1/a.jpg": ("failed_to_download", None),
        "not a url": ("failed_to_download", None),
    }
    urls = list(cases)
    df = _frame(urls)
    out = download_images(df, FAST)  # the 1e8-pixel PNG header: refused, no Pillow warning
    assert out[schema.URL].tolist() == urls  # row order kept
    got = dict(
        zip(urls, zip(out[schema.STATUS], out[schema.HTTP_STATUS], strict=True), strict=True)
    )
    expected = {u: (s, code) for u, (s, code) in cases.items()}
    got = {u: (s, None if pd.isna(c) else int(c)) for u, (s, c) in got.items()}
    assert got == expected, out[schema.ERROR_MESSAGE].tolist()
    failed = out[out[schema.STATUS] != "success"]
    assert failed[schema.ERROR_MESSAGE].notna().all()
    assert failed[schema.IMAGE].isna().all()
    ok = out[out[schema.STATUS] == "success"]
    assert ok[schema.ERROR_MESSAGE].isna().all()
    for img in ok[schema.IMAGE]:
        assert Image.open(io.BytesIO(img)).format == "JPEG"
    row = out.set_index(schema.URL).loc[host.url("/img/a.jpg")]
    assert (row[schema.ORIGINAL_WIDTH], row[schema.ORIGINAL_HEIGHT]) == (640, 480)
    assert (row[schema.WIDTH], row[schema.HEIGHT]) == (341, 256)
    assert row[schema.SHA256] == hashlib.sha256(jpeg).hexdigest()
    assert row[schema.ORIGINAL_BYTES] == len(jpeg)
    # the body over the cap was abandoned, not read to the end
    assert host.sent["/big"] < 30_000_000 // 2
    # the truncated body was retried as a transient failure, the 404 was not
    assert len(host.hits("/truncated")) == FAST.retries + 1
    assert len(host.hits("/status/404")) == 1
    messages = out.set_index(schema.URL)[schema.ERROR_MESSAGE]
    assert "deadline" in messages[host.url("/trickle")]
    assert "timeout" in messages[host.url("/slow-first-byte?s=2")]
    assert "loop" in messages[host.url("/loop")]
    assert "data:" in messages[host.url("/redirect?to=data:image/png;base64,iVBORw0KGgo=")]
    # the user agent names the tool
    agents = {h.get("User-Agent") for _, _, h in host.requests}
    assert agents == {FAST.user_agent}


def test_gif_and_animation_when_allowed(host: ImageHost) -> None:
    url = host.add("anim.gif", _animated_gif(), "image/gif")
    out = download_images(
        _frame([url]), DownloadConfig(allow_private_networks=True, formats=("GIF",))
    )
    assert out[schema.STATUS].tolist() == ["success"]
    assert (out[schema.ORIGINAL_WIDTH][0], out[schema.WIDTH][0]) == (200, 341)


def test_rate_limit_honours_retry_after(host: ImageHost) -> None:
    cfg = DownloadConfig(allow_private_networks=True, deadline=5.0, retries=2, retry_backoff=0.05)
    out = download_images(_frame([host.url("/ratelimit/slow?after=1")]), cfg)
    assert out[schema.STATUS].tolist() == ["success"]
    first, second = host.hits("/ratelimit/slow")
    assert second - first >= 0.9  # waited for Retry-After, not the 0.05 s backoff


def test_retry_after_is_capped_and_retries_run_out(host: ImageHost) -> None:
    cfg = DownloadConfig(allow_private_networks=True, deadline=5.0, retries=0, max_retry_after=0.2)
    out = download_images(_frame([host.url("/ratelimit/capped?after=3600")]), cfg)
    assert out[schema.STATUS].tolist() == ["failed_to_download"]
    assert out[schema.ERROR_MESSAGE][0].startswith("HTTP 429")
    assert is_transient(out[schema.STATUS][0], out[schema.ERROR_MESSAGE][0])
    cfg = DownloadConfig(allow_private_networks=True, deadline=5.0, retries=1, max_retry_after=0.2)
    out = download_images(_frame([host.url("/ratelimit/capped2?after=3600")]), cfg)
    assert out[schema.STATUS].tolist() == ["success"]


def test_server_errors_are_retried_until_retries_run_out(host: ImageHost) -> None:
    out = download_images(_frame([host.url("/status/503")]), FAST)
    assert out[schema.STATUS].tolist() == ["failed_to_download"]
    assert "3 attempts" in out[schema.ERROR_MESSAGE][0]
    assert len(host.hits("/status/503")) == 3


def test_dropped_rows_pass_through_untouched(host: ImageHost) -> None:
    urls = [host.url("/img/jpeg"), host.url("/img/jpeg"), "http://10.0.0.1/x.jpg"]
    df = _frame(urls, drop=[None, "duplicate", "text_too_short"])
    before = len(host.hits("/img/jpeg"))
    out = download_images(df, FAST)
    assert out[schema.STATUS].tolist()[0] == "success"
    assert out[schema.STATUS].iloc[1:].isna().all()
    assert out[schema.IMAGE].iloc[1:].isna().all()
    assert len(host.hits("/img/jpeg")) == before + 1
    pd.testing.assert_frame_equal(out[df.columns], df)  # input columns unchanged
    assert list(out.columns) == [*df.columns, *schema.DOWNLOAD_DTYPES, schema.IMAGE]
    for col, dtype in schema.DOWNLOAD_DTYPES.items():
        assert str(out[col].dtype) == dtype, col


def test_empty_partition(host: ImageHost) -> None:
    out = download_images(_frame([]), FAST)
    assert len(out) == 0
    assert list(out.columns)[-1] == schema.IMAGE


def test_loopback_is_blocked_on_the_first_hop(host: ImageHost) -> None:
    cfg = DownloadConfig(connect_timeout=1.0, deadline=2.0)  # allow_private_networks=False
    port = host.port
    urls = [
        host.url("/img/jpeg"),
        f"http://localhost:{port}/img/jpeg",
        f"http://2130706433:{port}/img/jpeg",
        f"http://0x7f.1:{port}/img/jpeg",
        f"http://[::ffff:127.0.0.1]:{port}/img/jpeg",
        f"http://[::1]:{port}/img/jpeg",
    ]
    before = len(host.requests)
    out = download_images(_frame(urls), cfg)
    assert out[schema.STATUS].tolist() == ["blocked_address"] * len(urls)
    assert len(host.requests) == before  # no request reached the server


@pytest.fixture
def loopback_is_the_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat exactly 127.0.0.1 as a public address; every other rule stays real.

    Tests may only talk to loopback, so this stands in for "a public web server" and lets the
    redirect-hop checks run with ``allow_private_networks=False``.
    """
    real = netguard._is_public

    def patched(ip):  # noqa: ANN001, ANN202
        return str(ip) == "127.0.0.1" or real(ip)

    monkeypatch.setattr(netguard, "_is_public", patched)


@pytest.mark.usefixtures("loopback_is_the_internet")
def test_every_redirect_hop_is_checked(host: ImageHost, other_host: ImageHost) -> None:
    cfg = DownloadConfig(connect_timeout=1.0, deadline=2.0)
    port2 = other_host.port
    answers = {"cdn.test": ["127.0.0.1"], "intranet.test": ["10.1.2.3"], "loop.test": ["127.0.0.2"]}

    def resolver(name: str) -> list[str]:
        return answers[name]

    targets = [
        f"http://127.0.0.2:{port2}/img/jpeg",  # another loopback address, other port
        f"http://0x7f.0.0.2:{port2}/img/jpeg",
        f"http://[::1]:{port2}/img/jpeg",
        f"http://loop.test:{port2}/img/jpeg",
        "http://intranet.test/img/jpeg",
        "http://169.254.169.254/latest/meta-data/",
    ]
    urls = [host.url(f"/redirect?to={t}") for t in targets]
    # controls: a hop to an allowed host goes through, by name and by address
    urls.append(host.url(f"/redirect?to=http://cdn.test:{port2}/img/jpeg"))
    urls.append(f"http://cdn.test:{host.port}/img/jpeg")
    before = len(other_host.content_requests())
    out = download_images(_frame(urls), cfg, resolver=resolver)
    statuses = out[schema.STATUS].tolist()
    expected = ["blocked_address"] * len(targets) + ["success", "success"]
    assert statuses == expected, out[schema.ERROR_MESSAGE].tolist()[-2:]
    assert (out[schema.HTTP_STATUS][: len(targets)] == 302).all()  # blocked after the first hop
    assert len(other_host.content_requests()) == before + 1  # only the allowed hop reached it


@pytest.mark.usefixtures("loopback_is_the_internet")
def test_connects_only_to_the_checked_address(host: ImageHost) -> None:
    """A name that answers public first and private later (DNS rebinding) is resolved once."""
    calls: list[str] = []

    def rebinding(name: str) -> list[str]:
        calls.append(name)
        return ["127.0.0.1"] if len(calls) == 1 else ["10.0.0.1"]

    url = f"http://rebind.test:{host.port}/img/jpeg"
    out = download_images(_frame([url, url, url]), DownloadConfig(), resolver=rebinding)
    assert out[schema.STATUS].tolist() == ["success"] * 3
    assert calls == ["rebind.test"]


def test_redirect_to_another_loopback_port_when_private_allowed(
    host: ImageHost, other_host: ImageHost
) -> None:
    url = host.url(f"/redirect?to={other_host.url('/img/jpeg')}")
    out = download_images(_frame([url]), FAST)
    assert out[schema.STATUS].tolist() == ["success"]
    out = download_images(
        _frame([url]), DownloadConfig(allow_private_networks=True, max_redirects=0)
    )
    assert out[schema.STATUS].tolist() == ["failed_to_download"]
    assert "redirects" in out[schema.ERROR_MESSAGE][0]


def test_per_host_and_global_concurrency_limits(host: ImageHost) -> None:
    urls = [host.url(f"/hold/{i}?s=0.2") for i in range(8)]
    host.reset_max_active()
    cfg = DownloadConfig(allow_private_networks=True, per_host_concurrency=2, concurrency=64)
    out = download_images(_frame(urls), cfg)
    assert out[schema.STATUS].eq("success").all()
    assert host.max_active == 2
    host.reset_max_active()
    cfg = DownloadConfig(allow_private_networks=True, per_host_concurrency=8, concurrency=3)
    download_images(_frame(urls), cfg)
    assert host.max_active == 3


def test_in_flight_bytes_are_bounded(host: ImageHost, caplog: pytest.LogCaptureFixture) -> None:
    bodies = [noise_image(320, 240, "JPEG", seed=10 + i) for i in range(12)]
    urls = [host.add(f"b{i}.jpg", data) for i, data in enumerate(bodies)]
    caplog.set_level(logging.DEBUG, logger="laion_dask.stages.download")
    # a budget smaller than one body: rows run one at a time, and none deadlocks
    cfg = DownloadConfig(allow_private_networks=True, max_inflight_bytes=30_000, deadline=10.0)
    out = download_images(_frame(urls), cfg)
    assert out[schema.STATUS].tolist() == ["success"] * 12
    peaks = [r.peak for r in caplog.records if hasattr(r, "peak")]
    assert peaks == [max(len(b) for b in bodies)]
    # a roomy budget lets them overlap
    caplog.clear()
    download_images(_frame(urls), DownloadConfig(allow_private_networks=True))
    peaks = [r.peak for r in caplog.records if hasattr(r, "peak")]
    assert peaks[0] > max(len(b) for b in bodies)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds through /proc")
def test_no_threads_or_sockets_left_behind(host: ImageHost) -> None:
    def ours() -> set[str]:
        return {
            t.name for t in threading.enumerate() if t.name.startswith(("laion-dask", "asyncio_"))
        }

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    download_images(_frame([host.url("/img/jpeg")]), FAST)  # warm-up: imports, lazy globals
    before, fds = ours(), open_fds()
    for _ in range(3):
        out = download_images(_frame([host.url("/img/jpeg")] * 4), FAST)
        assert out[schema.STATUS].eq("success").all()
    assert ours() == before
    # every client socket is closed (the in-process server may take a moment to close its end)
    deadline = time.monotonic() + 2
    while open_fds() > fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() <= fds


def test_works_inside_a_running_event_loop(host: ImageHost) -> None:
    async def notebook_cell() -> pd.DataFrame:
        return download_images(_frame([host.url("/img/jpeg")]), FAST)

    out = asyncio.run(notebook_cell())
    assert out[schema.STATUS].tolist() == ["success"]


def test_stats_add_up(host: ImageHost) -> None:
    urls = [host.url("/img/jpeg"), host.url("/status/404"), host.url("/robots?tag=noai"), "x"]
    out = download_images(_frame(urls, drop=[None, None, None, "bad_url_scheme"]), FAST)
    stats = download_stats(out, 2.0)
    assert stats["count"] == 3
    assert stats["skipped"] == 1
    assert stats["successes"] == 1
    assert stats["count"] == stats["successes"] + sum(stats["failures"].values())
    assert stats["failures"]["failed_to_download"] == 1
    assert stats["failures"]["disallowed"] == 1
    assert set(stats["failures"]) == set(schema.DOWNLOAD_STATUSES) - {"success"}
    # only the success read a body: the 404 and the disallowed row stopped at the headers
    assert stats["bytes"] == int(out[schema.ORIGINAL_BYTES].sum()) == out[schema.ORIGINAL_BYTES][0]
    assert stats["duration"] == 2.0


def test_robots_header_parsing() -> None:
    ua = "laion-dask"
    assert robots_disallowed(["noai"], ua) == "noai"
    assert robots_disallowed(["NoImageIndex"], ua) == "noimageindex"
    assert robots_disallowed(["nofollow, noarchive"], ua) is None
    assert robots_disallowed(["googlebot: noindex"], ua) is None
    assert robots_disallowed(["googlebot: noindex, laion-dask: noai"], ua) == "noai"
    assert robots_disallowed(["*: noimageai"], ua) == "noimageai"
    assert robots_disallowed(["max-image-preview:large, noindex"], ua) == "noindex"
    assert robots_disallowed(["unavailable_after: 25 Jun 2010 15:00:00 PST"], ua) is None
    assert robots_disallowed(["nofollow", "noai"], ua) == "noai"


def test_transient_classification() -> None:
    assert is_transient("failed_to_download", "HTTP 503 (3 attempts)")
    assert is_transient("failed_to_download", "deadline of 30s exceeded")
    assert not is_transient("failed_to_download", "HTTP 404")
    assert not is_transient("blocked_address", "x resolves to non-public address 10.0.0.1")
    assert not is_transient("success", None)


def test_dask_equivalence(host: ImageHost, client) -> None:  # noqa: ANN001
    urls = [
        host.add(f"eq{i}.jpg", noise_image(300 + 10 * i, 200, "JPEG", seed=50 + i))
        for i in range(6)
    ]
    urls += [host.url("/status/404"), host.url("/robots?tag=noai"), host.url("/loop")]
    urls += [host.add("eq.png", noise_image(256, 300, "PNG", seed=99), "image/png")]
    df = _frame(urls, drop=[None] * 8 + ["duplicate", None])
    expected = download_images(df, FAST)
    meta = download_images(df.iloc[:0], FAST)
    ddf = dd.from_pandas(df, npartitions=3)
    assert ddf.npartitions == 3
    got = ddf.map_partitions(download_images, FAST, meta=meta).compute()
    pd.testing.assert_frame_equal(got, expected)
    assert (expected[schema.STATUS] == "success").sum() == 7
