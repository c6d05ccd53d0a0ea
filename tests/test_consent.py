"""Consent and safety at download time: robots.txt (RFC 9309), TDMRep, the tdm-reservation
header, domain opt-out lists and hash blocklists, against a real loopback HTTP server and through
the pipeline's download stage on a real distributed cluster."""

from __future__ import annotations

import glob
import hashlib
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import (
    ConfigError,
    ConsentConfig,
    PipelineConfig,
    config_from_dict,
    dump_config,
    load_config,
)
from laion_dask.ground.shards import iter_shard
from laion_dask.orchestration.pipeline import run_download, run_extract
from laion_dask.orchestration.rundir import RunDir
from laion_dask.products.stats import check_funnel, consent_summary, funnel
from laion_dask.stages.consent import (
    HostFile,
    HostFileCache,
    RobotsRules,
    _journal_of,
    load_lists,
    normalize_path,
    parse_robots_txt,
    parse_tdmrep,
    pattern_matches,
)
from laion_dask.stages.download import download_images, download_stats, is_transient
from tests.helpers.extract import make_wat, wat_payload
from tests.helpers.imagehost import ImageHost, noise_image, serve_images

TOKEN = "laion-dask"
FAST = dict(
    allow_private_networks=True,
    connect_timeout=1.0,
    read_timeout=1.0,
    deadline=3.0,
    retries=0,
)


def _dl(**kw: object):  # noqa: ANN202
    from laion_dask.ground.config import DownloadConfig

    return DownloadConfig(**(FAST | kw))


def _frame(urls: list[str]) -> pd.DataFrame:
    n = len(urls)
    return pd.DataFrame(
        {
            schema.UID: pd.array([f"u{i}" for i in range(n)], dtype="string"),
            schema.URL: pd.array(urls, dtype="string"),
            schema.TEXT: pd.array([f"caption {i}" for i in range(n)], dtype="string"),
            schema.DROP_REASON: pd.array([None] * n, dtype="string"),
        }
    )


@pytest.fixture
def host() -> Iterator[ImageHost]:
    with serve_images() as h:
        yield h


def _jpeg(seed: int) -> bytes:
    return noise_image(200, 150, "JPEG", seed=seed, quality=90)


def _statuses(out: pd.DataFrame) -> list[str]:
    return out[schema.STATUS].astype(str).tolist()


# --- robots.txt parsing (RFC 9309) --------------------------------------------------------------


def test_robots_groups_pick_our_token_then_star() -> None:
    text = """
    # a comment line
    Disallow: /before-any-group        # belongs to no group: ignored
    User-agent: otherbot
    Disallow: /

    User-agent: *
    Disallow: /private
    Disallow: /tmp

    User-agent: LAION-Dask/2.0          # product token, any case, version ignored
    User-agent: somebot
    Disallow: /nope
    Sitemap: https://example.com/sitemap.xml   # no effect on groups
    Allow: /nope/but-this

    user-agent: laion-dask              # a second group for us: merged with the first
    disallow: /also-not
    """
    ours = parse_robots_txt(text, TOKEN)
    assert ours.group == TOKEN
    assert ours.decide("/private/a.jpg") == (True, None)  # the * group does not apply to us
    assert ours.decide("/nope/a.jpg") == (False, "Disallow: /nope")
    assert ours.decide("/nope/but-this/a.jpg") == (True, "Allow: /nope/but-this")
    assert ours.decide("/also-not/x") == (False, "Disallow: /also-not")
    assert ours.decide("/before-any-group") == (True, None)
    # another crawler falls back to *, and the otherbot group binds only otherbot
    star = parse_robots_txt(text, "mybot")
    assert star.group == "*"
    assert star.decide("/private/a.jpg")[0] is False
    assert star.decide("/public/a.jpg")[0] is True
    assert parse_robots_txt(text, "otherbot").decide("/anything")[0] is False
    # a product token is matched whole: another crawler's prefix of ours does not name us
    prefix = parse_robots_txt("User-agent: laion\nAllow: /\n\nUser-agent: *\nDisallow: /\n", TOKEN)
    assert prefix.group == "*" and prefix.decide("/a.jpg") == (False, "Disallow: /")
    # no group for us and no *: everything allowed
    assert parse_robots_txt("User-agent: otherbot\nDisallow: /\n", TOKEN) == RobotsRules("", ())


def test_robots_longest_match_allow_wins_ties_and_wildcards() -> None:
    text = """User-agent: *
    Disallow: /img/
    Allow: /img/public/
    Disallow: /img/public/secret
    Allow: /same
    Disallow: /same
    Disallow: /*.png$
    Disallow: /search*q=
    Disallow: /exact$
    Disallow:
    """
    r = parse_robots_txt(text, TOKEN)
    cases = {
        "/img/a.jpg": False,
        "/img/public/a.jpg": True,  # longer Allow beats shorter Disallow
        "/img/public/secret/a.jpg": False,  # longer Disallow beats that Allow
        "/same/x": True,  # equal length: Allow wins
        "/pics/a.png": False,  # * and $
        "/pics/a.png?size=2": True,  # $ anchors the end, query included in the path
        "/pics/a.jpg": True,
        "/search/x?q=cats": False,
        "/exact": False,
        "/exact/more": True,
        "/": True,  # the empty Disallow is no rule
    }
    got = {p: r.decide(p)[0] for p in cases}
    assert got == cases


