"""The demo corpus: deterministic, real WAT/WARC formats, ground truth that matches the files."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import struct
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pandas as pd
import pytest
from bs4 import BeautifulSoup
from PIL import Image
from warcio.archiveiterator import ArchiveIterator

from laion_dask.products.synthetic.corpus import (
    DEFAULT_NOISE,
    FALSE_CAPTION_KINDS,
    GENERIC_TEXTS,
    PAGE_TEXTS,
    CorpusSpec,
    generate_corpus,
    load_corpus_info,
)
from laion_dask.products.synthetic.draw import (
    COLOURS,
    LANGUAGES,
    RARE_COLOURS,
    RARE_SHAPES,
    Scene,
    all_scenes,
    caption,
    draw_scene,
    random_scene,
)
from tests.helpers.demo import (  # noqa: F401  (fixtures)
    FAKE_BASE_URLS,
    SMALL_SPEC,
    default_corpus,
    small_corpus,
    tree_digest,
)

PIXEL_CAP = 89_478_484


def _gt(info) -> pd.DataFrame:
    return pd.read_parquet(info.ground_truth)


def test_same_spec_gives_byte_identical_files(tmp_path: Path) -> None:
    a = generate_corpus(tmp_path / "a", SMALL_SPEC, base_urls=FAKE_BASE_URLS)
    b = generate_corpus(tmp_path / "b", SMALL_SPEC, base_urls=FAKE_BASE_URLS)
    da, db = tree_digest(a.root), tree_digest(b.root)
    assert da == db
    assert any(k.endswith(".warc.wat.gz") for k in da) and any(k.endswith(".warc.gz") for k in da)
    other = generate_corpus(
        tmp_path / "c",
        CorpusSpec(n_pages=80, n_images=60, n_files=2, seed=7),
        base_urls=FAKE_BASE_URLS,
    )
    assert tree_digest(other.root) != da


def test_corpus_json_round_trips(small_corpus) -> None:  # noqa: F811
    info = load_corpus_info(small_corpus.root)
    assert info == small_corpus
    assert info.spec == SMALL_SPEC
    assert info.base_urls == FAKE_BASE_URLS
    assert sum(info.noise_counts.values()) == info.n_links == len(_gt(info))


def _records(path: Path):
    with path.open("rb") as fh:
        it = ArchiveIterator(fh)
        for rec in it:
            body = rec.content_stream().read()  # before the offset: asking for it reads to the end
            yield it.get_record_offset(), rec.rec_headers, body


def test_wat_parses_as_common_crawl_layout(small_corpus) -> None:  # noqa: F811
    gt = _gt(small_corpus)
    responses = {}
    for warc in small_corpus.warc_files:
        for offset, headers, _ in _records(warc):
            if headers.get_header("WARC-Type") == "response":
                responses[headers.get_header("WARC-Record-ID")] = (warc.name, offset)
    pages = 0
    for wat in small_corpus.wat_files:
        recs = list(_records(wat))
        assert recs[0][1].get_header("WARC-Type") == "warcinfo"
        assert recs[0][1].get_header("WARC-Filename") == wat.name
        for _, headers, body in recs[1:]:
            assert headers.get_header("WARC-Type") == "metadata"
            assert headers.get_header("Content-Type") == "application/json"
            meta = json.loads(body)
            # the response this metadata record describes, at the offset the WAT says
            ref = headers.get_header("WARC-Refers-To")
            assert responses[ref] == (
                meta["Container"]["Filename"],
                int(meta["Container"]["Offset"]),
            )
            env = meta["Envelope"]
            assert env["WARC-Header-Metadata"]["WARC-Type"] == "response"
            http = env["Payload-Metadata"]["HTTP-Response-Metadata"]
            assert http["Response-Message"]["Status"] == "200"
            html_meta = http["HTML-Metadata"]
            page_url = headers.get_header("WARC-Target-URI")
            rows = gt[gt["page_url"] == page_url].sort_values("link_index")
            imgs = [lk for lk in html_meta["Links"] if lk["path"] == "IMG@/src"]
            assert [lk["url"] for lk in imgs] == rows["src"].tolist()
            assert [lk.get("alt") for lk in imgs] == [
                None if pd.isna(t) else t for t in rows["text"]
            ]
            assert any(lk["path"] == "A@/href" for lk in html_meta["Links"])
            base = html_meta["Head"].get("Base")
            for lk, url in zip(imgs, rows["url"], strict=True):
                if not lk["url"].startswith("data:"):
                    assert urljoin(base or page_url, lk["url"]) == url
            pages += 1
    assert pages == small_corpus.n_pages == gt["page_url"].nunique()


def test_warc_html_matches_ground_truth(small_corpus) -> None:  # noqa: F811
    gt = _gt(small_corpus)
    seen = 0
    for warc in small_corpus.warc_files:
        for _, headers, body in _records(warc):
            if headers.get_header("WARC-Type") != "response":
                continue
            soup = BeautifulSoup(body, "html.parser")
            page_url = headers.get_header("WARC-Target-URI")
            rows = gt[gt["page_url"] == page_url].sort_values("link_index")
            imgs = soup.find_all("img")
            assert [i["src"] for i in imgs] == rows["src"].tolist()
            assert [i.get("alt") for i in imgs] == [None if pd.isna(t) else t for t in rows["text"]]
            base = soup.find("base")
            assert (base is not None) == rows["noise"].eq("relative_base").any()
            assert soup.html["lang"] == rows["page_language"].iloc[0]
            seen += 1
    assert seen == small_corpus.n_pages


def _file(info, row) -> Path:
    return info.images_dir / f"host{row.host}" / "img" / row.url.rsplit("/", 1)[1]


def test_ground_truth_matches_the_served_files(small_corpus) -> None:  # noqa: F811
    info = small_corpus
    gt = _gt(info)
    noai_host = len(info.base_urls) - 1
    assert set(gt["noise"]) == {"clean", *dict(DEFAULT_NOISE)}  # every kind drawn at this size
    for row in gt.itertuples():
        kind = row.noise
        if kind == "data_uri":
            assert row.url.startswith("data:image/") and pd.isna(row.host)
            continue
        assert row.url.startswith(info.base_urls[0][:-2]) or row.url.startswith("http://127.0.0.")
        if kind == "broken_link":
            assert pd.isna(row.host)
            host = info.base_urls.index(row.url.split("/img/")[0])
            assert not (
                info.images_dir / f"host{host}" / "img" / row.url.rsplit("/", 1)[1]
            ).exists()
            continue
        path = _file(info, row)
        data = path.read_bytes()
        assert row.url == f"{info.base_urls[row.host]}/img/{path.name}"
        if kind != "duplicate":  # a duplicate repeats a link of any kind, noai included
            assert (row.host == noai_host) == (kind == "noai")
        if kind == "oversized":
            w, h = struct.unpack(">II", data[16:24])
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and w * h > PIXEL_CAP and len(data) > 5000
        elif kind == "corrupt_truncated":
            with pytest.raises(OSError), Image.open(io.BytesIO(data)) as im:
                im.load()
        elif kind == "corrupt_text":
            assert (
                path.suffix == ".jpg" and data.startswith(b"<!DOCTYPE html>") and len(data) > 5000
            )
        elif kind == "svg":
            assert data.startswith(b"<svg")
        else:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                lo, hi = info.spec.image_size
                if kind == "tiny":
                    assert len(data) < 5000
                else:
                    assert lo <= im.width <= hi and lo <= im.height <= hi and len(data) >= 5000
                    assert im.format in ("JPEG", "PNG", "WEBP", "GIF")


def _scene(row) -> Scene:
    return Scene(
        row.colour, row.shape, row.background, None if pd.isna(row.bg_colour) else row.bg_colour
    )


def _captions(scene: Scene) -> set[str]:
    return {caption(scene, lang, t) for lang in LANGUAGES for t in range(3)}


def test_matches_and_captions_are_consistent(small_corpus) -> None:  # noqa: F811
    gt = _gt(small_corpus)
    common = {c for s in all_scenes() for c in _captions(s)}
    m = gt[gt["matches"]]
    assert m["has_image"].all()
    assert (m["text"] == m["caption"]).all()  # a matching alt text is the picture's true caption
    # ... of the scene the label columns name
    assert all(row.text in _captions(_scene(row)) for row in m.itertuples())
    mis = gt[gt["noise"].isin(["mismatched", "near_miss"])]
    assert not mis["matches"].any() and mis["text"].isin(common).all()
    assert (mis["text"] != mis["caption"]).all()
    # a mismatched caption describes another scene, not a rewording of the same one
    assert (mis["caption_en"] != mis["text"]).all()
    assert not gt.loc[gt["noise"].isin(["no_alt", *FALSE_CAPTION_KINDS]), "matches"].any()
    assert (gt.loc[gt["noise"] == "too_short", "text"].str.len() < 5).all()
    assert (gt.loc[gt["noise"] == "generic", "text"].str.len() >= 5).all()
    assert not gt.loc[gt["noise"] == "no_alt", "extracted"].any()
    assert gt.loc[gt["noise"] != "no_alt", "extracted"].all()
    # (url, text) pairs are unique except for the planted duplicates, which repeat an earlier one
    pairs = gt[gt["extracted"]]
    dup = pairs.duplicated(["url", "text"], keep="first")
    assert (pairs.loc[dup, "noise"] == "duplicate").all()
    assert dup.sum() == (pairs["noise"] == "duplicate").sum()
    en = gt[gt["caption_en"].notna()]
    assert (en["caption_en"].str.split().str[1] == en["colour"]).all()
    assert en.apply(lambda r: f" {r['shape']} " in r["caption_en"], axis=1).all()


def _link_texts(table) -> str:
    # the tables' {n} / {sku} placeholders as a regex
    pats = [re.escape(t).replace(r"\{n\}", r"\d+").replace(r"\{sku\}", r"[\w-]+") for t, _ in table]
    return "^(" + "|".join(pats) + ")$"


def test_each_noise_kind_carries_its_documented_label(small_corpus) -> None:  # noqa: F811
    """The module docstring's rule, kind by kind, on the files as generated."""
    gt = _gt(small_corpus)
    pictured = gt[gt["has_image"] & gt["text"].notna()]
    for kind in ("clean", "relative", "relative_base", "rare", "text_in_image", "near_duplicate"):
        rows = pictured[pictured["noise"] == kind]
        assert len(rows) >= 5 and rows["matches"].all(), kind
    for kind in FALSE_CAPTION_KINDS:
        rows = gt[gt["noise"] == kind]
        assert len(rows) >= 5 and not rows["matches"].any(), kind
    # rare: a shape or colour the demo CLIP never saw, captioned truly
    rare = gt[gt["noise"] == "rare"]
    assert (rare["shape"].isin(RARE_SHAPES) | rare["colour"].isin(list(RARE_COLOURS))).all()
    assert not gt.loc[gt["noise"].isin(["clean", "relative"]), "shape"].isin(RARE_SHAPES).any()
    # partly right: the right object with the wrong colour, or (English) the wrong count
    partly = gt[gt["noise"] == "partly_right"]
    for row in partly.itertuples():
        scene = _scene(row)
        wrong_colour = {
            c
            for colour in COLOURS
            if colour not in (row.colour, scene.bg_colour)
            for c in _captions(Scene(colour, row.shape, row.background, scene.bg_colour))
        }
        counted = {caption(scene, "en", t, n) for t in range(3) for n in range(2, 6)}
        assert row.text in wrong_colour | counted, row.text
    assert partly["text"].str.contains(r"^(?:two|three|four|five) ", case=False).any()
    # generic and page texts come from their tables (product codes included)
    generic = gt.loc[gt["noise"] == "generic", "text"]
    assert generic.str.match(_link_texts(GENERIC_TEXTS)).all()
    assert gt.loc[gt["noise"] == "page_text", "text"].str.match(_link_texts(PAGE_TEXTS)).all()
    # text in the image: a word or price drawn on it, only there
    drawn = gt["rendered_text"].notna()
    assert set(gt.loc[drawn, "noise"]) <= {"text_in_image", "duplicate"}
    assert drawn[gt["noise"] == "text_in_image"].all()


