"""Page-level opt-out signals recorded at extraction (WAT Head.Metas and WARC HTML <meta>)."""

from __future__ import annotations

import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import ConsentConfig, ExtractConfig, RulesConfig
from laion_dask.stages.extract import extract_file
from laion_dask.stages.extract.optout import page_signals
from laion_dask.stages.rules import add_drop_reason
from tests.helpers.extract import http_response, make_warc, make_wat, wat_payload

NAMES = frozenset(ConsentConfig().meta_names)

# (metas of the page, page_robots, page_tdm, drop_reason under the default [consent])
PAGES = [
    ([], None, False, None),
    ([{"name": "description", "content": "noai"}], None, False, None),  # not a robots meta
    ([{"name": "robots", "content": "noai"}], "noai", False, "page_robots_meta"),
    ([{"name": "ROBOTS", "content": " NoImageAI , follow"}], "follow,noimageai", False,
     "page_robots_meta"),
    ([{"name": "googlebot", "content": "noindex"}], "noindex", False, "page_robots_meta"),
    ([{"name": "otherbot", "content": "noai"}], None, False, None),  # not for us
    ([{"name": "robots", "content": "index, follow"}], "follow,index", False, None),
    ([{"name": "tdm-reservation", "content": "1"}], None, True, "page_tdm_reservation"),
    ([{"name": "tdm-reservation", "content": "0"}], None, False, None),
    ([{"property": "og:title", "content": "x"}, {"name": 7, "content": None}, "odd"], None,
     False, None),  # what a WAT may hold: ignored, the page keeps its links
]  # fmt: skip


def _html(metas) -> bytes:
    tags = "".join(
        f'<meta name="{m["name"]}" content="{m["content"]}">'
        for m in metas
        if isinstance(m, dict) and isinstance(m.get("name"), str)
    )
    return (
        f'<html><head>{tags}<title>t</title></head><body><img src="/a.jpg" alt="a red bicycle">'
        "</body></html>"
    ).encode()


def _by_page(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(schema.PAGE_URL).reset_index(drop=True)


def _check(df: pd.DataFrame, pages) -> None:
    df = _by_page(df)
    assert len(df) == len(pages)
    robots = [None if pd.isna(v) else v for v in df[schema.PAGE_ROBOTS]]
    assert robots == [r for _, r, _, _ in pages]
    assert df[schema.PAGE_TDM].tolist() == [t for _, _, t, _ in pages]
    reasons = add_drop_reason(df, RulesConfig())[schema.DROP_REASON]
    assert [None if pd.isna(v) else v for v in reasons] == [d for _, _, _, d in pages]


@pytest.mark.parametrize("use_json", [False, True])
def test_wat_pages_record_their_signals(tmp_path, monkeypatch, use_json):
    """msgspec and the stdlib json fallback read Head.Metas alike."""
    import laion_dask.stages.extract.wat as wat

    if use_json:
        # what msgspec refuses goes to the stdlib parser: refusing everything forces that path
        def refuse(body: bytes) -> None:
            raise wat.BadRecord("invalid_json", "refused")

        monkeypatch.setattr(wat, "_parse_msgspec", refuse)
    records = [
        wat_payload(
            f"http://p{i:02d}.example/",
            [{"path": "IMG@/src", "url": "/a.jpg", "alt": "a red bicycle"}],
            metas=metas,
        )
        for i, (metas, *_) in enumerate(PAGES)
    ]
    path = tmp_path / "m.wat.gz"
    path.write_bytes(make_wat(records))
    res = extract_file(str(path), ExtractConfig())
    assert res.summary.bad_records == {}
    _check(res.pairs, PAGES)
    assert dict(res.pairs.dtypes.astype(str)) == schema.PAIRS_DTYPES


def test_warc_pages_record_their_signals(tmp_path):
    html_pages = [p for p in PAGES if all(isinstance(m, dict) for m in p[0])]
    html_pages = [p for p in html_pages if all(isinstance(m.get("name"), str) for m in p[0])]
    pages = [
        {"url": f"http://p{i:02d}.example/", "block": http_response(_html(metas))}
        for i, (metas, *_) in enumerate(html_pages)
    ]
    path = tmp_path / "m.warc.gz"
    path.write_bytes(make_warc(pages))
    _check(extract_file(str(path), ExtractConfig()).pairs, html_pages)


def test_meta_names_come_from_the_consent_config(tmp_path):
    records = [
        wat_payload(
            "http://p.example/",
            [{"path": "IMG@/src", "url": "/a.jpg", "alt": "a red bicycle"}],
            metas=[{"name": "otherbot", "content": "noai"}],
        )
    ]
    path = tmp_path / "o.wat.gz"
    path.write_bytes(make_wat(records))
    consent = ConsentConfig(meta_names=("robots", "otherbot"))
    df = extract_file(str(path), ExtractConfig(), consent).pairs
    assert df[schema.PAGE_ROBOTS].tolist() == ["noai"]
    assert add_drop_reason(df, RulesConfig(), consent)[schema.DROP_REASON].tolist() == [
        "page_robots_meta"
    ]


def test_page_signals_ignore_what_is_not_a_string():
    assert page_signals([(None, "noai"), ("robots", 3), (["robots"], "noai")], NAMES) == (
        None,
        False,
    )
    assert page_signals([("robots", "noai;noindex")], NAMES) == ("noai,noindex", False)