def test_robots_percent_encoding_is_normalised() -> None:
    assert normalize_path("/%7euser/%e3%83%84/ツ/a b") == "/~user/%E3%83%84/%E3%83%84/a%20b"
    r = parse_robots_txt("User-agent: *\nDisallow: /%7Eimages/\nDisallow: /ツ/\n", TOKEN)
    assert r.decide("/~images/a.jpg")[0] is False
    assert r.decide("/%7eimages/a.jpg")[0] is False
    assert r.decide("/%E3%83%84/a.jpg")[0] is False
    assert r.decide("/%e3%83%84/a.jpg")[0] is False
    assert r.decide("/images/a.jpg")[0] is True
    # many wildcards against a long path: linear, never catastrophic backtracking
    assert not pattern_matches("/" + "*a" * 30 + "b$", "/" + "a" * 5000)
    assert pattern_matches("/*a*b*c", "/xaybzc/rest")


def test_pattern_matching_equals_a_regex_oracle_on_random_patterns() -> None:
    # the RFC's rule as a regular expression: * is any run, a final $ ends the path, else a prefix
    def oracle(pattern: str, path: str) -> bool:
        anchored = pattern.endswith("$")
        body = ".*".join(re.escape(p) for p in (pattern[:-1] if anchored else pattern).split("*"))
        return re.fullmatch(body + ("" if anchored else ".*"), path, re.DOTALL) is not None

    rng = random.Random(9)
    for _ in range(20_000):
        pattern = "/" + "".join(rng.choice("ab*$/") for _ in range(rng.randint(0, 6)))
        path = "/" + "".join(rng.choice("ab$/") for _ in range(rng.randint(0, 8)))
        assert pattern_matches(pattern, path) == oracle(pattern, path), (pattern, path)
    # precedence over many rules equals the longest-match rule computed the slow way
    for _ in range(300):
        rules = tuple(
            (
                rng.random() < 0.4,
                "/" + "".join(rng.choice("ab*/") for _ in range(rng.randint(0, 4))),
            )
            for _ in range(rng.randint(1, 12))
        )
        path = "/" + "".join(rng.choice("ab/") for _ in range(rng.randint(0, 6)))
        hits = [(len(p), a) for a, p in rules if oracle(p, path)]
        expect = max(hits)[1] if hits else True  # longest, then Allow (True > False) wins
        assert RobotsRules("*", rules).decide(path)[0] is expect, (rules, path)


def test_robots_input_forms() -> None:
    body = b"\xef\xbb\xbfUser-agent: *\r\nDisallow: /x\r\n" + b"\xff\xfe junk line\n"
    assert parse_robots_txt(body, TOKEN).decide("/x/y")[0] is False
    # only the first 500 KiB count: a rule past it is not read
    big = "User-agent: *\n" + "# " + "p" * (500 * 1024) + "\nDisallow: /late\n"
    assert parse_robots_txt(big, TOKEN).decide("/late")[0] is True
    # an HTML error page served as robots.txt says nothing
    assert parse_robots_txt("<html><body>Not here</body></html>", TOKEN).rules == ()


def test_tdmrep_file_parsing() -> None:
    rules = parse_tdmrep(
        json.dumps(
            [
                {"location": "/img/free/*", "tdm-reservation": 0},
                {"location": "/img/*", "tdm-reservation": 1, "tdm-policy": "https://x.test/p"},
                {"location": "/docs/*.pdf$", "tdm-reservation": "1"},
                {"location": 7, "tdm-reservation": 1},  # no usable location: skipped
                {"location": "/bad", "tdm-reservation": 2},  # not 0/1: skipped
                "not a rule",
            ]
        )
    )
    assert rules.decide("/img/free/a.jpg") == (False, "/img/free/*", None)  # first match decides
    assert rules.decide("/img/a.jpg") == (True, "/img/*", "https://x.test/p")
    assert rules.decide("/docs/a.pdf")[0] is True
    assert rules.decide("/docs/a.pdf.html")[0] is False
    assert rules.decide("/bad")[0] is False
    with pytest.raises(ValueError, match="JSON array"):
        parse_tdmrep('{"location": "/"}')
    with pytest.raises(ValueError, match="not JSON"):
        parse_tdmrep(b"<html>")


# --- config -------------------------------------------------------------------------------------


def test_consent_config_is_checked_and_recorded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="consent.robots_txt_on_error"):
        config_from_dict({"consent": {"robots_txt_on_error": "ignore"}})
    with pytest.raises(ConfigError, match="consent.robots_txt"):
        config_from_dict({"consent": {"robots_txt": "no"}})
    with pytest.raises(ConfigError, match="consent.host_file_timeout"):
        config_from_dict({"consent": {"host_file_timeout": 0}})
    with pytest.raises(ConfigError, match="consent.url_blocklists"):
        config_from_dict({"consent": {"url_blocklists": [""]}})
    # every check is on by default; switching one off is written into the run's config
    on = ConsentConfig()
    assert (on.robots_txt, on.tdmrep, on.tdm_header) == (True, True, True)
    assert (on.robots_txt_on_4xx, on.robots_txt_on_error) == ("allow", "disallow")
    cfg = PipelineConfig().replace("consent", robots_txt=False, url_blocklists=("a.txt",))
    path = tmp_path / "config.toml"
    text = dump_config(cfg, path)
    assert "robots_txt = false" in text and "tdmrep = true" in text
    back = load_config(path)
    assert back.consent == cfg.consent


