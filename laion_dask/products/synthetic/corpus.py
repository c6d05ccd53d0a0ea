"""A deterministic, Common-Crawl-like demo crawl whose images are served by :mod:`.host`.

``generate_corpus(out_dir, spec, base_urls=...)`` writes::

    out_dir/crawl/CC-MAIN-DEMO-00000.warc.gz       WARC/1.0 response records (HTML pages)
    out_dir/crawl/CC-MAIN-DEMO-00000.warc.wat.gz   WAT metadata records (Envelope ... Links)
    out_dir/images/host{i}/img/...                 the files host ``i`` serves (see ImageHost)
    out_dir/ground_truth.parquet                   one row per <img> link of every page
    out_dir/corpus.json                            spec, base URLs, files and counts

Both crawl files are gzip per record, written with warcio, with fixed dates and record ids
derived from the seed: the same spec, seed and base URLs give byte-identical files.

URL scheme. Image URLs are absolute ``{base_urls[i]}/img/NAME`` (or relative forms that resolve
to them). The caller passes the base URLs of a running
:class:`~laion_dask.faces.demo.host.ImageHost`
(loopback addresses 127.0.0.1, 127.0.0.2, ... on one port), because the port is only known
when serving. Regular images live on every host but the last; the last host answers every
request with ``X-Robots-Tag: noai``. ``corpus.json`` records the base URLs, so a later run can
serve the same corpus again on the same port (or regenerate when that port is taken).

Ground truth has one row per (page, <img> link), in page order, with the noise kind of the link,
whether a real picture is served at its URL (``has_image``) and whether the alt text is a true
caption of that picture (``matches``): precision and recall of a similarity threshold are
measured against ``matches``. Rows with a picture also name what it shows (``shape``,
``colour``, ``background``, ``bg_colour``), any text drawn on it (``rendered_text``) and the
picture it is a near-duplicate of (``near_duplicate_of``), so a labelled set can be held out.

Caption noise, as on the web (default shares of all links in ``DEFAULT_NOISE``), and the rule
that sets ``matches``:

==============  =====  ===========================================================  =======
kind            share  alt text                                                     matches
==============  =====  ===========================================================  =======
clean,          .14    a true caption of the picture (relative*: through a          true
relative*              relative or <base>-resolved src)
rare            .17    a true caption of a rare concept: a shape or colour the      true
                       demo CLIP never saw (``draw.RARE_*``), half of them both
text_in_image   .07    a true caption of a picture with a word or price drawn on    true
                       it ("SALE", "$19.99"); the caption ignores the text
near_duplicate  .03    a true caption of a jittered copy (crop, rescale, re-encode) true
                       of another picture, served at its own URL
partly_right    .09    right object, wrong colour ("a blue circle") or, in          false
                       English, wrong count ("three red circles")
near_miss       .04    one attribute changed: object colour, shape or background   false
mismatched      .07    a true caption of another picture                            false
generic         .06    "image", "photo", "IMG_0423", "SKU 44-1021-B"               false
page_text       .05    the page, not the picture: "Home | Contact us"              false
too_short       .04    "pic", "Bild": dropped by the length rule                   false
==============  =====  ===========================================================  =======

The other kinds exercise the other stages. ``duplicate`` repeats an earlier link, label
included; the rest carry a true caption, so ``matches`` is true exactly when a picture is
served and the link has an alt text: no_alt, data_uri, svg, broken_link (404), oversized,
corrupt_truncated and corrupt_text are false, gif, noai (``X-Robots-Tag: noai``) and tiny true.
With the committed demo CLIP the default corpus's scored pairs have a similarity ROC AUC near
0.87 against ``matches``: clean captions score ~0.94, rare concepts spread over 0.1-0.9,
partly right ones sit near 0.6 and unrelated ones near 0, so a threshold between 0.1 and 0.5
trades recall for precision.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import io
import json
import logging
import random
import struct
import uuid
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from laion_dask.products.synthetic.draw import (
    LANGUAGES,
    Scene,
    caption,
    draw_scene,
    draw_text,
    encode_image,
    near_miss,
    random_scene,
    rare_scene,
)

__all__ = [
    "NOISE_KINDS",
    "DEFAULT_NOISE",
    "FALSE_CAPTION_KINDS",
    "GENERIC_TEXTS",
    "PAGE_TEXTS",
    "SHORT_TEXTS",
    "CorpusSpec",
    "CorpusInfo",
    "generate_corpus",
    "load_corpus_info",
]

log = logging.getLogger(__name__)

# link noise kinds and their default share of all <img> links; "clean" takes the remainder.
# The module docstring says what each alt text is and whether it `matches` its picture.
DEFAULT_NOISE: tuple[tuple[str, float], ...] = (
    ("rare", 0.17),
    ("text_in_image", 0.07),
    ("near_duplicate", 0.03),
    ("partly_right", 0.09),
    ("near_miss", 0.04),
    ("mismatched", 0.07),
    ("generic", 0.06),
    ("page_text", 0.05),
    ("too_short", 0.04),
    ("duplicate", 0.05),  # exact (url, text) of an earlier link on another page
    ("no_alt", 0.02),  # <img> without alt attribute: no pair is extracted
    ("data_uri", 0.02),  # src="data:image/png;base64,..."
    ("relative", 0.04),  # relative src, resolved against the page URL
    ("relative_base", 0.04),  # relative src, resolved against <base href>
    ("svg", 0.015),
    ("gif", 0.015),
    ("broken_link", 0.03),  # 404
    ("noai", 0.04),  # served by the host that sends X-Robots-Tag: noai
    ("oversized", 0.01),  # PNG header claims more pixels than the cap
    ("tiny", 0.02),  # a real picture under 5,000 bytes
    ("corrupt_truncated", 0.01),  # JPEG cut in the middle
    ("corrupt_text", 0.01),  # an HTML error page served as image/jpeg
)
NOISE_KINDS: tuple[str, ...] = ("clean",) + tuple(k for k, _ in DEFAULT_NOISE)
#: kinds whose alt text is not a true caption of the picture (``matches`` is false)
FALSE_CAPTION_KINDS = frozenset(
    {"partly_right", "near_miss", "mismatched", "generic", "page_text", "too_short"}
)

# (text, language or None); all at least 5 characters so they pass the length rule.
# {n}: a number, {sku}: a product code
GENERIC_TEXTS: tuple[tuple[str, str | None], ...] = (
    ("image", "en"),
    ("photo", "en"),
    ("click here", "en"),
    ("thumbnail", "en"),
    ("photo.jpg", None),
    ("IMG_{n}", None),
    ("IMG_{n}.jpg", None),
    ("DSC{n}.JPG", None),
    ("SKU {sku}", None),
    ("Art.-Nr. {sku}", "de"),
    ("Bild anzeigen", "de"),
    ("Vorschaubild", "de"),
    ("cliquez ici", "fr"),
    ("image {n}", "fr"),
    ("Réf. {sku}", "fr"),
    ("imagen", "es"),
    ("haga clic aquí", "es"),
)
# alt texts that describe the page or the shop instead of the picture
PAGE_TEXTS: tuple[tuple[str, str | None], ...] = (
    ("Home | Contact us", "en"),
    ("Summer sale 2024", "en"),
    ("Free shipping on orders over $50", "en"),
    ("Shapes and colours - page {n}", "en"),
    ("Add to cart", "en"),
    ("Startseite | Kontakt", "de"),
    ("Sommerschlussverkauf 2024", "de"),
    ("Accueil | Nous contacter", "fr"),
    ("Soldes d'été 2024", "fr"),
    ("Inicio | Contacto", "es"),
    ("Rebajas de verano 2024", "es"),
)
SHORT_TEXTS: tuple[str, ...] = ("pic", "img", "Bild", "foto", "logo", "ok", "x", "1")
# words and prices drawn onto `text_in_image` pictures
RENDERED_TEXTS: tuple[str, ...] = ("SALE", "NEW", "-50%", "$19.99", "€4,99", "Sold out", "FREE")

# the outcome each noise kind is built to produce downstream (rules drop reason, download status)
_EXPECTED_DROP = {
    "too_short": "text_too_short",
    "duplicate": "duplicate",
    "data_uri": "bad_url_scheme",
    "svg": "blocked_extension",
    "gif": "blocked_extension",
}
_EXPECTED_STATUS = {
    **dict.fromkeys(
        ("clean", "rare", "text_in_image", "near_duplicate", "relative", "relative_base"),
        "success",
    ),
    **dict.fromkeys(FALSE_CAPTION_KINDS - {"too_short"}, "success"),
    "broken_link": "failed_to_download",
    "noai": "disallowed",
    "oversized": "too_large",
    "tiny": "too_small",
    "corrupt_truncated": "failed_to_decode",
    "corrupt_text": "failed_to_decode",
}
_FIXED_DATE = datetime(2024, 5, 18, 1, 58, 10, tzinfo=UTC)
_PAGE_WORDS = {
    "en": ("Gallery", "Shapes and colours", "Home", "Next page"),
    "de": ("Galerie", "Formen und Farben", "Startseite", "Nächste Seite"),
    "fr": ("Galerie", "Formes et couleurs", "Accueil", "Page suivante"),
    "es": ("Galería", "Formas y colores", "Inicio", "Página siguiente"),
}
_SITES = ("shapes-blog", "kunst-ecke", "galerie-formes", "mundo-figuras", "clipart-zone", "pics")
_TLD = {"en": "example.com", "de": "example.de", "fr": "example.fr", "es": "example.es"}


@dataclass(frozen=True, kw_only=True)
class CorpusSpec:
    """How big and how noisy the demo crawl is. The same spec (and base URLs) = the same bytes."""

    n_pages: int = 600
    #: inclusive range of <img> links per page
    images_per_page: tuple[int, int] = (3, 9)
    #: distinct drawn pictures; pages reuse them with different alt texts. None = one per 6
    #: expected links (at least 40): each picture has 12 true captions (4 languages x 3 forms)
    n_images: int | None = None
    #: crawl files (one WAT + one WARC each); pages are split into contiguous chunks
    n_files: int = 4
    seed: int = 0
    languages: tuple[str, ...] = LANGUAGES
    #: page-language weights, same order as ``languages``
    language_weights: tuple[float, ...] = (0.55, 0.15, 0.15, 0.15)
    #: inclusive pixel range for each side of a drawn picture
    image_size: tuple[int, int] = (256, 640)
    formats: tuple[tuple[str, float], ...] = (("JPEG", 0.7), ("PNG", 0.15), ("WEBP", 0.15))
    #: (kind, share of links); ``clean`` takes what is left
    noise: tuple[tuple[str, float], ...] = DEFAULT_NOISE

    def __post_init__(self) -> None:
        for name in ("images_per_page", "image_size", "languages", "language_weights"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "formats", tuple((str(f), float(w)) for f, w in self.formats))
        object.__setattr__(self, "noise", tuple((str(k), float(p)) for k, p in self.noise))
        if self.n_pages < 1 or self.n_files < 1:
            raise ValueError("n_pages and n_files must be >= 1")
        lo, hi = self.images_per_page
        if not 1 <= lo <= hi:
            raise ValueError(f"images_per_page must be (lo, hi) with 1 <= lo <= hi, got {lo, hi}")
        links = self.n_pages * (lo + hi) / 2
        if self.n_images is None:
            object.__setattr__(self, "n_images", max(40, int(links // 6)))
        elif self.n_images < max(2, links / 10):
            # fewer pictures than this runs out of distinct (url, true caption) pairs
            raise ValueError(
                f"n_images must be >= {max(2, int(links / 10))} for "
                f"{self.n_pages} pages of {lo}-{hi} links, got {self.n_images}"
            )
        if not 16 <= self.image_size[0] <= self.image_size[1]:
            raise ValueError(
                f"image_size must be (lo, hi) with 16 <= lo <= hi, got {self.image_size}"
            )
        unknown = set(self.languages) - set(LANGUAGES)
        if unknown or len(self.language_weights) != len(self.languages):
            raise ValueError(f"languages must be among {LANGUAGES}, one weight each")
        bad = [k for k, _ in self.noise if k not in NOISE_KINDS or k == "clean"]
        if bad:
            raise ValueError(f"unknown noise kinds {bad}; known: {NOISE_KINDS[1:]}")
        total = sum(p for _, p in self.noise)
        if any(p < 0 for _, p in self.noise) or total > 1:
            raise ValueError(f"noise shares must be >= 0 and sum to <= 1, got {total}")
        if {f for f, _ in self.formats} - {"JPEG", "PNG", "WEBP"}:
            raise ValueError("formats must be among JPEG, PNG, WEBP")

    def noise_shares(self) -> dict[str, float]:
        """Share of links per noise kind, ``clean`` included (sums to 1)."""
        shares = dict(self.noise)
        return {"clean": max(0.0, 1.0 - sum(shares.values())), **shares}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusSpec:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        for key in ("formats", "noise"):
            if key in data:
                data[key] = tuple(tuple(x) for x in data[key])
        return cls(**data)


@dataclass(frozen=True)
class CorpusInfo:
    """Where a generated corpus lives and what it holds."""

    root: Path
    spec: CorpusSpec
    base_urls: tuple[str, ...]
    wat_files: tuple[Path, ...]
    warc_files: tuple[Path, ...]
    images_dir: Path
    ground_truth: Path
    n_pages: int
    n_links: int
    n_image_files: int
    noise_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary, paths relative to ``root``."""

        def rel(p: Path) -> str:
            return str(Path(p).relative_to(self.root))

        return {
            "spec": self.spec.to_dict(),
            "base_urls": list(self.base_urls),
            "wat_files": [rel(p) for p in self.wat_files],
            "warc_files": [rel(p) for p in self.warc_files],
            "images_dir": rel(self.images_dir),
            "ground_truth": rel(self.ground_truth),
            "n_pages": self.n_pages,
            "n_links": self.n_links,
            "n_image_files": self.n_image_files,
            "noise_counts": dict(self.noise_counts),
        }


