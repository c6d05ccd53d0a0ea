"""The search page: built without a server, then served by Panel and driven by Chromium."""

from __future__ import annotations

import re

import pytest

from laion_dask.faces import search_page
from laion_dask.ground import schema
from laion_dask.ground.shards import read_shard_images
from laion_dask.products import knn
from tests.helpers.browser import browser_skip_reason, chromium_page, panel_server
from tests.helpers.knn import make_scene_run

RESULTS = re.compile(r"(\d+) results for")


@pytest.fixture(scope="module")
def indexed_run(tmp_path_factory, client):
    run, scenes = make_scene_run(tmp_path_factory.mktemp("page") / "run", client, seed=4)
    knn.build_index(run, client=client)
    return run, scenes


def test_page_searches_text_and_images_and_follows_filters(indexed_run):
    run, scenes = indexed_run
    layout = search_page.build_search_page(run)
    layout.get_root()  # the whole Bokeh model tree builds
    page = layout.search_page
    scene = scenes["000000004"]
    page.k.value = 5
    page.query.value = scene.key
    assert page.status.object.startswith("5 results for")
    assert page.results.object.count('class="knn-result"') == 5
    assert page.results.object.count("data:image/png;base64") == 5
    expected = knn.search(run, text=scene.key, k=5, thumbnails=False)
    assert page.results.object.index(expected[schema.TEXT].iloc[0]) > 0
    # a filter re-runs the last query
    page.group.value = "multi"
    only_multi = knn.search(run, text=scene.key, k=5, language_group="multi", thumbnails=False)
    assert page.filters()["language_group"] == "multi"
    assert page.status.object.startswith(f"{len(only_multi)} results for")
    # an uploaded image; an undecodable one is a status line, not a crash
    image = read_shard_images(run.join("images", "00001.tar"), ["000010003"])["000010003"]
    page.group.value = "all"
    page.upload.value = image
    assert "the uploaded image" in page.status.object
    page.upload.value = b"definitely not an image"
    assert "Cannot search" in page.status.object and page.results.object == ""


def test_missing_index_fails_before_the_page(tmp_path, capsys):
    import numpy as np

    from tests.helpers.knn import make_vector_run

    run = make_vector_run(tmp_path / "run", [np.eye(4, dtype=np.float16)])
    with pytest.raises(FileNotFoundError, match="laion-dask index"):
        search_page.build_search_page(run)
    assert search_page.main([run.path, "--no-show"]) == 2
    # the served faces' common flags parse; the missing index is still the one-line answer
    assert search_page.main([run.path, "--no-show", "-q", "-vv", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("laion-dask index" in line for line in err)


def _wait_status(page, pattern: re.Pattern) -> str:
    found = page.get_by_text(pattern).first
    found.wait_for(timeout=60_000)
    return found.inner_text()


def test_served_search_page_in_chromium(indexed_run):
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)
    run, scenes = indexed_run
    scene = scenes["000010002"]
    pages = []

    def app():
        layout = search_page.build_search_page(run)
        pages.append(layout.search_page)
        return layout

    with panel_server(app) as url, chromium_page() as (page, errors):
        page.goto(url)
        box = page.get_by_placeholder(re.compile("a red bicycle"))
        box.wait_for(timeout=60_000)
        box.fill(scene.key)
        box.press("Enter")
        status = _wait_status(page, RESULTS)
        assert RESULTS.search(status).group(1) == "12"
        grid = page.locator(".knn-result")
        grid.first.wait_for(timeout=30_000)
        assert grid.count() == 12
        best = knn.search(run, text=scene.key, k=1, thumbnails=False)[schema.TEXT].iloc[0]
        assert best in grid.first.inner_text()
        assert page.locator(".knn-result img").count() == 12
        # upload a picture of the run: its own image comes first
        image = read_shard_images(run.join("images", "00000.tar"), ["000000007"])["000000007"]
        page.locator("input[type=file]").set_input_files(
            files=[{"name": "query.jpg", "mimeType": "image/jpeg", "buffer": image}]
        )
        _wait_status(page, re.compile("results for the uploaded image"))
        own = scenes["000000007"].key
        # the grid's HTML reaches the browser after the status line: wait for the new grid
        page.locator(".knn-result", has_text="#1 similarity 1.0").first.wait_for(timeout=30_000)
        assert own in page.locator(".knn-result").first.inner_text()
        assert pages[-1].status.object.startswith("12 results for the uploaded image")
    assert not errors, errors
