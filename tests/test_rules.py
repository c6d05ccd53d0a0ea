"""Extraction rules: every rule and its order, NA handling, duplicates across partitions."""

from __future__ import annotations

import dask.dataframe as dd
import mmh3
import pandas as pd
import pandas.testing as pdt
import pytest
from dask.dataframe.utils import assert_eq

from laion_dask.ground import schema
from laion_dask.ground.config import ConfigError, ConsentConfig, RulesConfig
from laion_dask.stages.rules import (
    DEDUP_COLUMNS,
    DUPLICATES_META,
    add_drop_reason,
    find_duplicates,
    mark_duplicates,
)

OK_URL = "https://img.example.org/photos/cat.jpg"
OK_TEXT = "a cat on a sofa"


def frame(
    rows: list[tuple[object, object]],
    *,
    source: str = "a.wat.gz",
    start: int = 0,
    hashes: list[int] | None = None,
    robots: list[str | None] | None = None,
    tdm: list[bool] | None = None,
) -> pd.DataFrame:
    """Candidate rows (url, text) with schema dtypes, LAION's hash unless ``hashes`` forces one."""
    n = len(rows)
    urls = [u for u, _ in rows]
    texts = [t for _, t in rows]
    if hashes is None:
        hashes = [
            mmh3.hash64(f"{u}{t}")[0] if u is not None and t is not None else 0 for u, t in rows
        ]
    df = pd.DataFrame(
        {
            schema.UID: [f"{source}:{start + i:05d}" for i in range(n)],
            schema.URL: urls,
            schema.TEXT: texts,
            schema.PAGE_URL: ["https://page.example.org/"] * n,
            schema.SOURCE_FILE: [source] * n,
            schema.RECORD_OFFSET: [1000 * (start + i) for i in range(n)],
            schema.HASH: hashes,
            schema.PAGE_ROBOTS: robots or [None] * n,
            schema.PAGE_TDM: tdm or [False] * n,
        },
        index=pd.RangeIndex(start, start + n),
    )
    return schema.conform(df, schema.PAIRS_DTYPES)


def reasons(rows: list[tuple[object, object]], cfg: RulesConfig | None = None) -> list[object]:
    out = add_drop_reason(frame(rows), cfg or RulesConfig())[schema.DROP_REASON]
    assert out.dtype == "string"
    return [None if pd.isna(r) else r for r in out]


# --- single rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (OK_URL, None),
        ("http://img.example.org/cat.jpg", None),
        ("HTTPS://IMG.EXAMPLE.ORG/CAT.JPG", None),
        ("Http://img.example.org/cat.jpg", None),
        ("data:image/png;base64,iVBORw0KGgo=", "bad_url_scheme"),
        ("javascript:void(0)", "bad_url_scheme"),
        ("JavaScript:alert(1)", "bad_url_scheme"),
        ("ftp://img.example.org/cat.jpg", "bad_url_scheme"),
        ("//img.example.org/cat.jpg", "bad_url_scheme"),  # relative: extract resolves these
        ("/photos/cat.jpg", "bad_url_scheme"),
        ("http:///cat.jpg", "bad_url_scheme"),  # no host
        ("http://[::1/cat.jpg", "bad_url_scheme"),  # unparsable IPv6 literal
        ("http://img.example.org:99999/cat.jpg", "bad_url_scheme"),  # port out of range
        ("", "bad_url_scheme"),
        (None, "bad_url_scheme"),
    ],
)
def test_url_scheme(url: object, expected: object) -> None:
    assert reasons([(url, OK_TEXT)]) == [expected]


def test_allowed_schemes_are_configurable() -> None:
    cfg = RulesConfig(allowed_schemes=("https",))
    assert reasons([("http://a.org/x.jpg", OK_TEXT), ("HTTPS://a.org/x.jpg", OK_TEXT)], cfg) == [
        "bad_url_scheme",
        None,
    ]