def load_corpus_info(out_dir: str | Path) -> CorpusInfo:
    """Read ``out_dir/corpus.json`` back into a :class:`CorpusInfo`."""
    root = Path(out_dir)
    data = json.loads((root / "corpus.json").read_text(encoding="utf-8"))
    return CorpusInfo(
        root=root,
        spec=CorpusSpec.from_dict(data["spec"]),
        base_urls=tuple(data["base_urls"]),
        wat_files=tuple(root / p for p in data["wat_files"]),
        warc_files=tuple(root / p for p in data["warc_files"]),
        images_dir=root / data["images_dir"],
        ground_truth=root / data["ground_truth"],
        n_pages=data["n_pages"],
        n_links=data["n_links"],
        n_image_files=data["n_image_files"],
        noise_counts=data["noise_counts"],
    )


# --- image files --------------------------------------------------------------------------------
@dataclass
class _Image:
    """One served file: where it is, and the picture it shows (if any)."""

    image_id: int
    host: int
    name: str
    scene: Scene | None
    # regular | rare | text_in_image | near_duplicate | noai | tiny | oversized |
    # corrupt_truncated | corrupt_text | svg | gif
    kind: str
    rendered_text: str | None = None  # text drawn on the picture
    source: int | None = None  # the image_id this picture is a near-duplicate of