def _thumb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((24, 24)), dtype=float)


def test_near_duplicates_are_jittered_copies_of_their_source(small_corpus) -> None:  # noqa: F811
    gt = _gt(small_corpus)
    near = gt[gt["noise"] == "near_duplicate"].drop_duplicates("image_id")
    assert len(near) >= 3 and near["near_duplicate_of"].notna().all()
    files = {int(p.stem[3:]): p for p in small_corpus.images_dir.rglob("pic*")}
    for row in near.itertuples():
        copy, source = _thumb(files[row.image_id]), _thumb(files[row.near_duplicate_of])
        other = _thumb(files[(row.near_duplicate_of + 1) % len(files)])
        # close to its source, yet not the same bytes (a crop, a rescale, a re-encode)
        assert np.abs(copy - source).mean() < 0.5 * np.abs(copy - other).mean()
        assert files[row.image_id].read_bytes() != files[row.near_duplicate_of].read_bytes()


def test_training_draws_are_unchanged() -> None:
    """The committed demo CLIP was trained on these draws (seed 1234, see its README): the
    corpus's additions (rare concepts, rendered text, counts) must not move them."""
    rng = random.Random("laion-dask-train-1234")  # as train.write_synthetic_shards seeds it
    digest = hashlib.sha256()
    for _ in range(200):
        scene = random_scene(rng)
        draw_scene(scene, (rng.randint(80, 160), rng.randint(80, 160)), rng)
        text = caption(scene, rng.choice(list(LANGUAGES)), rng.randrange(3))
        digest.update(text.encode() + b"\n")
    assert digest.hexdigest() == "d3551f1ba107ce2407257362df06c57420b70a98b2d90d48b689aee22badd822"