# --- lists --------------------------------------------------------------------------------------


def _md5(s: str | bytes) -> str:
    return hashlib.md5(s.encode() if isinstance(s, str) else s).hexdigest()


def _sha256(s: str | bytes) -> str:
    return hashlib.sha256(s.encode() if isinstance(s, str) else s).hexdigest()


def test_domain_lists_text_and_parquet(tmp_path: Path) -> None:
    txt = tmp_path / "domains.txt"
    txt.write_text("# opted out\nExample.COM\n\n*.wild.test  # a wildcard form\nbücher.test.\n")
    pq_path = tmp_path / "domains.parquet"
    pq.write_table(pa.table({"domain": ["parquet.test", None, "10.1.2.3"]}), pq_path)
    lists = load_lists(ConsentConfig(domain_optout_lists=(str(txt), str(pq_path))))
    covered = {
        "example.com": "example.com",
        "img.cdn.example.com": "example.com",
        "notexample.com": None,  # a suffix of the string, not a parent domain
        "example.com.evil.test": None,
        "a.wild.test": "wild.test",
        "xn--bcher-kva.test": "xn--bcher-kva.test",
        "BÜCHER.test": "xn--bcher-kva.test",
        "x.parquet.test": "parquet.test",
        "10.1.2.3": "10.1.2.3",
        "110.1.2.3": None,
        "other.test": None,
    }
    assert {h: lists.opted_out_domain(h) for h in covered} == covered


def test_list_errors_name_the_key_file_and_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="consent.domain_optout_lists: list file not found"):
        load_lists(ConsentConfig(domain_optout_lists=(missing,)))
    bad = tmp_path / "bad-domains.txt"
    bad.write_text("ok.test\nhttps://not-a-domain.test/path\n")
    with pytest.raises(ConfigError, match=r"domain_optout_lists: .*line 2: not a domain"):
        load_lists(ConsentConfig(domain_optout_lists=(str(bad),)))
    sha1 = tmp_path / "sha1-urls.txt"
    sha1.write_text(hashlib.sha1(b"http://x.test/a.jpg").hexdigest() + "\n")
    with pytest.raises(ConfigError, match=r"consent.url_blocklists: .*line 1: not a MD5 / SHA-256"):
        load_lists(ConsentConfig(url_blocklists=(str(sha1),)))
    short = tmp_path / "short.txt"
    short.write_text(_md5("a") + "\n" + "abc123\n")
    with pytest.raises(ConfigError, match=r"consent.image_blocklists: .*line 2"):
        load_lists(ConsentConfig(image_blocklists=(str(short),)))
    wrong_col = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"md5": [_sha256("a")]}), wrong_col)
    with pytest.raises(ConfigError, match=r"row 1 column 'md5'"):
        load_lists(ConsentConfig(image_blocklists=(str(wrong_col),)))
    no_col = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"digest": [_md5("a")]}), no_col)
    with pytest.raises(ConfigError, match="has no column named hash"):
        load_lists(ConsentConfig(url_blocklists=(str(no_col),)))


def test_hash_lists_match_urls_and_bytes(tmp_path: Path) -> None:
    urls = ["http://a.test/1.jpg", "http://a.test/2.jpg", "http://a.test/3.jpg"]
    txt = tmp_path / "urls.txt"
    txt.write_text(f"{_md5(urls[0])}\n{_sha256(urls[1]).upper()}  # upper case is fine\n")
    body = b"\xff\xd8 some image bytes"
    images = tmp_path / "images.parquet"
    pq.write_table(pa.table({"sha1": [hashlib.sha1(body).hexdigest()]}), images)
    lists = load_lists(ConsentConfig(url_blocklists=(str(txt),), image_blocklists=(str(images),)))
    assert lists.blocked_urls([*urls, None]) == ["md5", "sha256", None, None]
    assert lists.blocked_image(body) == "sha1"
    assert lists.blocked_image(body + b"x") is None
    assert lists.fingerprint and lists.fingerprint != load_lists(ConsentConfig()).fingerprint


# --- robots.txt over HTTP -----------------------------------------------------------------------


