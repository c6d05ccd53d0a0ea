"""Our robots.txt matcher (stages/consent.py) against protego, the one Scrapy uses.

Two things decide which one the downloader runs, and this script measures both:

* the RFC 9309 cases of tests/test_consent.py, asked of protego through its public API
  (``Protego.parse(text).can_fetch(url, token)``): which it gets wrong;
* speed: parse one robots.txt of ``--rules`` rules (10 % with ``*``/``$``, 30 % Allow) and
  match ``--urls`` URL paths against it, and the same for a 50-rule file (a typical site).

    pip install protego && nice -n 10 .venv/bin/python benchmarks/bench_robots.py
    .venv/bin/python benchmarks/bench_robots.py --rules 1000 --urls 1000

Writes ``benchmarks/results/robots.json``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from _results import save

from laion_dask.stages.consent import parse_robots_txt

try:
    from protego import Protego
except ImportError:
    sys.exit("bench_robots: protego is not installed (pip install protego)")

TOKEN = "laion-dask"
#: (what the case checks, robots.txt, path, allowed for TOKEN) from tests/test_consent.py
CASES = [
    (
        "a version after the product token (User-agent: LAION-Dask/2.0) names our group",
        "User-agent: LAION-Dask/2.0\nDisallow: /nope\n\nUser-agent: *\nDisallow: /private\n",
        "/nope/a.jpg",
        False,
    ),
    (
        "a UTF-8 byte order mark before the first line",
        "\ufeffUser-agent: *\r\nDisallow: /x\r\n",
        "/x/y",
        False,
    ),
    (
        "another crawler's prefix (User-agent: laion) does not name laion-dask",
        "User-agent: laion\nAllow: /\n\nUser-agent: *\nDisallow: /\n",
        "/a.jpg",
        False,
    ),
    (
        "groups naming our token are merged",
        "User-agent: laion-dask\nDisallow: /a\n\nUser-agent: laion-dask\nDisallow: /b\n",
        "/b/x",
        False,
    ),
    (
        "the longest rule wins",
        "User-agent: *\nDisallow: /img/\nAllow: /img/pub/\n",
        "/img/pub/a",
        True,
    ),
    ("Allow wins a tie", "User-agent: *\nAllow: /same\nDisallow: /same\n", "/same/x", True),
    ("* and $", "User-agent: *\nDisallow: /*.png$\n", "/p/a.png?size=2", True),
    ("%7E is ~", "User-agent: *\nDisallow: /%7Eimages/\n", "/~images/a.jpg", False),
    ("lower-case hex", "User-agent: *\nDisallow: /%E3%83%84/\n", "/%e3%83%84/a.jpg", False),
    ("non-ASCII patterns", "User-agent: *\nDisallow: /ツ/\n", "/%E3%83%84/a.jpg", False),
]


def rfc_cases() -> dict:
    out = {}
    for name, text, path, allowed in CASES:
        ours = parse_robots_txt(text, TOKEN).decide(path)[0]
        theirs = Protego.parse(text).can_fetch("http://h.test" + path, TOKEN)
        assert ours == allowed, f"ours fails: {name}"
        out[name] = "pass" if theirs == allowed else "FAIL"
    return out


def _robots(rng: random.Random, rules: int) -> str:
    words = ["img", "photos", "a", "b", "private", "cdn", "thumbs", "x", "search", "tmp"]

    def path(k: int) -> str:
        return "/" + "/".join(rng.choice(words) for _ in range(k))

    lines = ["User-agent: *"]
    for i in range(rules):
        p, r = path(rng.randint(1, 4)), rng.random()
        p += "*.png$" if r < 0.1 else "*q=" if r < 0.2 else ""
        lines.append(("Allow: " if rng.random() < 0.3 else "Disallow: ") + p + str(i % 97))
    return "\n".join(lines)


def speed(rules: int, urls: int) -> dict:
    rng = random.Random(0)
    text = _robots(rng, rules)
    words = ["img", "photos", "a", "b", "private", "cdn", "thumbs", "x", "search", "tmp"]
    paths = [
        "/"
        + "/".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        + rng.choice(["", ".png", "?q=1"])
        for _ in range(urls)
    ]
    t = time.perf_counter()
    ours = parse_robots_txt(text, TOKEN)
    parse_ours = time.perf_counter() - t
    t = time.perf_counter()
    a = [ours.decide(p)[0] for p in paths]
    match_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = Protego.parse(text)
    parse_theirs = time.perf_counter() - t
    t = time.perf_counter()
    b = [theirs.can_fetch("http://h.test" + p, TOKEN) for p in paths]
    match_theirs = time.perf_counter() - t
    return {
        "rules": rules,
        "urls": urls,
        "ours_parse_ms": round(parse_ours * 1e3, 2),
        "ours_match_us_per_url": round(match_ours / urls * 1e6, 1),
        "protego_parse_ms": round(parse_theirs * 1e3, 2),
        "protego_match_us_per_url": round(match_theirs / urls * 1e6, 1),
        "same_answers": sum(x == y for x, y in zip(a, b, strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=10_000)
    ap.add_argument("--urls", type=int, default=10_000)
    args = ap.parse_args()
    figures = {
        "rfc9309_cases_protego": rfc_cases(),
        "large": speed(args.rules, args.urls),
        "typical": speed(50, args.urls),
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    save(
        "robots", figures=figures, summary="stages/consent.py's robots.txt matcher against protego"
    )


if __name__ == "__main__":
    main()