class _Files:
    def __init__(self, root: Path, base_urls: Sequence[str]) -> None:
        self.root = root
        self.base_urls = list(base_urls)
        self.items: list[_Image] = []

    def url(self, item: _Image) -> str:
        return f"{self.base_urls[item.host]}/img/{item.name}"

    def path(self, item: _Image) -> Path:
        return self.root / f"host{item.host}" / "img" / item.name

    def add(
        self, host: int, ext: str, data: bytes, scene: Scene | None, kind: str, **extra: Any
    ) -> _Image:
        image_id = len(self.items)
        item = _Image(image_id, host, f"pic{image_id:05d}.{ext}", scene, kind, **extra)
        path = self.path(item)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.items.append(item)
        return item


def _png_claiming(width: int, height: int, n_bytes: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels, with a truncated IDAT."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    comp = zlib.compressobj(9)
    idat = comp.compress(b"\x00" * (width * 3 + 1) * 64) + comp.flush(zlib.Z_SYNC_FLUSH)
    idat = (idat * (n_bytes // max(1, len(idat)) + 1))[:n_bytes]
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)


_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256">'
    '<rect width="256" height="256" fill="{bg}"/>'
    '<circle cx="128" cy="128" r="70" fill="{fg}"/></svg>'
)
_ERROR_PAGE = (
    "<!DOCTYPE html><html><head><title>503 Service Unavailable</title></head><body>"
    "<h1>Service Unavailable</h1><p>The server is temporarily unable to service your request "
    "due to maintenance downtime or capacity problems. Please try again later.</p>"
)


def _encode_min(img: Any, fmt: str, rng: random.Random, min_bytes: int = 6_000) -> bytes:
    """Encode ``img``; a flat drawing that compresses under ``min_bytes`` gets a faint grain.

    Real photos are never that small; without this a lossless PNG of a plain background would
    fall under the 5,000-byte rule by accident instead of by design (``tiny``).
    """
    data = encode_image(img, fmt)
    if len(data) >= min_bytes:
        return data
    arr = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(arr.shape[:2])
    for amplitude in (2, 4, 8, 16):  # lossy codecs smooth faint grain away: raise it until it shows
        grained = np.clip(arr + (noise * amplitude).astype(np.int16)[..., None], 0, 255)
        data = encode_image(Image.fromarray(grained.astype(np.uint8)), fmt)
        if len(data) >= min_bytes:
            break
    return data


def _jittered(path: Path, rng: random.Random, bounds: tuple[int, int]) -> Image.Image:
    """A near-duplicate of the picture at ``path``: cropped by a few percent, rescaled and
    brightened or darkened a little, as a re-upload of the same photo is."""
    with Image.open(path) as im:
        img = im.convert("RGB")
    w, h = img.size
    box = [round(rng.uniform(0, 0.05) * v) for v in (w, h)]
    box += [w - round(rng.uniform(0, 0.05) * w), h - round(rng.uniform(0, 0.05) * h)]
    scale = rng.uniform(0.85, 1.15)
    lo, hi = bounds
    img = img.crop(tuple(box)).resize(tuple(min(hi, max(lo, int(v * scale))) for v in (w, h)))
    gain = rng.uniform(0.9, 1.1)
    return img.point([min(255, int(v * gain)) for v in range(256)] * 3)


def _draw_files(
    root: Path, spec: CorpusSpec, base_urls: Sequence[str], rng: random.Random
) -> _Files:
    files = _Files(root, base_urls)
    regular_hosts = list(range(len(base_urls) - 1))
    noai_host = len(base_urls) - 1
    lo, hi = spec.image_size
    fmts, fweights = zip(*spec.formats, strict=True)
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

    def picture(size: tuple[int, int] | None = None, draw: Any = random_scene) -> tuple[Scene, Any]:
        scene = draw(rng)
        size = size or (rng.randint(lo, hi), rng.randint(lo, hi))
        return scene, draw_scene(scene, size, rng)

    def add_regular(i: int, kind: str, scene: Scene, img: Any, **extra: Any) -> None:
        fmt = rng.choices(fmts, fweights)[0]
        host = regular_hosts[i % len(regular_hosts)]
        files.add(host, ext[fmt], _encode_min(img, fmt, rng), scene, kind, **extra)

    n_images = int(spec.n_images or 0)  # resolved by CorpusSpec
    for i in range(n_images):
        add_regular(i, "regular", *picture())
    regular = list(files.items)
    # the pictures of the kinds that have their own (rare, ...): about 4 links each
    shares = spec.noise_shares()
    links = spec.n_pages * sum(spec.images_per_page) / 2

    def pool_size(kind: str) -> int:
        return max(4, round(links * shares.get(kind, 0) / 4)) if shares.get(kind) else 0

    for i in range(pool_size("rare")):
        add_regular(i, "rare", *picture(draw=rare_scene))
    for i in range(pool_size("text_in_image")):
        scene, img = picture()
        text = rng.choice(RENDERED_TEXTS)
        add_regular(i, "text_in_image", scene, draw_text(img, text, rng), rendered_text=text)
    for i in range(pool_size("near_duplicate")):
        src = rng.choice(regular)
        add_regular(
            i,
            "near_duplicate",
            src.scene,
            _jittered(files.path(src), rng, (lo, hi)),
            source=src.image_id,
        )
    for _ in range(max(3, n_images // 20)):
        scene, img = picture()
        files.add(noai_host, "jpg", _encode_min(img, "JPEG", rng), scene, "noai")
    for i in range(max(3, n_images // 40)):
        scene, img = picture((rng.randint(32, 56), rng.randint(32, 56)))
        files.add(
            regular_hosts[i % len(regular_hosts)],
            "jpg",
            encode_image(img, "JPEG", 70),
            scene,
            "tiny",
        )
    for i, dims in enumerate(
        [(20_000, 20_000), (12_000, 9_000), (30_000, 4_000), (16_000, 16_000)]
    ):
        data = _png_claiming(*dims, n_bytes=6_000 + 500 * i)
        files.add(regular_hosts[i % len(regular_hosts)], "png", data, None, "oversized")
    for i in range(4):
        scene, img = picture((rng.randint(320, hi), rng.randint(320, hi)))
        # 3/5 of it must stay over the 5,000-byte rule, or the downloader says too_small first
        data = _encode_min(img, "JPEG", rng, min_bytes=10_000)
        files.add(
            regular_hosts[i % len(regular_hosts)],
            "jpg",
            data[: len(data) * 3 // 5],
            None,
            "corrupt_truncated",
        )
    for i in range(3):
        text = _ERROR_PAGE + "<!-- " + "padding " * 700 + f"{i} --></body></html>"
        files.add(regular_hosts[i % len(regular_hosts)], "jpg", text.encode(), None, "corrupt_text")
    colours = ["#d62323", "#28a532", "#2346d7", "#f0d723"]
    for i in range(4):
        svg = _SVG.format(bg=colours[i], fg=colours[(i + 1) % 4]).encode()
        files.add(regular_hosts[i % len(regular_hosts)], "svg", svg, None, "svg")
    for i in range(4):
        scene, img = picture((rng.randint(lo, hi), rng.randint(lo, hi)))
        files.add(
            regular_hosts[i % len(regular_hosts)], "gif", _encode_min(img, "GIF", rng), scene, "gif"
        )
    return files


# --- pages --------------------------------------------------------------------------------------
@dataclass
class _Link:
    src: str | None  # as written in HTML; None only never (every <img> has a src)
    url: str  # absolute, as an extractor should resolve it (data: URIs as they are)
    text: str | None  # alt attribute; None = no alt attribute
    caption: str | None  # true caption of the picture at url (page language), if any
    caption_en: str | None
    language: str | None  # language of ``text``
    noise: str
    image: _Image | None
    matches: bool


def _data_uri(rng: random.Random) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (rng.randrange(256), 0, 0)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class _PageMaker:
    def __init__(self, spec: CorpusSpec, files: _Files, rng: random.Random) -> None:
        self.spec, self.files, self.rng = spec, files, rng
        by_kind: dict[str, list[_Image]] = {}
        for item in files.items:
            by_kind.setdefault(item.kind, []).append(item)
        self.by_kind = by_kind
        self.seen: set[tuple[str, str]] = set()
        self.originals: list[_Link] = []  # candidates for exact duplicates
        self.kinds = list(spec.noise_shares())
        self.weights = list(spec.noise_shares().values())

    def caption_of(self, scene: Scene, lang: str) -> str:
        return caption(scene, lang, self.rng.randrange(3))

    def _unique(self, make: Any) -> tuple[_Image, str, str | None] | None:
        # draw (image, text) until the (url, text) pair is new: only `duplicate` repeats one
        for _ in range(50):
            item, text, lang = make()
            if (self.files.url(item), text) not in self.seen:
                return item, text, lang
        return None

    def _text_maker(self, kind: str, pool: list[_Image]) -> Any:
        """``make(language) -> (picture, alt text, its language)`` for links of ``kind``."""
        rng, regular = self.rng, self.by_kind["regular"]

        def fill(text: str) -> str:
            sku = f"{rng.randint(10, 99)}-{rng.randint(1000, 9999)}-{rng.choice('ABCK')}"
            return text.format(n=rng.randint(1000, 9999), sku=sku)

        def true_text(tl: str) -> tuple[_Image, str, str | None]:
            item = rng.choice(pool)
            # oversized / corrupt / svg have no scene: a plausible caption of nothing
            return item, self.caption_of(item.scene or random_scene(rng), tl), tl

        def other_text(tl: str) -> tuple[_Image, str, str | None]:
            item, other = rng.choice(pool), rng.choice(regular)
            while other.scene is None or item.scene is None or other.scene.key == item.scene.key:
                other = rng.choice(regular)
            return item, self.caption_of(other.scene, tl), tl

        def near_text(tl: str) -> tuple[_Image, str, str | None]:
            item = rng.choice(pool)
            assert item.scene is not None  # pool: regular pictures
            return item, self.caption_of(near_miss(item.scene, rng), tl), tl

        def partly_text(tl: str) -> tuple[_Image, str, str | None]:
            # right object; its colour wrong, or (English has the plural forms) its count
            item = rng.choice(pool)
            assert item.scene is not None
            if tl == "en" and rng.random() < 0.5:
                return item, caption(item.scene, tl, rng.randrange(3), rng.randint(2, 5)), tl
            return item, self.caption_of(near_miss(item.scene, rng, "colour"), tl), tl

        def table_text(table: Sequence[tuple[str, str | None]]) -> Any:
            def make(tl: str) -> tuple[_Image, str, str | None]:
                text, tlang = rng.choice(table)
                return rng.choice(pool), fill(text), tlang

            return make

        makers = {
            "mismatched": other_text,
            "near_miss": near_text,
            "partly_right": partly_text,
            "generic": table_text(GENERIC_TEXTS),
            "page_text": table_text(PAGE_TEXTS),
            "too_short": lambda tl: (rng.choice(pool), rng.choice(SHORT_TEXTS), None),
        }
        return makers.get(kind, true_text)

    def link(self, kind: str, lang: str, page_host: int | None) -> _Link:
        rng = self.rng
        if kind == "duplicate":
            if self.originals:
                orig = rng.choice(self.originals)
                return dataclasses.replace(orig, noise="duplicate")
            kind = "clean"
        if kind in ("relative", "relative_base"):
            pool = [i for i in self.by_kind["regular"] if i.host == page_host]
        else:  # a kind with its own files (rare, noai, tiny, ...) links to those
            pool = self.by_kind.get(kind, self.by_kind["regular"])
        make = self._text_maker(kind, pool)
        picked = self._unique(lambda: make(lang))
        if picked is None and kind not in ("generic", "too_short", "page_text"):
            # this language's captions of the pool are used up: pages mix languages anyway
            for other_lang in rng.sample(self.spec.languages, len(self.spec.languages)):
                if other_lang != lang:
                    picked = self._unique(lambda ol=other_lang: make(ol))
                    if picked is not None:
                        break
        if picked is None:  # the vocabulary ran out of new pairs for this pool: fall back
            return (
                self.link("clean", lang, page_host) if kind != "clean" else self._fresh_clean(lang)
            )
        item, text, tlang = picked
        url = self.files.url(item)
        src = url
        if kind == "broken_link":
            url = src = (
                f"{self.files.base_urls[item.host]}/img/missing-{rng.randrange(10**8):08d}.jpg"
            )
        elif kind == "data_uri":
            url = src = _data_uri(rng)
        elif kind in ("relative", "relative_base"):
            src = rng.choice([f"../img/{item.name}", f"/img/{item.name}"])
            if kind == "relative" and rng.random() < 0.3:  # protocol-relative
                src = "//" + url.split("://", 1)[1]
        has_image = item.scene is not None and kind not in ("broken_link", "data_uri")
        is_true = kind not in FALSE_CAPTION_KINDS
        link = _Link(
            src=src,
            url=url,
            text=None if kind == "no_alt" else text,
            caption=self.caption_of(item.scene, tlang or lang)
            if has_image and item.scene
            else None,
            caption_en=caption(item.scene, "en") if has_image and item.scene else None,
            language=None if kind == "no_alt" else tlang,
            noise=kind,
            image=item if kind not in ("broken_link", "data_uri") else None,
            matches=bool(has_image and is_true and kind != "no_alt"),
        )
        if is_true and has_image and link.text is not None:
            link.caption = text  # the alt text itself is a true caption
        if link.text is not None:
            self.seen.add((url, link.text))
            if kind in ("clean", "mismatched", "generic", "noai"):
                self.originals.append(link)
        return link

    def _fresh_clean(self, lang: str) -> _Link:
        raise RuntimeError(
            "the demo vocabulary ran out of unique (url, text) pairs: "
            "raise n_images or lower n_pages"
        )


def _page_html(
    title: str,
    lang: str,
    words: tuple[str, ...],
    base: str | None,
    links: list[_Link],
    extra: list[tuple[str, str]],
) -> bytes:
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="{lang}"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
    ]
    if base:
        parts.append(f'<base href="{html.escape(base)}">')
    parts.append(f'</head><body><h1>{html.escape(words[1])}</h1><div class="gallery">')
    for link in links:
        alt = "" if link.text is None else f' alt="{html.escape(link.text)}"'
        parts.append(f'<figure><img src="{html.escape(link.src or "")}"{alt}></figure>')
    parts.append("</div><nav>")
    for href, text in extra:
        parts.append(f'<a href="{html.escape(href)}">{html.escape(text)}</a>')
    parts.append("</nav></body></html>\n")
    return "\n".join(parts).encode("utf-8")


def _wat_json(
    warc_name: str,
    offset: int,
    length: int,
    rec_headers: list[tuple[str, str]],
    http_headers: list[tuple[str, str]],
    body: bytes,
    title: str,
    base: str | None,
    links: list[_Link],
    extra: list[tuple[str, str]],
) -> dict[str, Any]:
    """The WAT JSON of one response record, laid out as Common Crawl's ia-web-commons writes it."""
    head: dict[str, Any] = {"Title": title}
    if base:
        head["Base"] = base
    head["Metas"] = [{"name": "viewport", "content": "width=device-width"}]
    wat_links: list[dict[str, str]] = []
    for link in links:
        entry = {"path": "IMG@/src", "url": link.src or ""}
        if link.text is not None:
            entry["alt"] = link.text
        wat_links.append(entry)
    wat_links += [{"path": "A@/href", "url": href, "text": text} for href, text in extra]
    digest = "sha1:" + base64.b32encode(hashlib.sha1(body).digest()).decode()
    header_text = "".join(f"{k}: {v}\r\n" for k, v in http_headers)
    return {
        "Container": {
            "Filename": warc_name,
            "Compressed": True,
            "Offset": str(offset),
            "Gzip-Metadata": {
                "Header-Length": "10",
                "Footer-Length": "8",
                "Deflate-Length": str(length - 18),
            },
        },
        "Envelope": {
            "Format": "WARC",
            "WARC-Header-Length": str(sum(len(k) + len(v) + 4 for k, v in rec_headers)),
            "WARC-Header-Metadata": dict(rec_headers),
            "Payload-Metadata": {
                "Actual-Content-Type": "application/http; msgtype=response",
                "HTTP-Response-Metadata": {
                    "Response-Message": {"Version": "HTTP/1.1", "Status": "200", "Reason": "OK"},
                    "Headers": dict(http_headers),
                    "Headers-Length": str(len(header_text) + 19),
                    "Entity-Length": str(len(body)),
                    "Entity-Digest": digest,
                    "HTML-Metadata": {"Head": head, "Links": wat_links},
                },
                "Trailing-Slop-Length": "4",
            },
        },
    }


def generate_corpus(
    out_dir: str | Path, spec: CorpusSpec, *, base_urls: Sequence[str]
) -> CorpusInfo:
    """Write the demo crawl, its image files and the ground truth under ``out_dir``.

    Parameters
    ----------
    out_dir
        Folder to write (created; files of an earlier corpus there are overwritten).
    spec
        Size, languages and noise shares.
    base_urls
        ``http://HOST:PORT`` of each image host (at least 2; the last one is the noai host),
        usually ``ImageHost(...).base_urls``.

    Returns
    -------
    CorpusInfo
        Paths and counts; the same is written to ``out_dir/corpus.json``.

    Example
    -------
    >>> with ImageHost(tmp / "images") as host:                      # doctest: +SKIP
    ...     info = generate_corpus(tmp, CorpusSpec(n_pages=20), base_urls=host.base_urls)
    """
    base_urls = [u.rstrip("/") for u in base_urls]
    if len(base_urls) < 2:
        raise ValueError(
            "generate_corpus needs at least 2 base URLs (the last one is the noai host)"
        )
    root = Path(out_dir)
    crawl_dir, images_dir = root / "crawl", root / "images"
    crawl_dir.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"laion-dask-demo-{spec.seed}")
    id_rng = random.Random(f"laion-dask-demo-ids-{spec.seed}")

    def record_id() -> str:
        return f"<urn:uuid:{uuid.UUID(int=id_rng.getrandbits(128), version=4)}>"

    files = _draw_files(images_dir, spec, base_urls, rng)
    maker = _PageMaker(spec, files, rng)
    regular_hosts = list(range(len(base_urls) - 1))
    rows: list[dict[str, Any]] = []
    wat_paths, warc_paths = [], []
    page_index = 0
    for file_index in range(spec.n_files):
        n_here = (
            spec.n_pages * (file_index + 1) // spec.n_files
            - spec.n_pages * file_index // spec.n_files
        )
        stem = f"CC-MAIN-DEMO-{spec.seed:04d}-{file_index:05d}"
        warc_name, wat_name = f"{stem}.warc.gz", f"{stem}.warc.wat.gz"
        warc_paths.append(crawl_dir / warc_name)
        wat_paths.append(crawl_dir / wat_name)
        with (
            (crawl_dir / warc_name).open("wb") as warc_fh,
            (crawl_dir / wat_name).open("wb") as wat_fh,
        ):
            warc, wat = WARCWriter(warc_fh, gzip=True), WARCWriter(wat_fh, gzip=True)
            for writer, name in ((warc, warc_name), (wat, wat_name)):
                warcinfo = (
                    "software: laion-dask demo corpus\r\n"
                    f"format: WARC File Format 1.0\r\nseed: {spec.seed}\r\n"
                )
                writer.write_record(
                    writer.create_warc_record(
                        "",
                        "warcinfo",
                        payload=io.BytesIO(warcinfo.encode()),
                        length=len(warcinfo.encode()),
                        warc_content_type="application/warc-fields",
                        warc_headers_dict={
                            "WARC-Date": _iso(_FIXED_DATE),
                            "WARC-Filename": name,
                            "WARC-Record-ID": record_id(),
                        },
                    )
                )
            for _ in range(n_here):
                rows += _write_page(
                    page_index,
                    spec,
                    maker,
                    base_urls,
                    regular_hosts,
                    warc,
                    wat,
                    warc_fh,
                    warc_name,
                    wat_name,
                    record_id,
                )
                page_index += 1
    gt = pd.DataFrame(rows)
    gt = gt.astype({c: "string" for c in _STRING_COLS}).astype(
        {
            "page_index": "int32",
            "link_index": "int32",
            "image_id": "Int32",
            "host": "Int32",
            "near_duplicate_of": "Int32",
            "has_image": "bool",
            "matches": "bool",
            "extracted": "bool",
        }
    )
    gt.to_parquet(root / "ground_truth.parquet", index=False)
    info = CorpusInfo(
        root=root,
        spec=spec,
        base_urls=tuple(base_urls),
        wat_files=tuple(wat_paths),
        warc_files=tuple(warc_paths),
        images_dir=images_dir,
        ground_truth=root / "ground_truth.parquet",
        n_pages=spec.n_pages,
        n_links=len(gt),
        n_image_files=len(files.items),
        noise_counts=dict(sorted(Counter(gt["noise"]).items())),
    )
    (root / "corpus.json").write_text(json.dumps(info.to_dict(), indent=2) + "\n", encoding="utf-8")
    log.info(
        "demo corpus: %d pages, %d links, %d image files in %s",
        spec.n_pages,
        len(gt),
        len(files.items),
        root,
    )
    return info


_STRING_COLS = (
    "source_file",
    "warc_file",
    "page_url",
    "page_language",
    "src",
    "url",
    "text",
    "caption",
    "caption_en",
    "language",
    "noise",
    "shape",
    "colour",
    "background",
    "bg_colour",
    "rendered_text",
    "expected_drop_reason",
    "expected_status",
)


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_page(
    page_index: int,
    spec: CorpusSpec,
    maker: _PageMaker,
    base_urls: list[str],
    regular_hosts: list[int],
    warc: WARCWriter,
    wat: WARCWriter,
    warc_fh: Any,
    warc_name: str,
    wat_name: str,
    record_id: Any,
) -> list[dict[str, Any]]:
    rng = maker.rng
    lang = rng.choices(spec.languages, spec.language_weights)[0]
    n_links = rng.randint(*spec.images_per_page)
    kinds = rng.choices(maker.kinds, maker.weights, k=n_links)
    # a page with relative links is either served by an image host or has a <base> there
    host = rng.choice(regular_hosts)
    base = f"{base_urls[host]}/gallery/" if "relative_base" in kinds else None
    if base:
        kinds = ["relative_base" if k == "relative" else k for k in kinds]
    if "relative" in kinds:
        page_url = f"{base_urls[host]}/pages/p{page_index:05d}.html"
    else:
        site = rng.choice(_SITES)
        page_url = (
            f"http://www.{site}-{page_index % 37}.{_TLD[lang]}/{lang}/gallery/{page_index:05d}.html"
        )
    links = [maker.link(k, lang, host) for k in kinds]
    words = _PAGE_WORDS[lang]
    title = f"{words[0]} {page_index}"
    extra = [("/", words[2]), (f"{page_index + 1:05d}.html", words[3])]
    body = _page_html(title, lang, words, base, links, extra)
    date = _iso(_FIXED_DATE + timedelta(seconds=7 * page_index))
    http_headers = [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Server", "nginx"),
    ]
    resp_id = record_id()
    rec = warc.create_warc_record(
        page_url,
        "response",
        payload=io.BytesIO(body),
        length=len(body),
        http_headers=StatusAndHeaders("200 OK", http_headers, protocol="HTTP/1.1"),
        warc_headers_dict={
            "WARC-Date": date,
            "WARC-Record-ID": resp_id,
            "WARC-IP-Address": "127.0.0.1",
        },
    )
    offset = warc_fh.tell()
    warc.write_record(rec)
    length = warc_fh.tell() - offset
    meta = _wat_json(
        warc_name,
        offset,
        length,
        rec.rec_headers.headers,
        http_headers,
        body,
        title,
        base,
        links,
        extra,
    )
    payload = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    wat.write_record(
        wat.create_warc_record(
            page_url,
            "metadata",
            payload=io.BytesIO(payload),
            length=len(payload),
            warc_content_type="application/json",
            warc_headers_dict={
                "WARC-Date": date,
                "WARC-Record-ID": record_id(),
                "WARC-Refers-To": resp_id,
            },
        )
    )
    rows = []
    for i, link in enumerate(links):
        shown = link.image.scene if link.image else None
        rows.append(
            {
                "source_file": wat_name,
                "warc_file": warc_name,
                "page_index": page_index,
                "page_url": page_url,
                "page_language": lang,
                "link_index": i,
                "src": link.src,
                "url": link.url,
                "text": link.text,
                "caption": link.caption,
                "caption_en": link.caption_en,
                "language": link.language,
                "noise": link.noise,
                "image_id": link.image.image_id if link.image else None,
                "host": link.image.host if link.image else None,
                "has_image": shown is not None,
                # what the picture shows: the labels of a held-out set
                "shape": shown and shown.shape,
                "colour": shown and shown.colour,
                "background": shown and shown.background,
                "bg_colour": shown and shown.bg_colour,
                "rendered_text": link.image and link.image.rendered_text,
                "near_duplicate_of": link.image and link.image.source,
                "matches": link.matches,
                "extracted": link.text is not None,
                "expected_drop_reason": _EXPECTED_DROP.get(link.noise),
                "expected_status": _EXPECTED_STATUS.get(link.noise),
            }
        )
    return rows
