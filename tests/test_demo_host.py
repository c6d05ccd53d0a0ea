"""The loopback image host, over real HTTP: noai header, 404, corrupt files, port reuse."""

from __future__ import annotations

import http.client
import io
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
from PIL import Image

from laion_dask.faces.demo.host import ImageHost, host_address, serve_demo_corpus
from laion_dask.products.synthetic.corpus import load_corpus_info
from tests.helpers.demo import SMALL_SPEC, tree_digest


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, parts.path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    with serve_demo_corpus(tmp_path_factory.mktemp("served"), SMALL_SPEC) as (info, host):
        yield info, host, pd.read_parquet(info.ground_truth)


def test_hosts_share_one_port_on_distinct_loopback_addresses(served) -> None:
    info, host, _ = served
    assert host.base_urls == list(info.base_urls)
    assert [urlsplit(u).hostname for u in host.base_urls] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert len({urlsplit(u).port for u in host.base_urls}) == 1


def test_routes_serve_the_ground_truth(served) -> None:
    info, _, gt = served
    checked = set()
    for row in gt.drop_duplicates("noise").itertuples():
        if row.noise == "data_uri":
            continue
        status, headers, body = _get(row.url)
        checked.add(row.noise)
        if row.noise == "broken_link":
            assert status == 404
            continue
        assert status == 200
        assert int(headers["content-length"]) == len(body)
        path = info.images_dir / f"host{row.host}" / "img" / row.url.rsplit("/", 1)[1]
        assert body == path.read_bytes()
        assert ("x-robots-tag" in headers) == (row.noise == "noai")
        if row.noise == "noai":
            assert headers["x-robots-tag"] == "noai"
        if row.noise == "corrupt_text":  # text served as an image, as broken servers do
            assert headers["content-type"] == "image/jpeg"
            with pytest.raises(OSError):
                Image.open(io.BytesIO(body))
        if row.noise in ("clean", "tiny", "mismatched"):
            assert headers["content-type"] in ("image/jpeg", "image/png", "image/webp")
            with Image.open(io.BytesIO(body)) as im:
                im.load()
    assert {
        "clean",
        "noai",
        "broken_link",
        "corrupt_text",
        "corrupt_truncated",
        "oversized",
        "tiny",
        "svg",
        "gif",
    } <= checked


def test_relative_links_resolve_to_served_files(served) -> None:
    _, _, gt = served
    for row in gt[gt["noise"].isin(["relative", "relative_base"])].head(6).itertuples():
        status, _, body = _get(row.url)
        assert status == 200 and len(body) > 5000


def test_head_missing_and_traversal(served) -> None:
    _, host, _ = served
    base = host.base_urls[0]
    status, headers, body = _get(f"{base}/img/does-not-exist.jpg", "HEAD")
    assert status == 404 and body == b""
    # the host serves only its own folder: no way up to corpus.json or another host
    assert _get(f"{base}/../corpus.json")[0] == 404
    assert _get(f"{base}/%2e%2e/%2e%2e/corpus.json")[0] == 404
    assert _get(f"{base}/../host1/img/pic00001.jpg")[0] == 404


def test_bound_port_raises(tmp_path: Path) -> None:
    with ImageHost(tmp_path, hosts=2) as host:
        with pytest.raises(OSError):
            ImageHost(tmp_path, hosts=2, port=host.port).start()
    with pytest.raises(RuntimeError, match="not started"):
        _ = ImageHost(tmp_path).base_urls
    assert host_address(2) == "127.0.0.3"


def test_serve_demo_corpus_reuses_or_regenerates(tmp_path: Path) -> None:
    with serve_demo_corpus(tmp_path, SMALL_SPEC) as (info, host):
        port = host.port
        first = tree_digest(tmp_path)
    # reused: same port free again, nothing rewritten
    with serve_demo_corpus(tmp_path, SMALL_SPEC) as (info2, host2):
        assert host2.port == port and info2.base_urls == info.base_urls
        assert tree_digest(tmp_path) == first
    # the recorded port is taken on one address: a new port, URLs rewritten to it
    blocker = socket.socket()
    blocker.bind(("127.0.0.2", port))
    blocker.listen()
    try:
        with serve_demo_corpus(tmp_path, SMALL_SPEC) as (info3, host3):
            assert host3.port != port
            gt = pd.read_parquet(info3.ground_truth)
            http_urls = gt.loc[gt["url"].str.startswith("http"), "url"]
            assert http_urls.map(lambda u: urlsplit(u).port).eq(host3.port).all()
            assert load_corpus_info(tmp_path).base_urls == tuple(host3.base_urls)
            clean = gt[gt["noise"] == "clean"].iloc[0]
            assert _get(clean.url)[0] == 200
    finally:
        blocker.close()


# 12000x9000 is over the cap but under Pillow's bomb error: Pillow warns before the guard says no
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_real_downloader_gives_the_expected_status(served) -> None:
    download = pytest.importorskip("laion_dask.stages.download")
    if not hasattr(download, "download_images"):
        pytest.skip("laion_dask.stages.download.download_images not available")
    from laion_dask.ground.config import DownloadConfig

    _, _, gt = served
    rows = gt[gt["expected_status"].notna()].reset_index(drop=True)
    df = pd.DataFrame(
        {"uid": [str(i) for i in range(len(rows))], "url": rows["url"].astype(str)}
    ).astype("string")
    out = download.download_images(df, DownloadConfig(allow_private_networks=True, retries=0))
    got = out["status"].astype(str).to_numpy()
    want = rows["expected_status"].astype(str).to_numpy()
    wrong = rows.loc[got != want, "noise"].value_counts().to_dict()
    assert not wrong, wrong
    assert set(want) >= {
        "success",
        "disallowed",
        "failed_to_download",
        "failed_to_decode",
        "too_small",
        "too_large",
    }