def test_url_length_limit() -> None:
    base = "https://a.org/"
    at_limit = base + "x" * (2000 - len(base) - 4) + ".jpg"
    assert len(at_limit) == 2000
    over = at_limit[:-4] + "x.jpg"
    assert reasons([(at_limit, OK_TEXT), (over, OK_TEXT)]) == [None, "url_too_long"]
    assert reasons([(over, OK_TEXT)], RulesConfig(max_url_chars=3000)) == [None]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://a.org/anim.gif", "blocked_extension"),
        ("https://a.org/anim.GIF", "blocked_extension"),
        ("https://a.org/anim.Gif?x=1", "blocked_extension"),
        ("https://a.org/anim.gif?x=1", "blocked_extension"),
        ("https://a.org/icon.svg#layer", "blocked_extension"),
        ("https://a.org/icon.SVG?v=2#x", "blocked_extension"),
        ("https://a.org/photo.jpg?format=.gif", None),  # the query is not the path
        ("https://a.org/photo.jpg#.svg", None),
        ("https://cdn.gif/photo.jpg", None),  # the host is not the path
        ("https://a.org/gif", None),
        ("https://a.org/photo.gifv", None),
        ("https://a.org/anim.gif/", None),
    ],
)
def test_blocked_extension(url: str, expected: object) -> None:
    assert reasons([(url, OK_TEXT)]) == [expected]


def test_blocked_extensions_are_configurable() -> None:
    cfg = RulesConfig(blocked_extensions=(".BMP",))
    rows = [("https://a.org/x.bmp", OK_TEXT), ("https://a.org/x.gif", OK_TEXT)]
    assert reasons(rows, cfg) == ["blocked_extension", None]
    assert reasons(rows, RulesConfig(blocked_extensions=())) == [None, None]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abcde", None),  # exactly 5 characters: kept
        ("abcd", "text_too_short"),
        ("  abcd \n", "text_too_short"),  # whitespace does not count
        ("日本語の猫", None),  # characters, not bytes
        ("", "text_too_short"),
        (None, "text_too_short"),
    ],
)
def test_text_length(text: object, expected: object) -> None:
    assert reasons([(OK_URL, text)]) == [expected]


def test_min_text_chars_zero_keeps_empty_text() -> None:
    assert reasons([(OK_URL, ""), (OK_URL, None)], RulesConfig(min_text_chars=0)) == [None, None]


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="rules.blocked_extensions"):
        RulesConfig(blocked_extensions=("gif",))
    with pytest.raises(ConfigError, match="rules.allowed_schemes"):
        RulesConfig(allowed_schemes=())


# --- order, NA, purity, counts ------------------------------------------------------------------


def test_first_failing_rule_wins_in_schema_order() -> None:
    long_gif = "https://a.org/" + "x" * 2000 + ".gif"
    rows = [
        ("data:image/gif;base64," + "A" * 3000, "ab"),  # all four fail -> scheme
        (long_gif, "ab"),  # length, extension and text fail -> length
        ("https://a.org/x.gif", "ab"),  # extension and text fail -> extension
        ("https://a.org/x.jpg", "ab"),
        (None, None),
    ]
    got = reasons(rows)
    assert got == [
        "bad_url_scheme",
        "url_too_long",
        "blocked_extension",
        "text_too_short",
        "bad_url_scheme",
    ]
    assert set(got) <= set(schema.EXTRACT_DROP_REASONS)
    order = [r for r in schema.EXTRACT_DROP_REASONS if r in got]
    assert order == ["bad_url_scheme", "url_too_long", "blocked_extension", "text_too_short"]


def test_existing_reason_is_kept_and_rerunning_changes_nothing() -> None:
    df = frame([(OK_URL, OK_TEXT), ("ftp://a.org/x.jpg", OK_TEXT), (OK_URL, "ab")])
    df = df.assign(**{schema.DROP_REASON: pd.array(["duplicate", pd.NA, "duplicate"], "string")})
    out = add_drop_reason(df, RulesConfig())
    assert out[schema.DROP_REASON].tolist() == ["duplicate", "bad_url_scheme", "duplicate"]
    pdt.assert_frame_equal(add_drop_reason(out, RulesConfig()), out)


