"""Column names and dtypes each stage adds: the single source for Dask ``meta=``.

Stages add columns and never drop rows. The frames below are empty pandas frames with the exact
dtypes a stage returns, so ``map_partitions(stage, meta=schema.CANDIDATES)`` never runs a stage
(or a model) on fake rows.
"""

from __future__ import annotations

import pandas as pd

# --- column names -------------------------------------------------------------------------------
UID = "uid"
URL = "url"
TEXT = "text"
PAGE_URL = "page_url"
SOURCE_FILE = "source_file"
RECORD_OFFSET = "record_offset"
#: a URL's scheme (RFC 3986 characters): the rules and the report both start their URL regexes here
URL_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*"

HASH = "hash"  # LAION's join key: mmh3.hash64(url + text)[0], signed int64

LANGUAGE = "language"
LANGUAGE_SCORE = "language_score"
LANGUAGE_GROUP = "language_group"  # en | multi | nolang

# what the page said about itself, recorded at extraction; [consent] decides what it means
PAGE_ROBOTS = "page_robots"  # sorted directives of its robots-style <meta>s ("noai,noindex")
PAGE_TDM = "page_tdm"  # <meta name="tdm-reservation" content="1"> (TDMRep)
DROP_REASON = "drop_reason"  # <NA> = kept

KEY = "key"  # webdataset key, img2dataset style: shard id + row within shard
SHARD = "shard"  # shard file name relative to RUN/images/
STATUS = "status"
ERROR_MESSAGE = "error_message"
HTTP_STATUS = "http_status"
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
WIDTH = "width"
HEIGHT = "height"
ORIGINAL_BYTES = "original_bytes"
SHA256 = "sha256"
IMAGE = "image"  # encoded, resized image bytes; only between download and the shard writer

SIMILARITY = "similarity"
PUNSAFE = "punsafe"
PWATERMARK = "pwatermark"
SCORE_STATUS = "score_status"

LANGUAGE_GROUPS = ("en", "multi", "nolang")

# drop reasons written by the extraction rules (rules.py), in the order they are checked
EXTRACT_DROP_REASONS = (
    "page_robots_meta",  # the page's robots meta tag says noai/noimageai/noindex/noimageindex
    "page_tdm_reservation",  # the page reserves text-and-data-mining rights (W3C TDMRep meta)
    "bad_url_scheme",
    "url_too_long",
    "blocked_extension",
    "text_too_short",
    "duplicate",
)

DOWNLOAD_STATUSES = (
    "success",
    "failed_to_download",
    "failed_to_decode",
    "disallowed",  # X-Robots-Tag noai / noimageai / noindex / noimageindex for our agent
    "too_small",
    "too_large",
    "unsupported_format",
    "blocked_address",
    # consent and safety ([consent] section); see laion_dask/stages/consent.py
    "blocklisted_url",  # URL hash on a user blocklist: no request made
    "opted_out_domain",  # host or a parent domain on a user opt-out list: no request made
    "disallowed_robots_txt",  # robots.txt disallows the path for our product token
    "robots_txt_unreachable",  # robots.txt answered 5xx / 429 or timed out: RFC 9309 says no
    "disallowed_tdmrep",  # /.well-known/tdmrep.json reserves TDM rights for the path
    "disallowed_tdm_reservation",  # the image response carries `tdm-reservation: 1`
    "blocklisted_image",  # image bytes' hash on a user blocklist: bytes dropped, never stored
)
#: download statuses that record an opt-out or a blocklist hit (the report's consent section)
CONSENT_STATUSES = (
    "disallowed",
    "blocklisted_url",
    "opted_out_domain",
    "disallowed_robots_txt",
    "robots_txt_unreachable",
    "disallowed_tdmrep",
    "disallowed_tdm_reservation",
    "blocklisted_image",
)
#: consent statuses decided before any request (the row's host is never contacted)
PRE_REQUEST_STATUSES = ("blocklisted_url", "opted_out_domain")

# --- dtypes per stage ---------------------------------------------------------------------------
STRING = "string"

PAIRS_DTYPES: dict[str, str] = {
    UID: STRING,
    URL: STRING,
    TEXT: STRING,
    PAGE_URL: STRING,
    SOURCE_FILE: STRING,
    RECORD_OFFSET: "int64",
    HASH: "int64",
    PAGE_ROBOTS: STRING,
    PAGE_TDM: "boolean",
}
LANGUAGE_DTYPES: dict[str, str] = {
    LANGUAGE: STRING,
    LANGUAGE_SCORE: "float32",
    LANGUAGE_GROUP: STRING,
}
RULES_DTYPES: dict[str, str] = {DROP_REASON: STRING}

DOWNLOAD_DTYPES: dict[str, str] = {
    STATUS: STRING,
    ERROR_MESSAGE: STRING,
    HTTP_STATUS: "Int32",
    ORIGINAL_WIDTH: "Int32",
    ORIGINAL_HEIGHT: "Int32",
    WIDTH: "Int32",
    HEIGHT: "Int32",
    ORIGINAL_BYTES: "Int64",
    SHA256: STRING,
}
SHARD_DTYPES: dict[str, str] = {KEY: STRING, SHARD: STRING}

SCORE_DTYPES: dict[str, str] = {
    SIMILARITY: "float32",
    PUNSAFE: "float32",
    PWATERMARK: "float32",
    SCORE_STATUS: STRING,
}


def empty(*dtype_maps: dict[str, str]) -> pd.DataFrame:
    """An empty frame with the union of ``dtype_maps``, in order."""
    merged: dict[str, str] = {}
    for m in dtype_maps:
        merged.update(m)
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in merged.items()})


def conform(df: pd.DataFrame, *dtype_maps: dict[str, str]) -> pd.DataFrame:
    """Cast the named columns of ``df`` to their schema dtypes (other columns pass through)."""
    merged: dict[str, str] = {}
    for m in dtype_maps:
        merged.update(m)
    return df.astype({c: t for c, t in merged.items() if c in df.columns})


CANDIDATES_DTYPES: dict[str, str] = {**PAIRS_DTYPES, **LANGUAGE_DTYPES, **RULES_DTYPES}

PAIRS = empty(PAIRS_DTYPES)
LANGUAGE_TAGGED = empty(PAIRS_DTYPES, LANGUAGE_DTYPES)
CANDIDATES = empty(PAIRS_DTYPES, LANGUAGE_DTYPES, RULES_DTYPES)
DOWNLOADS = empty(PAIRS_DTYPES, LANGUAGE_DTYPES, RULES_DTYPES, DOWNLOAD_DTYPES, SHARD_DTYPES)