def test_robots_txt_rules_for_us_and_for_others(host: ImageHost) -> None:
    host.serve(
        "/robots.txt",
        "User-agent: *\nDisallow: /\n\n"  # everyone else: nothing
        "User-agent: laion-dask\nDisallow: /img/private\nDisallow: /*.png$\n"
        "Allow: /img/private-but-ok\n",
    )
    names = ["open.jpg", "private1.jpg", "private-but-ok.jpg", "pic.png"]
    urls = [host.add(n, _jpeg(i)) for i, n in enumerate(names)] * 3  # 12 rows, one host
    out = download_images(_frame(urls), _dl())
    # pic.png is served as JPEG bytes, but the rule is about the path: disallowed
    expected = ["success", "disallowed_robots_txt", "success", "disallowed_robots_txt"]
    assert _statuses(out) == expected * 3
    assert "Disallow: /img/private" in out[schema.ERROR_MESSAGE][1]
    assert "(user-agent laion-dask)" in out[schema.ERROR_MESSAGE][1]
    assert out[schema.HTTP_STATUS][[1, 3]].isna().all()  # never requested
    paths = [p for p, _, _ in host.requests]
    assert paths.count("/robots.txt") == 1  # once per host for the whole call
    assert "/img/private1.jpg" not in paths and "/img/pic.png" not in paths
    # the robots.txt request identifies us
    ua = next(h for p, _, h in host.requests if p == "/robots.txt")["User-Agent"]
    assert ua.startswith("laion-dask/")
    # a crawler with another token falls into the * group and gets nothing
    other = download_images(_frame(urls[:1]), _dl(user_agent="otherbot/1.0 (+https://x.test)"))
    assert _statuses(other) == ["disallowed_robots_txt"]
    assert "(user-agent *)" in other[schema.ERROR_MESSAGE][0]


@pytest.mark.parametrize(
    ("answer", "consent", "expected"),
    [
        ({"status": 404}, {}, "success"),  # unavailable: allow (RFC 9309)
        ({"status": 403}, {}, "success"),
        ({"status": 404}, {"robots_txt_on_4xx": "disallow"}, "disallowed_robots_txt"),
        ({"status": 500}, {}, "robots_txt_unreachable"),  # unreachable: disallow (RFC 9309)
        ({"status": 503}, {}, "robots_txt_unreachable"),
        ({"status": 429}, {}, "robots_txt_unreachable"),  # "not now" is not "no file"
        ({"status": 500}, {"robots_txt_on_error": "allow"}, "success"),
        ({"status": 200, "delay": 3.0}, {"host_file_timeout": 0.5}, "robots_txt_unreachable"),
        (
            {"status": 200, "delay": 3.0},
            {"host_file_timeout": 0.5, "robots_txt_on_error": "allow"},
            "success",
        ),
        ({"status": 500}, {"robots_txt": False}, "success"),  # switched off: never asked
    ],
)
def test_unreachable_robots_txt_policies(
    host: ImageHost, answer: dict, consent: dict, expected: str
) -> None:
    host.serve("/robots.txt", "User-agent: *\nAllow: /\n", **answer)
    url = host.add("a.jpg", _jpeg(1))
    out = download_images(
        _frame([url, url]), _dl(read_timeout=5.0), consent=ConsentConfig(**consent)
    )
    assert _statuses(out) == [expected, expected]
    asked = [p for p, _, _ in host.requests].count("/robots.txt")
    assert asked == (0 if consent.get("robots_txt") is False else 1)
    if expected != "success":
        assert host.content_requests() == []  # the image was never requested
    if expected == "robots_txt_unreachable":
        assert "consent.robots_txt_on_error = disallow" in out[schema.ERROR_MESSAGE][0]


def test_a_host_that_is_down_is_a_download_failure(tmp_path: Path) -> None:
    with serve_images() as gone:
        url = gone.url("/img/jpeg")
    # nothing listens: not a robots.txt answer but a dead host, retried by --retry-failed and
    # never recorded in the run's host-file cache
    cache = str(tmp_path / "consent")
    out = download_images(_frame([url, url]), _dl(), host_cache=cache)
    assert _statuses(out) == ["failed_to_download"] * 2
    assert out[schema.ERROR_MESSAGE][0].startswith("cannot connect: robots.txt of")
    assert is_transient("failed_to_download", out[schema.ERROR_MESSAGE][0])
    assert not glob.glob(f"{cache}/*.jsonl")  # nothing recorded for a dead host