def test_input_is_not_mutated_and_rows_are_kept() -> None:
    df = frame([(OK_URL, OK_TEXT), ("javascript:x", "ab"), (None, None)])
    before = df.copy(deep=True)
    out = add_drop_reason(df, RulesConfig())
    pdt.assert_frame_equal(df, before)
    pdt.assert_index_equal(out.index, df.index)
    pdt.assert_frame_equal(out[df.columns], df)
    assert list(out.columns) == list(df.columns) + [schema.DROP_REASON]


def test_empty_partition_matches_schema() -> None:
    out = add_drop_reason(schema.PAIRS, RulesConfig())
    pdt.assert_frame_equal(out, schema.empty(schema.PAIRS_DTYPES, schema.RULES_DTYPES))


def test_counts_add_up() -> None:
    rows = [
        (OK_URL, OK_TEXT),
        ("http://b.org/y.png", "kept as well"),
        ("data:,x", OK_TEXT),
        ("javascript:0", OK_TEXT),
        ("https://a.org/" + "y" * 2100, OK_TEXT),
        ("https://a.org/a.svg", OK_TEXT),
        ("https://a.org/a.jpg", "abc"),
        (None, None),
    ]
    out = add_drop_reason(frame(rows), RulesConfig())
    counts = out[schema.DROP_REASON].value_counts(dropna=False)
    kept = int(out[schema.DROP_REASON].isna().sum())
    dropped = {r: int(c) for r, c in counts.items() if not pd.isna(r)}
    assert kept == 2
    assert dropped == {
        "bad_url_scheme": 3,
        "url_too_long": 1,
        "blocked_extension": 1,
        "text_too_short": 1,
    }
    assert len(out) == kept + sum(dropped.values())


def test_dask_equivalence_add_drop_reason(client) -> None:
    rows = [
        (OK_URL, OK_TEXT),
        ("data:,x", OK_TEXT),
        ("https://a.org/a.GIF?x=1", OK_TEXT),
        ("https://a.org/a.jpg", "abc"),
        (None, None),
        ("HTTPS://A.ORG/B.PNG", "hello"),
    ] * 3
    pdf = frame(rows)
    cfg = RulesConfig()
    meta = schema.empty(schema.PAIRS_DTYPES, schema.RULES_DTYPES)
    result = dd.from_pandas(pdf, npartitions=3).map_partitions(add_drop_reason, cfg, meta=meta)
    assert_eq(result, add_drop_reason(pdf, cfg))


# --- page-level consent ---------------------------------------------------------------------------


PAGE_SIGNALS = [  # (page_robots, page_tdm) -> reason under the default [consent]
    (None, False, None),
    ("index,follow", False, None),
    ("noai", False, "page_robots_meta"),
    ("follow,noimageai", False, "page_robots_meta"),
    ("noindex", False, "page_robots_meta"),
    ("none", False, "page_robots_meta"),  # = noindex, nofollow
    ("noimageindex,nosnippet", True, "page_robots_meta"),  # the first rule wins
    ("noaix,xnoai", False, None),  # whole directives only
    (None, True, "page_tdm_reservation"),
]


def _page_frame() -> pd.DataFrame:
    rows = [("https://a.org/a.jpg", "a good caption")] * len(PAGE_SIGNALS)
    return frame(rows, robots=[r for r, _, _ in PAGE_SIGNALS], tdm=[t for _, t, _ in PAGE_SIGNALS])


def _reasons_of(df: pd.DataFrame) -> list[object]:
    return [None if pd.isna(r) else r for r in df[schema.DROP_REASON]]


def test_page_opt_outs_are_the_first_rules():
    got = _reasons_of(add_drop_reason(_page_frame(), RulesConfig()))
    assert got == [want for _, _, want in PAGE_SIGNALS]
    # consent comes before every other rule: a short text on an opted-out page is an opt-out
    df = frame([("https://a.org/a.jpg", "ab")], robots=["noai"])
    assert _reasons_of(add_drop_reason(df, RulesConfig())) == ["page_robots_meta"]