def test_noise_proportions_roughly_as_specified(default_corpus) -> None:  # noqa: F811
    gt = _gt(default_corpus)
    assert len(gt) > 3000  # thousands of pairs by default
    shares = gt["noise"].value_counts(normalize=True)
    spec = default_corpus.spec.noise_shares()
    # pages holding relative links are given <base> or a host URL as a whole: judge the two together
    spec["relative"] += spec.pop("relative_base")
    shares["relative"] += shares.pop("relative_base")
    for kind, want in spec.items():
        got = shares.get(kind, 0.0)
        assert abs(got - want) <= max(0.01, 0.3 * want), (kind, got, want)
    langs = gt.drop_duplicates("page_url")["page_language"].value_counts(normalize=True)
    for lang, want in zip(
        default_corpus.spec.languages, default_corpus.spec.language_weights, strict=True
    ):
        assert abs(langs[lang] - want) < 0.06
    # the default corpus carries every language among the matching alt texts
    assert set(gt.loc[gt["matches"], "language"]) == set(LANGUAGES)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="unknown noise"):
        CorpusSpec(noise=(("typo", 0.1),))
    with pytest.raises(ValueError, match="sum"):
        CorpusSpec(noise=(("generic", 0.7), ("mismatched", 0.5)))
    with pytest.raises(ValueError, match="n_images"):
        CorpusSpec(n_pages=100, n_images=5)
    with pytest.raises(ValueError, match="languages"):
        CorpusSpec(languages=("en", "xx"), language_weights=(1, 1))
    assert CorpusSpec().n_images >= 40