def test_host_files_go_through_the_address_guard(
    host: ImageHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """robots.txt redirecting to a private address is refused like an image would be."""
    from laion_dask.stages import netguard

    real = netguard._is_public
    # tests may only talk to loopback: let exactly 127.0.0.1 stand for a public server
    monkeypatch.setattr(netguard, "_is_public", lambda ip: str(ip) == "127.0.0.1" or real(ip))
    asked: list[str] = []

    def resolver(name: str) -> list[str]:
        asked.append(name)
        return {"intranet.test": ["10.0.0.7"]}.get(name, ["127.0.0.1"])

    host.serve("/robots.txt", status=302, headers={"Location": "http://intranet.test/robots.txt"})
    url = host.add("a.jpg", _jpeg(1))
    out = download_images(_frame([url]), _dl(allow_private_networks=False), resolver=resolver)
    assert _statuses(out) == ["robots_txt_unreachable"]
    assert "non-public address 10.0.0.7" in out[schema.ERROR_MESSAGE][0]
    assert asked == ["intranet.test"] and host.content_requests() == []


def test_robots_txt_redirects(host: ImageHost) -> None:
    host.serve("/robots.txt", status=301, headers={"Location": "/real-robots.txt"})
    host.serve("/real-robots.txt", "User-agent: *\nDisallow: /img/no\n")
    urls = [host.add("no.jpg", _jpeg(1)), host.add("yes.jpg", _jpeg(2))]
    out = download_images(_frame(urls), _dl())
    assert _statuses(out) == ["disallowed_robots_txt", "success"]
    # more than five redirects: RFC 9309 "unavailable" -> allow
    for i in range(7):
        host.serve(f"/r{i}", status=302, headers={"Location": f"/r{i + 1}"})
    host.serve("/robots.txt", status=302, headers={"Location": "/r0"})
    out = download_images(_frame(urls), _dl())
    assert _statuses(out) == ["success", "success"]


# --- TDMRep -------------------------------------------------------------------------------------


def test_tdmrep_file_and_tdm_reservation_header(host: ImageHost) -> None:
    host.serve(
        "/.well-known/tdmrep.json",
        json.dumps(
            [
                {"location": "/img/open-*", "tdm-reservation": 0},
                {"location": "/img/*", "tdm-reservation": 1, "tdm-policy": "https://x.test/p"},
            ]
        ),
        ctype="application/json",
    )
    urls = [
        host.add("open-1.jpg", _jpeg(1)),
        host.add("reserved.jpg", _jpeg(2)),
        host.url("/redirect?to=/img/reserved.jpg"),  # a hop into a reserved location
        host.url("/robots?tag=nofollow"),  # outside every location
    ]
    out = download_images(_frame(urls), _dl())
    assert _statuses(out) == ["success", "disallowed_tdmrep", "disallowed_tdmrep", "success"]
    assert "location /img/* reserved; tdm-policy https://x.test/p" in out[schema.ERROR_MESSAGE][1]
    assert "/img/reserved.jpg" not in host.content_requests()
    assert [p for p, _, _ in host.requests].count("/.well-known/tdmrep.json") == 1
    off = download_images(_frame(urls[1:2]), _dl(), consent=ConsentConfig(tdmrep=False))
    assert _statuses(off) == ["success"]

    # the response header, image by image
    urls = [
        host.add("h1.jpg", _jpeg(3), headers={"tdm-reservation": "1", "tdm-policy": "https://p"}),
        host.add("h0.jpg", _jpeg(4), headers={"tdm-reservation": "0"}),
    ]
    host.unserve("/.well-known/tdmrep.json")
    out = download_images(_frame(urls), _dl())
    assert _statuses(out) == ["disallowed_tdm_reservation", "success"]
    assert out[schema.ERROR_MESSAGE][0] == "tdm-reservation: 1; tdm-policy https://p"
    assert out[schema.HTTP_STATUS][0] == 200 and pd.isna(out[schema.ORIGINAL_BYTES][0])
    off = download_images(_frame(urls[:1]), _dl(), consent=ConsentConfig(tdm_header=False))
    assert _statuses(off) == ["success"]


def test_invalid_tdmrep_file_reserves_nothing(host: ImageHost) -> None:
    host.serve("/.well-known/tdmrep.json", "<html>not json</html>", ctype="text/html")
    out = download_images(_frame([host.add("a.jpg", _jpeg(1))]), _dl())
    assert _statuses(out) == ["success"]


# --- lists over HTTP ----------------------------------------------------------------------------


def test_pre_request_lists_make_no_request(host: ImageHost, tmp_path: Path) -> None:
    port = host.port
    names = {"ok.test": ["127.0.0.1"], "optout.test": ["127.0.0.1"]}
    resolved: list[str] = []

    def resolver(name: str) -> list[str]:
        resolved.append(name)
        return names.get(name, ["127.0.0.1"])

    (tmp_path / "domains.txt").write_text("optout.test\n")
    blocked = f"http://ok.test:{port}/img/blocked-by-url"
    (tmp_path / "urls.txt").write_text(_sha256(blocked) + "\n")
    consent = ConsentConfig(
        domain_optout_lists=(str(tmp_path / "domains.txt"),),
        url_blocklists=(str(tmp_path / "urls.txt"),),
    )
    host.add("fine.jpg", _jpeg(1))
    urls = [
        f"http://ok.test:{port}/img/fine.jpg",
        f"http://optout.test:{port}/img/fine.jpg",
        f"http://cdn.images.OPTOUT.test:{port}/img/fine.jpg",
        f"http://notoptout.test:{port}/img/fine.jpg",
        blocked,
        f"http://ok.test:{port}/redirect?to=http://sub.optout.test:{port}/img/fine.jpg",
    ]
    out = download_images(_frame(urls), _dl(), consent=consent, resolver=resolver)
    assert _statuses(out) == [
        "success",
        "opted_out_domain",
        "opted_out_domain",
        "success",
        "blocklisted_url",
        "opted_out_domain",  # stopped at the redirect, before asking the opted-out host
    ]
    assert "covered by opted-out optout.test" in out[schema.ERROR_MESSAGE][2]
    assert out[schema.ERROR_MESSAGE][4] == "URL sha256 on a URL blocklist"
    hosts_asked = {h["Host"].split(":")[0] for _, _, h in host.requests}
    assert hosts_asked == {"ok.test", "notoptout.test"}
    assert "/img/blocked-by-url" not in host.content_requests()
    assert not {n for n in resolved if "optout.test" in n and n != "notoptout.test"}
    stats = download_stats(out, 1.0)
    assert stats["count"] == stats["successes"] + sum(stats["failures"].values())
    assert stats["failures"]["opted_out_domain"] == 3


def test_image_blocklist_drops_bytes_before_decoding(host: ImageHost, tmp_path: Path) -> None:
    bad = [_jpeg(10), _jpeg(11), noise_image(220, 160, "PNG", seed=12)]
    good = _jpeg(13)
    (tmp_path / "md5.txt").write_text(_md5(bad[0]) + "\n")
    pq.write_table(
        pa.table({"hash": [hashlib.sha1(bad[1]).hexdigest(), _sha256(bad[2])]}),
        tmp_path / "more.parquet",
    )
    consent = ConsentConfig(
        image_blocklists=(str(tmp_path / "md5.txt"), str(tmp_path / "more.parquet"))
    )
    urls = [host.add(f"bad{i}", b) for i, b in enumerate(bad)] + [host.add("good.jpg", good)]
    out = download_images(_frame(urls), _dl(), consent=consent)
    assert _statuses(out) == ["blocklisted_image"] * 3 + ["success"]
    assert out[schema.ERROR_MESSAGE][:3].tolist() == [
        "image md5 on an image blocklist",
        "image sha1 on an image blocklist",
        "image sha256 on an image blocklist",
    ]
    assert out[schema.IMAGE][:3].isna().all() and out[schema.IMAGE][3] is not None
    assert out[schema.WIDTH][:3].isna().all()  # never decoded
    assert out[schema.SHA256][:3].tolist() == [_sha256(b) for b in bad]  # auditable


# --- the per-run cache --------------------------------------------------------------------------


def test_host_files_are_fetched_once_per_run(host: ImageHost, tmp_path: Path) -> None:
    host.serve("/robots.txt", "User-agent: *\nDisallow: /img/no\n")
    urls = [host.add("no.jpg", _jpeg(1)), host.add("yes.jpg", _jpeg(2))]
    cache = str(tmp_path / "consent")
    first = download_images(_frame(urls), _dl(), host_cache=cache)
    # the site changes its mind mid-run: the run keeps the answer it recorded
    host.serve("/robots.txt", "User-agent: *\nDisallow: /\n")
    second = download_images(_frame(urls), _dl(), host_cache=cache)
    assert _statuses(first) == _statuses(second) == ["disallowed_robots_txt", "success"]
    paths = [p for p, _, _ in host.requests]
    assert paths.count("/robots.txt") == 1
    assert paths.count("/.well-known/tdmrep.json") == 1
    # one journal file per call that learned something (the second call only read it)
    files = sorted(glob.glob(f"{cache}/*.jsonl"))
    assert len(files) == 1
    records = _journal_records(Path(cache))
    assert {r.kind: r.outcome for r in records} == {"robots": "ok", "tdmrep": "unavailable"}
    # a new run directory asks again
    third = download_images(_frame(urls), _dl(), host_cache=str(tmp_path / "other-run"))
    assert _statuses(third) == ["disallowed_robots_txt"] * 2


def _journal_records(folder: Path) -> list[HostFile]:
    """Every well-formed record of the host-file journals under ``folder``."""
    out = []
    for path in sorted(folder.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                out.append(HostFile.from_json(json.loads(line)))
            except ValueError:
                continue
    return out


def test_host_file_cache_first_publisher_wins(tmp_path: Path) -> None:
    a = HostFileCache(str(tmp_path), TOKEN)
    b = HostFileCache(str(tmp_path), TOKEN)
    rec1 = HostFile("robots", "http://h.test:1", "ok", 200, None, RobotsRules("*", ((False, "/"),)))
    rec2 = HostFile("robots", "http://h.test:1", "unreachable", 503, "HTTP 503")
    assert a.put(rec1) == rec1
    assert b.put(rec2) == rec1  # published first: adopted, not overwritten
    a.flush(), b.flush()
    assert _journal_records(tmp_path) == [rec1]  # b had nothing of its own to write
    assert HostFileCache(str(tmp_path), "otherbot").get("robots", "http://h.test:1") is None
    assert not list(tmp_path.rglob("*.tmp-*"))
    # another process (another worker, a resumed run) reads the journal
    _journal_of.cache_clear()
    assert HostFileCache(str(tmp_path), TOKEN).get("robots", "http://h.test:1") == rec1
    # a run directory on an fsspec store
    remote = f"memory://consent-{tmp_path.name}"
    c = HostFileCache(remote, TOKEN)
    c.put(rec2)
    c.flush()
    _journal_of.cache_clear()  # force a read from the store, as another worker would
    assert HostFileCache(remote, TOKEN).get("robots", "http://h.test:1") == rec2


def test_host_file_journal_survives_bad_lines_and_grows_by_a_file_per_call(tmp_path: Path) -> None:
    recs = [HostFile("robots", f"http://h{i}.test:1", "unavailable", 404) for i in range(3)]
    first = HostFileCache(str(tmp_path), TOKEN)
    for r in recs[:2]:
        first.put(r)
    first.flush()
    (path,) = tmp_path.glob("*.jsonl")
    path.write_text(path.read_text() + "{not json\n")
    _journal_of.cache_clear()
    second = HostFileCache(str(tmp_path), TOKEN)
    assert [second.get("robots", r.origin) for r in recs] == [recs[0], recs[1], None]
    second.put(recs[2])
    second.flush()
    assert len(list(tmp_path.glob("*.jsonl"))) == 2 and len(_journal_records(tmp_path)) == 3


def test_lists_on_an_fsspec_store(tmp_path: Path) -> None:
    import fsspec

    path = f"memory://lists-{tmp_path.name}/domains.txt.gz"
    with fsspec.open(path, "wt", compression="gzip") as fh:
        fh.write("remote.test\n")
    lists = load_lists(ConsentConfig(domain_optout_lists=(path,)))
    assert lists.opted_out_domain("img.remote.test") == "remote.test"


# --- the pipeline's download stage --------------------------------------------------------------


def _link(url: str, alt: str) -> dict:
    return {"path": "IMG@/src", "url": url, "alt": alt}


def test_pipeline_download_honours_every_signal(tmp_path: Path, client) -> None:  # noqa: ANN001
    with serve_images() as a, serve_images() as b:
        a.serve(
            "/robots.txt",
            "User-agent: otherbot\nDisallow: /\n\n"
            "User-agent: laion-dask\nDisallow: /img/norobots\n",
        )
        a.serve(
            "/.well-known/tdmrep.json",
            json.dumps([{"location": "/img/reserved*", "tdm-reservation": 1}]),
        )
        b.serve("/robots.txt", status=503)  # every image of host b: unreachable -> disallow
        blocked_image = _jpeg(99)
        blocked_url = a.add("listed-url.jpg", _jpeg(98))
        lists = tmp_path / "lists"
        lists.mkdir()
        (lists / "domains.txt").write_text("# user opt-outs\noptout.invalid\n")
        (lists / "urls.txt").write_text(_md5(blocked_url) + "\n")
        (lists / "images.txt").write_text(_sha256(blocked_image) + "\n")
        kinds: dict[str, str] = {}

        def add(url: str, kind: str) -> dict:
            kinds[url] = kind
            return _link(url, f"a picture of kind {kind} {len(kinds)}")

        pages = []
        for p in range(4):
            links = [
                add(a.add(f"ok{p}.jpg", _jpeg(p)), "success"),
                add(a.add(f"norobots{p}.jpg", _jpeg(10 + p)), "disallowed_robots_txt"),
                add(a.add(f"reserved{p}.jpg", _jpeg(20 + p)), "disallowed_tdmrep"),
                add(
                    a.add(f"hdr{p}.jpg", _jpeg(30 + p), headers={"tdm-reservation": "1"}),
                    "disallowed_tdm_reservation",
                ),
                add(a.add(f"bad{p}.jpg", blocked_image), "blocklisted_image"),
                add(b.add(f"b{p}.jpg", _jpeg(40 + p)), "robots_txt_unreachable"),
                add(f"http://img.optout.invalid/{p}.jpg", "opted_out_domain"),
            ]
            if p == 0:
                links.append(add(blocked_url, "blocklisted_url"))
            pages.append(wat_payload(f"http://page.test/{p}.html", links))
        wat = tmp_path / "crawl.warc.wat.gz"
        wat.write_bytes(make_wat(pages))

        run = RunDir(str(tmp_path / "run"))
        cfg = PipelineConfig().replace(
            "download", rows_per_task=5, **(FAST | {"deadline": 5.0, "read_timeout": 2.0})
        )
        cfg = cfg.replace(
            "consent",
            domain_optout_lists=(str(lists / "domains.txt"),),
            url_blocklists=(str(lists / "urls.txt"),),
            image_blocklists=(str(lists / "images.txt"),),
        )
        # a missing list stops the stage before any task or request
        broken = cfg.replace("consent", image_blocklists=(str(lists / "missing.txt"),))
        run_extract(run, cfg, [str(wat)], client=client)
        with pytest.raises(ConfigError, match="consent.image_blocklists: list file not found"):
            run_download(run, broken, client=client)
        assert a.requests == [] and b.requests == []
        assert run.markers("downloads") == {}

        report = run_download(run, cfg, client=client)
        report.check()
        dl = pd.concat([run.read_parquet(p) for p in run.parts("downloads")], ignore_index=True)
        assert report.partitions == len(run.markers("downloads")) >= 4
        # every row carries the reason it was built for, and none is lost
        got = dict(zip(dl[schema.URL], dl[schema.STATUS], strict=True))
        assert got == kinds
        assert all(dl.loc[dl[schema.STATUS] != "success", schema.ERROR_MESSAGE].notna())
        # no request for the pre-request removals, nor for what robots.txt/tdmrep disallow
        a_paths = a.content_requests()
        assert "/img/listed-url.jpg" not in a_paths
        assert not [p for p in a_paths if p.startswith(("/img/norobots", "/img/reserved"))]
        assert b.content_requests() == []
        # host files are shared by the run's tasks: fewer fetches than tasks
        robots_a = [p for p, _, _ in a.requests].count("/robots.txt")
        assert 1 <= robots_a < report.partitions
        # one robots.txt result per host, in the journal of the one chain holding the host
        robots = [r for r in _journal_records(Path(run.path) / "consent") if r.kind == "robots"]
        assert len(robots) == len({r.origin for r in robots}) == 2

        # the funnel counts every new status and still adds up
        table = funnel(run)
        dlf = table[table.stage == "download"].set_index("outcome")["rows"]
        for kind in set(kinds.values()):
            assert dlf[kind] == sum(1 for k in kinds.values() if k == kind)
        assert check_funnel(table)["download"]
        summary = consent_summary(run)
        assert summary["blocklisted_image"] == 4 and summary["opted_out_domain"] == 4
        assert set(summary) >= set(schema.CONSENT_STATUSES)

        # no blocked image reaches a shard: not its key, not its URL, not its bytes
        tars = sorted(glob.glob(f"{run.path}/images/*.tar"))
        ok_keys = set(dl.loc[dl[schema.STATUS] == "success", schema.KEY])
        seen_keys, seen_urls = set(), set()
        for t in tars:
            assert blocked_image not in Path(t).read_bytes()
            for key, members in iter_shard(t):
                seen_keys.add(key)
                seen_urls.add(json.loads(members["json"])["url"])
        assert seen_keys == ok_keys
        assert {u for u, k in kinds.items() if k == "success"} == seen_urls

        # resume: nothing is asked again, host files included
        n_a, n_b = len(a.requests), len(b.requests)
        again = run_download(run, cfg, client=client)
        assert again.resumed == again.partitions
        assert (len(a.requests), len(b.requests)) == (n_a, n_b)
        # --retry-failed asks an unreachable robots.txt again: host b now has none (404: allow)
        b.serve("/robots.txt", status=404)
        retried = run_download(run, cfg, client=client, retry_failed=True)
        retried.check()
        assert "robots_txt_unreachable" not in retried.counts
        unreachable = sum(1 for k in kinds.values() if k == "robots_txt_unreachable")
        assert retried.counts["success"] == unreachable + dlf["success"]
        assert [p for p, _, _ in b.requests].count("/robots.txt") == 2  # the run + the retry
        assert len(b.content_requests()) == unreachable
        # the new answer replaced the old one for the rest of the run, in every reader
        _journal_of.cache_clear()
        robots = {
            r.origin: r.outcome
            for r in _journal_records(Path(run.path) / "consent")
            if r.kind == "robots" and r.outcome != "unreachable"
        }
        assert sorted(robots.values()) == ["ok", "unavailable"]
        # a changed list is a different stage: its fingerprint changes and the rows follow it
        (lists / "domains.txt").write_text("optout.invalid\n127.0.0.1\n")
        changed = run_download(run, cfg, client=client)
        assert changed.resumed == 0
        assert changed.counts.get("success", 0) == 0
        assert changed.counts["opted_out_domain"] == len(kinds) - 1  # all but the listed URL


def test_demo_host_has_no_host_files_so_everything_is_allowed(tmp_path: Path) -> None:
    """The offline demo's hosts serve no robots.txt or tdmrep.json: 404, RFC 9309 "allow"."""
    from laion_dask.faces.demo.host import ImageHost as DemoHost

    for i in range(2):
        (tmp_path / "images" / f"host{i}").mkdir(parents=True)
        (tmp_path / "images" / f"host{i}" / "a.jpg").write_bytes(_jpeg(i))
    cache = tmp_path / "consent"
    with DemoHost(tmp_path / "images", hosts=2, noai_hosts=()) as demo:
        urls = [f"{base}/a.jpg" for base in demo.base_urls]
        out = download_images(_frame(urls), _dl(), host_cache=str(cache))
    assert _statuses(out) == ["success", "success"]
    records = _journal_records(cache)
    assert len(records) == 4  # robots.txt and tdmrep.json of each host
    assert {(r.outcome, r.http_status) for r in records} == {("unavailable", 404)}


def test_a_retry_replaces_an_unreachable_answer_for_the_rest_of_the_run(tmp_path: Path) -> None:
    origin = "http://h.test:1"
    down = HostFile("robots", origin, "unreachable", 503, "HTTP 503")
    up = HostFile("robots", origin, "ok", 200, None, RobotsRules("*", ((False, "/"),)))
    first = HostFileCache(str(tmp_path), TOKEN)
    first.put(down)
    first.flush()
    # an ordinary later call keeps the run's answer; it does not ask again
    assert HostFileCache(str(tmp_path), TOKEN).get("robots", origin) == down
    retry = HostFileCache(str(tmp_path), TOKEN, refresh_unreachable=True)
    assert retry.get("robots", origin) is None  # ask the host again
    assert retry.put(up) == up
    assert retry.get("robots", origin) == up
    retry.flush()
    for fresh_process in (False, True):
        if fresh_process:
            _journal_of.cache_clear()  # replayed from the journals, oldest first
        assert HostFileCache(str(tmp_path), TOKEN).get("robots", origin) == up
    # an answer that is not "unreachable" is never replaced, not even by a retry
    again = HostFileCache(str(tmp_path), TOKEN, refresh_unreachable=True)
    assert again.get("robots", origin) == up
    assert again.put(down) == up