def test_page_opt_outs_follow_the_consent_policy():
    df = _page_frame()
    off = ConsentConfig(page_meta=False, tdm_reservation=False)
    assert _reasons_of(add_drop_reason(df, RulesConfig(), off)) == [None] * len(PAGE_SIGNALS)
    only_noai = ConsentConfig(meta_tokens=("noai",))
    got = _reasons_of(add_drop_reason(df, RulesConfig(), only_noai))
    assert got == [
        None, None, "page_robots_meta", None, None, None,
        "page_tdm_reservation", None, "page_tdm_reservation",
    ]  # fmt: skip


def test_frames_without_page_columns_have_no_page_reasons():
    df = frame([("https://a.org/a.jpg", "a good caption")])
    df = df.drop(columns=[schema.PAGE_ROBOTS, schema.PAGE_TDM])
    assert _reasons_of(add_drop_reason(df, RulesConfig())) == [None]


# --- duplicates ---------------------------------------------------------------------------------


def candidates(rows: list[tuple[object, object]], **kwargs: object) -> pd.DataFrame:
    return add_drop_reason(frame(rows, **kwargs), RulesConfig())


def test_find_duplicates_keeps_first_in_canonical_order() -> None:
    a = candidates([(OK_URL, OK_TEXT), ("https://a.org/2.jpg", "second one")], source="b.wat.gz")
    b = candidates([(OK_URL, OK_TEXT), (OK_URL, OK_TEXT)], source="a.wat.gz", start=5)
    both = pd.concat([a, b])
    # shuffled input order must not matter: (source_file, record_offset, uid) decides
    for df in (both, both.iloc[::-1], both.sample(frac=1, random_state=1)):
        dups = find_duplicates(df)
        pdt.assert_frame_equal(dups.iloc[:0], DUPLICATES_META)
        assert dups[schema.UID].tolist() == ["a.wat.gz:00006", "b.wat.gz:00000"]


def test_find_duplicates_ignores_dropped_rows() -> None:
    df = candidates([(OK_URL, "abc"), (OK_URL, "abc"), (OK_URL, OK_TEXT), (OK_URL, OK_TEXT)])
    assert find_duplicates(df)[schema.UID].tolist() == ["a.wat.gz:00003"]


def test_hash_collisions_are_not_duplicates() -> None:
    rows = [
        (OK_URL, OK_TEXT),
        (OK_URL, OK_TEXT + "!"),  # same url, other text
        ("https://img.example.org/photos/dog.jpg", OK_TEXT),  # other url, same text
        (OK_URL, OK_TEXT.upper()),  # exact comparison: case matters
        (OK_URL + " ", OK_TEXT),
        (OK_URL, OK_TEXT),  # the only real duplicate
    ]
    df = candidates(rows, hashes=[42] * len(rows))
    assert df[schema.HASH].nunique() == 1
    dups = find_duplicates(df)
    assert dups[schema.UID].tolist() == ["a.wat.gz:00005"]
    marked = mark_duplicates(df, dups[schema.UID])
    assert marked[schema.DROP_REASON].tolist() == [pd.NA] * 5 + ["duplicate"]


def test_mark_duplicates_accepts_set_and_series_and_keeps_earlier_reasons() -> None:
    df = candidates([(OK_URL, OK_TEXT), (OK_URL, "abc"), (OK_URL, OK_TEXT)])
    before = df.copy(deep=True)
    uids = {"a.wat.gz:00001", "a.wat.gz:00002", "not-here"}
    by_set = mark_duplicates(df, uids)
    by_series = mark_duplicates(df, pd.Series(sorted(uids), dtype="string"))
    pdt.assert_frame_equal(by_set, by_series)
    pdt.assert_frame_equal(df, before)
    assert by_set[schema.DROP_REASON].tolist() == [pd.NA, "text_too_short", "duplicate"]
    assert by_set[schema.DROP_REASON].dtype == "string"
    pdt.assert_frame_equal(mark_duplicates(df, set()), df)


def _global_duplicates_reference(pdf: pd.DataFrame) -> pd.DataFrame:
    return mark_duplicates(pdf, find_duplicates(pdf)[schema.UID])