def test_needs_a_noai_host(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        generate_corpus(tmp_path, SMALL_SPEC, base_urls=["http://127.0.0.1:9"])


def test_extract_pairs_finds_the_ground_truth_links(small_corpus) -> None:  # noqa: F811
    extract = pytest.importorskip("laion_dask.stages.extract")
    if not hasattr(extract, "extract_pairs"):
        pytest.skip("laion_dask.stages.extract.extract_pairs not available")
    from laion_dask.ground.config import ExtractConfig

    gt = _gt(small_corpus)
    want = gt[gt["extracted"]]
    got = pd.concat(
        [extract.extract_pairs(str(p), ExtractConfig()) for p in small_corpus.wat_files]
    )
    assert len(got) == len(want)
    key = ["page_url", "url", "text"]
    g = got[key].astype(str).sort_values(key).reset_index(drop=True)
    w = want[key].astype(str).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(g, w)


def test_rare_vocabulary_reads_in_every_language() -> None:
    scenes = all_scenes(rare=True)
    rare = [s for s in scenes if s.shape in RARE_SHAPES or s.colour in RARE_COLOURS]
    assert set(all_scenes()) == set(scenes) - set(rare) and rare
    for lang in LANGUAGES:  # every scene its own caption: no two words translate alike
        assert len({caption(s, lang) for s in scenes}) == len(scenes), lang
    assert caption(rare[0], "en", 0, 3).startswith("three ")
    with pytest.raises(ValueError, match="count"):
        caption(rare[0], "de", 0, 3)