def test_dask_shuffle_dedup_equals_pandas(client) -> None:
    # three files, duplicates inside a file, across files and across partitions; two rows share
    # a forced hash with a different pair; one duplicate pair is already dropped for short text
    f1 = [
        (OK_URL, OK_TEXT),
        ("https://a.org/1.jpg", "first pair"),
        (OK_URL, OK_TEXT),
        ("https://a.org/2.jpg", "ab"),
        ("https://a.org/3.png", "third pair"),
    ]
    f2 = [
        ("https://a.org/1.jpg", "first pair"),
        ("https://a.org/4.jpg", "collides"),
        ("https://a.org/2.jpg", "ab"),
        ("data:,x", "first pair"),
        (OK_URL, OK_TEXT),
    ]
    f3 = [
        ("https://a.org/3.png", "third pair"),
        ("https://a.org/5.jpg", "also collides"),
        ("https://a.org/1.jpg", "first pair"),
        ("https://a.org/6.jpg", "unique pair"),
    ]
    parts = [
        candidates(f1, source="f1"),
        candidates(f2, source="f2", start=5),
        candidates(f3, source="f3", start=10),
    ]
    parts[1].loc[6, schema.HASH] = 7  # forced collision between f2:6 and f3:11
    parts[2].loc[11, schema.HASH] = 7
    pdf = pd.concat(parts)
    expected = _global_duplicates_reference(pdf)
    assert expected[schema.DROP_REASON].eq("duplicate").sum() == 5

    ddf = dd.from_pandas(pdf, npartitions=3, sort=False)
    assert ddf.npartitions == 3
    dups = (
        ddf[DEDUP_COLUMNS]
        .shuffle(schema.HASH)
        .map_partitions(find_duplicates, meta=DUPLICATES_META)
        .compute()
    )
    assert sorted(dups[schema.UID]) == sorted(find_duplicates(pdf)[schema.UID])
    meta = schema.empty(schema.PAIRS_DTYPES, schema.RULES_DTYPES)
    marked = ddf.map_partitions(mark_duplicates, set(dups[schema.UID]), meta=meta)
    assert_eq(marked, expected)
    # counts add up after dedup: 14 rows = 6 kept + 5 duplicate + 2 short + 1 bad scheme
    out = marked.compute()
    counts = out[schema.DROP_REASON].value_counts().to_dict()
    assert counts == {"duplicate": 5, "text_too_short": 2, "bad_url_scheme": 1}
    assert len(out) == 14 == out[schema.DROP_REASON].isna().sum() + sum(counts.values())


def test_bad_scheme_equals_urllib_on_every_row_for_random_urls():
    """The plain-authority shortcut gives what asking urllib about every row gives.

    The reference is the rule before the shortcut: scheme allowed by the regex, then
    ``urlsplit`` + ``.port`` + ``.hostname`` on each such row.
    """
    import numpy as np

    from laion_dask.stages.rules import _SCHEME_HOST, _bad_scheme, _parses

    rng = np.random.default_rng(11)
    pieces = ["http://", "https://", "HTTPS://", "ftp://", "a", "B.", "-", "_", "~", "%2F", "/"]
    pieces += [":", "80", "99999", "@", "[", "]", "::1", "?", "#", " ", "\t", "é", "ｅ", "！", "'"]
    urls = ["".join(rng.choice(pieces, size=rng.integers(1, 10))) for _ in range(5000)]
    urls += ["http://a", "http://a:", "http://:80", "http://@a", "http://[::1]", "http://a b/"]
    url = pd.Series(urls, dtype="string")
    allowed = ("http", "https")
    scheme = url.str.extract(_SCHEME_HOST, expand=False).str.lower()
    expect = ~np.array(
        [bool(s in allowed and _parses(u)) for s, u in zip(scheme.fillna(""), urls, strict=True)]
    )
    assert (_bad_scheme(url, allowed) == expect).all()
    assert expect.sum() > 100 and (~expect).sum() > 100  # both outcomes are exercised
