"""Frozen, validated configuration for every stage, read from and written to TOML.

Each stage has one dataclass; :class:`PipelineConfig` nests them under the section names used in
``config.toml`` (``[input]``, ``[extract]``, ``[language]``, ...). Values are checked on
construction, so a wrong value raises :class:`ConfigError` naming ``section.key`` before any work
starts. Unknown keys are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import tomli_w

__all__ = [
    "ConfigError",
    "InputConfig",
    "ExtractConfig",
    "LanguageConfig",
    "RulesConfig",
    "DownloadConfig",
    "ClipConfig",
    "FilterConfig",
    "SubsetConfig",
    "ClusterConfig",
    "ConsentConfig",
    "PipelineConfig",
    "load_config",
    "dump_config",
    "config_from_dict",
    "config_to_dict",
    "parse_bytes",
    "config_warnings",
    "filters_table",
]

DEFAULT_USER_AGENT = (
    "laion-dask/0.1 (+https://github.com/laion-dask/laion-dask; image-text dataset research)"
)


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the ``section.key``."""


def _fail(section: str, key: str, message: str, value: Any) -> None:
    raise ConfigError(f"{section}.{key}: {message}, got {value!r}")


def _positive(section: str, key: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        _fail(
            section,
            key,
            "must be a " + ("non-negative" if allow_zero else "positive") + " number",
            value,
        )


def _fraction(section: str, key: str, value: Any, *, lo: float = 0.0, hi: float = 1.0) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        _fail(section, key, f"must be a number in [{lo}, {hi}]", value)


def _choice(section: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(section, key, f"must be one of {', '.join(choices)}", value)


def _optional_fraction(section: str, key: str, value: Any) -> None:
    if value is not None:
        _fraction(section, key, value)


@dataclass(frozen=True, kw_only=True)
class InputConfig:
    """What to read: paths, globs, fsspec URLs or crawl ids (``CC-MAIN-2024-22``)."""

    SECTION: ClassVar[str] = "input"
    paths: tuple[str, ...] = ()
    #: for crawl ids: which listing to expand (``wat`` or ``warc``)
    crawl_format: str = "wat"
    #: keep at most this many files after expansion (None = all)
    limit: int | None = None
    #: keep this fraction of files (sampled with ``seed``) before ``limit`` applies
    sample: float | None = None
    seed: int = 0
    #: base URL of the Common Crawl data host, used to expand crawl ids
    crawl_base_url: str = "https://data.commoncrawl.org/"

    def __post_init__(self) -> None:
        s = self.SECTION
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        _choice(s, "crawl_format", self.crawl_format, ("wat", "warc"))
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            _fail(s, "limit", "must be a positive integer or unset", self.limit)
        if self.sample is not None:
            _fraction(s, "sample", self.sample)
            if self.sample == 0:
                _fail(s, "sample", "must be in (0, 1]", self.sample)
        if not isinstance(self.seed, int):
            _fail(s, "seed", "must be an integer", self.seed)


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """WAT/WARC parsing: one input file -> one partition of candidate pairs."""

    SECTION: ClassVar[str] = "extract"
    #: ``auto`` parses WAT JSON metadata records and HTML responses alike (records say which they
    #: are); ``wat`` / ``warc`` parse only that kind
    format: str = "auto"
    #: ``auto`` = FastWARC where it reads the file, warcio otherwise (ARC, odd files)
    reader: str = "auto"
    #: alt text is truncated to this many characters after clean-up
    max_text_chars: int = 2000
    #: HTML bodies larger than this are skipped (counted as ``html_too_large``)
    max_html_bytes: int = 10_000_000
    #: an unreadable file becomes an empty partition + an error in its summary instead of raising
    skip_unreadable_files: bool = True

    def __post_init__(self) -> None:
        s = self.SECTION
        _choice(s, "format", self.format, ("auto", "wat", "warc"))
        _choice(s, "reader", self.reader, ("auto", "fastwarc", "warcio"))
        _positive(s, "max_text_chars", self.max_text_chars)
        _positive(s, "max_html_bytes", self.max_html_bytes)


@dataclass(frozen=True, kw_only=True)
class LanguageConfig:
    """Alt-text language identification."""

    SECTION: ClassVar[str] = "language"
    #: ``py3langid`` (default: most accurate on short alt texts and fastest), ``langid`` or
    #: ``lingua`` (optional extra); see benchmarks/RESULTS-language.md
    backend: str = "py3langid"
    #: below this normalised probability the language group is ``nolang``; 0.40 with
    #: ``english_prior`` 10 labels ~80% of 2-4 word strings at ~0.955 accuracy (py3langid)
    min_confidence: float = 0.40
    #: prior odds factor for English (1.0 = the model's uniform prior); short English alt text
    #: otherwise falls into ``nolang`` far more often than other languages
    english_prior: float = 10.0

    def __post_init__(self) -> None:
        s = self.SECTION
        _choice(s, "backend", self.backend, ("py3langid", "langid", "lingua"))
        _fraction(s, "min_confidence", self.min_confidence)
        _positive(s, "english_prior", self.english_prior)
        if self.english_prior < 1:
            _fail(s, "english_prior", "must be >= 1 (1 = no prior)", self.english_prior)


@dataclass(frozen=True, kw_only=True)
class RulesConfig:
    """Extraction rules; each failing rule is a named ``drop_reason``."""

    SECTION: ClassVar[str] = "rules"
    min_text_chars: int = 5
    max_url_chars: int = 2000
    allowed_schemes: tuple[str, ...] = ("http", "https")
    blocked_extensions: tuple[str, ...] = (".svg", ".gif")
    deduplicate: bool = True

    def __post_init__(self) -> None:
        s = self.SECTION
        object.__setattr__(self, "allowed_schemes", tuple(self.allowed_schemes))
        object.__setattr__(self, "blocked_extensions", tuple(self.blocked_extensions))
        _positive(s, "min_text_chars", self.min_text_chars, allow_zero=True)
        _positive(s, "max_url_chars", self.max_url_chars)
        if not self.allowed_schemes:
            _fail(s, "allowed_schemes", "must name at least one scheme", self.allowed_schemes)
        for ext in self.blocked_extensions:
            if not ext.startswith("."):
                _fail(s, "blocked_extensions", "entries must start with '.'", ext)


@dataclass(frozen=True, kw_only=True)
class DownloadConfig:
    """Image fetching, decoding and resizing."""

    SECTION: ClassVar[str] = "download"
    #: concurrent requests per partition task
    concurrency: int = 64
    #: requests in flight to one host; the download plan gives a host to one task at a time,
    #: so this bounds the whole cluster
    per_host_concurrency: int = 8
    #: minimum seconds between the starts of two requests to one host (0 = no spacing), kept
    #: across the calls of a host's chain: a cluster-wide rate of at most 1/interval per host
    per_host_interval: float = 0.0
    connect_timeout: float = 10.0
    read_timeout: float = 10.0
    #: overall per-image deadline: a trickling server cannot hold a slot longer than this
    deadline: float = 30.0
    retries: int = 2
    retry_backoff: float = 0.5
    #: a 429/503 ``Retry-After`` longer than this is cut to it (seconds)
    max_retry_after: float = 10.0
    max_redirects: int = 5
    max_bytes: int = 20_000_000
    min_bytes: int = 5_000
    max_pixels: int = 89_478_484
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
    resize_mode: str = "keep_ratio"
    image_size: int = 256
    #: ``resize_only_if_bigger`` as img2dataset: never upscale
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    user_agent: str = DEFAULT_USER_AGENT
    #: honour X-Robots-Tag noai / noimageai / noindex / noimageindex
    respect_robots_headers: bool = True
    #: allow loopback / private / link-local targets (only the offline demo and tests)
    allow_private_networks: bool = False
    #: bound on bytes held in flight per task (bodies being read + decoded images)
    max_inflight_bytes: int = 256_000_000
    #: rows per download task; candidate partitions are split into chunks of this size
    rows_per_task: int = 2_000
    #: threads decoding/resizing per task, off the event loop (Pillow releases the GIL; a few
    #: more than the cores a task gets keeps them busy while one thread holds the GIL)
    decode_threads: int = 4

    def __post_init__(self) -> None:
        s = self.SECTION
        object.__setattr__(self, "formats", tuple(f.upper() for f in self.formats))
        for key in (
            "concurrency",
            "per_host_concurrency",
            "max_bytes",
            "image_size",
            "max_pixels",
            "max_inflight_bytes",
            "rows_per_task",
            "decode_threads",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(s, key, "must be a positive integer", value)
        for key in ("connect_timeout", "read_timeout", "deadline"):
            _positive(s, key, getattr(self, key))
        _positive(s, "retry_backoff", self.retry_backoff, allow_zero=True)
        _positive(s, "max_retry_after", self.max_retry_after, allow_zero=True)
        _positive(s, "per_host_interval", self.per_host_interval, allow_zero=True)
        if self.per_host_interval * self.per_host_concurrency >= self.deadline:
            # a row waits for the spacing inside its deadline: it would fail without a request
            _fail(
                s,
                "per_host_interval",
                f"x per_host_concurrency ({self.per_host_concurrency}) must be under deadline "
                f"({self.deadline:g}s)",
                self.per_host_interval,
            )
        for key in ("retries", "max_redirects", "min_bytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(s, key, "must be a non-negative integer", value)
        if self.min_bytes > self.max_bytes:
            _fail(s, "min_bytes", f"must not exceed max_bytes ({self.max_bytes})", self.min_bytes)
        _choice(s, "resize_mode", self.resize_mode, ("no", "keep_ratio", "center_crop", "border"))
        _choice(s, "encode_format", self.encode_format, ("jpg", "png", "webp"))
        if not isinstance(self.encode_quality, int) or not 1 <= self.encode_quality <= 100:
            _fail(s, "encode_quality", "must be an integer in [1, 100]", self.encode_quality)
        known = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
        for f in self.formats:
            if f not in known:
                _fail(s, "formats", f"entries must be among {sorted(known)}", f)
        if not self.user_agent.strip():
            _fail(s, "user_agent", "must not be empty", self.user_agent)


@dataclass(frozen=True, kw_only=True)
class ClipConfig:
    """CLIP scoring: similarity, embeddings, punsafe/pwatermark tags."""

    SECTION: ClassVar[str] = "clip"
    #: hub name or local path of any transformers model with get_image/text_features
    model: str = "openai/clip-vit-base-patch32"
    revision: str | None = None
    #: text tower for ``multi``/``nolang`` rows (LAION: clip-ViT-B-32-multilingual-v1); None = use
    #: ``model``'s own text tower for every row
    multilingual_text_model: str | None = None
    multilingual_revision: str | None = None
    #: ``auto`` = cuda when visible, else cpu
    device: str = "auto"
    #: ``auto`` = float16 on cuda, float32 on cpu
    dtype: str = "auto"
    batch_size: int = 64
    #: threads decoding and preprocessing images while the model runs
    loader_threads: int = 2
    #: torch intra-op threads on CPU (0 = the worker's threads)
    torch_threads: int = 0
    #: ``zero-shot`` from prompt sets, or ``head`` = a learned probe loaded from ``tag_head``
    tags: str = "zero-shot"
    tag_head: str | None = None
    write_embeddings: bool = True
    #: decode JPEGs at a reduced DCT scale when >= 2x the model's input (faster, ~1e-3 change)
    jpeg_draft: bool = True
    #: decoder processes per worker process (0 = decode in the loader threads); they need a
    #: non-daemonic worker (``distributed.worker.daemon = False``, which ``make_client`` sets
    #: for a local cluster when this is > 0)
    loader_processes: int = 0

    #: LAION-5B's recipe: ViT-B/32 images + English text, mCLIP text tower for other languages
    LAION_MULTILINGUAL: ClassVar[dict[str, str]] = {
        "model": "openai/clip-vit-base-patch32",
        "multilingual_text_model": "sentence-transformers/clip-ViT-B-32-multilingual-v1",
    }

    @classmethod
    def laion_multilingual(cls, **overrides: Any) -> ClipConfig:
        """The LAION-5B preset (``LAION_MULTILINGUAL``), with ``overrides`` applied."""
        return cls(**{**cls.LAION_MULTILINGUAL, **overrides})

    def __post_init__(self) -> None:
        s = self.SECTION
        if not self.model:
            _fail(s, "model", "must name a hub model or a local path", self.model)
        _choice(s, "device", self.device, ("auto", "cpu", "cuda"))
        _choice(s, "dtype", self.dtype, ("auto", "float32", "float16", "bfloat16"))
        for key in ("batch_size", "loader_threads"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(s, key, "must be a positive integer", value)
        for key in ("torch_threads", "loader_processes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(s, key, "must be a non-negative integer", value)
        _choice(s, "tags", self.tags, ("zero-shot", "head"))
        if self.tags == "head" and not self.tag_head:
            _fail(s, "tag_head", "must be set when tags = 'head'", self.tag_head)


class FrozenDict(dict):
    """A read-only, hashable ``dict``: lets a frozen config hold a table of tables (and still
    be hashed, compared, pickled and turned into TOML by :func:`dataclasses.asdict`)."""

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{type(self).__name__} is read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


#: names a subset cannot take: the base dataset's language-group folders (schema.LANGUAGE_GROUPS)
RESERVED_SUBSET_NAMES = ("en", "multi", "nolang")
_SUBSET_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def check_subset_name(name: Any, section: str = "filters.subsets") -> str:
    """``name`` if it can name an output subset (a folder ``RUN/dataset/NAME``), else ConfigError.

    1-64 lower-case ASCII letters, digits, ``-`` or ``_``, starting with a letter or digit, and
    not a language group (``en``, ``multi``, ``nolang``: the base dataset's folders).
    """
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= 64
        and set(name) <= _SUBSET_NAME_CHARS
        and name[0] not in "-_"
    )
    if not ok:
        _fail(
            section,
            str(name),
            "a subset name must be 1-64 lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit",
            name,
        )
    if name in RESERVED_SUBSET_NAMES:
        _fail(section, name, "is a language group's folder; choose another subset name", name)
    return name


def _check_cut(where: str, table: Mapping[str, Any]) -> None:
    known = [f.name for f in fields(SubsetConfig)]
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(known)})")
    for key in known:
        _optional_fraction(where, key, table.get(key))
    if all(table.get(key) is None for key in known):
        raise ConfigError(f"{where}: sets no cut-off (give max_punsafe and/or max_pwatermark)")


@dataclass(frozen=True, kw_only=True)
class SubsetConfig:
    """One output subset: cut-offs applied on top of ``[filters]`` to the rows it keeps, as
    Re-LAION's ``research`` and ``research-safe`` releases cut on ``punsafe``. Read from a
    ``[filters.subsets.NAME]`` table; materialize writes it to ``RUN/dataset/NAME/``.
    """

    SECTION: ClassVar[str] = "filters.subsets.<name>"
    #: drop rows whose punsafe / pwatermark exceed these (None = no cut on that tag); a row
    #: with no score for a tag the subset cuts on is dropped too (``missing_punsafe`` ...)
    max_punsafe: float | None = None
    max_pwatermark: float | None = None

    def __post_init__(self) -> None:
        _check_cut(self.SECTION, {f.name: getattr(self, f.name) for f in fields(self)})


def _subsets(section: str, value: Any) -> FrozenDict | None:
    """``[filters.subsets]`` -> name -> SubsetConfig (read-only); None when there are none."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        _fail(section, "subsets", "must be a table of tables ([filters.subsets.NAME])", value)
    out: dict[str, SubsetConfig] = {}
    for name, table in value.items():
        where = f"{section}.subsets.{check_subset_name(name, f'{section}.subsets')}"
        if isinstance(table, SubsetConfig):
            out[name] = table
            continue
        if not isinstance(table, Mapping):
            raise ConfigError(
                f"{where}: must be a table with max_punsafe and/or max_pwatermark, got {table!r}"
            )
        _check_cut(where, table)
        out[name] = SubsetConfig(**table)
    return FrozenDict(out) if out else None


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """Thresholds applied to stored scores at explore/materialize time (never rescoring)."""

    SECTION: ClassVar[str] = "filters"
    similarity_en: float = 0.28  # LAION-5B English cut, CLIP ViT-B/32
    similarity_multi: float = 0.26  # LAION-5B cut for other languages (mCLIP text tower)
    similarity_nolang: float = 0.26
    #: drop rows whose punsafe / pwatermark exceed these (None = tag only)
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    min_side: int = 0
    max_aspect_ratio: float | None = None
    min_text_chars: int = 5
    #: extra output subsets, ``[filters.subsets.NAME]`` tables (:class:`SubsetConfig`): each
    #: is written to ``RUN/dataset/NAME/`` with its own cut-offs on top of these thresholds;
    #: None = none (the base dataset alone, in ``RUN/dataset/{en,multi,nolang}``)
    subsets: Mapping[str, SubsetConfig] | None = None

    def __post_init__(self) -> None:
        s = self.SECTION
        object.__setattr__(self, "subsets", _subsets(s, self.subsets))
        for key in ("similarity_en", "similarity_multi", "similarity_nolang"):
            _fraction(s, key, getattr(self, key), lo=-1.0, hi=1.0)
        _optional_fraction(s, "max_punsafe", self.max_punsafe)
        _optional_fraction(s, "max_pwatermark", self.max_pwatermark)
        _positive(s, "min_side", self.min_side, allow_zero=True)
        _positive(s, "min_text_chars", self.min_text_chars, allow_zero=True)
        if self.max_aspect_ratio is not None:
            _positive(s, "max_aspect_ratio", self.max_aspect_ratio)
            if self.max_aspect_ratio < 1:
                _fail(s, "max_aspect_ratio", "must be >= 1", self.max_aspect_ratio)

    def similarity_for(self, group: str) -> float:
        """Threshold for one language group (``en``, ``multi`` or ``nolang``)."""
        return {"en": self.similarity_en, "multi": self.similarity_multi}.get(
            group, self.similarity_nolang
        )


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Where the Dask graph runs."""

    SECTION: ClassVar[str] = "cluster"
    #: ``tcp://host:8786`` of a running scheduler; None = start a local cluster
    scheduler_address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str = "auto"
    #: ``auto`` = LocalCUDACluster when CUDA and dask-cuda are present, ``never``, ``require``
    gpu: str = "auto"
    dashboard_address: str | None = "127.0.0.1:8787"
    #: processes (True) or threads in one process (False) for the local cluster
    processes: bool = True
    #: bytes: glibc's ``MALLOC_MMAP_THRESHOLD_`` in the local cluster's worker processes
    #: (through ``distributed.nanny.pre-spawn-environ``); unset = leave Dask's environment as it
    #: is. Dask's Nanny sets ``MALLOC_TRIM_THRESHOLD_``, which also pins glibc's mmap threshold
    #: at 128 KiB: every larger temporary array is then a fresh ``mmap`` whose pages fault in
    #: again on each use (the report's statistics pass runs ~1.4x slower for it). A higher
    #: threshold (at most ``33554432``, 32 MiB, glibc's limit on 64-bit) serves those arrays
    #: from the heap and reuses its pages. The cost is memory: a freed block under the
    #: threshold stays in the heap until the heap's top is free (the trim threshold still
    #: applies there), so a worker's unmanaged memory can stay higher after large tasks. Local
    #: worker processes only, and only those the cluster starts with: remote workers (and
    #: ``processes = false``) are configured where they start.
    malloc_mmap_threshold: int | None = None

    def with_flags(
        self,
        *,
        scheduler: str | None = None,
        workers: int | None = None,
        threads: int | None = None,
        no_dashboard: bool = False,
    ) -> ClusterConfig:
        """This section with a command's cluster flags on top (validated again); ``self`` when
        none is given. ``scheduler`` falls back to ``$DASK_SCHEDULER_ADDRESS``.

        One rule for ``laion-dask`` and the dashboard's materialize button.
        """
        changes: dict[str, Any] = {}
        scheduler = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
        if scheduler:
            changes["scheduler_address"] = scheduler
        if workers is not None:
            changes["n_workers"] = workers
        if threads is not None:
            changes["threads_per_worker"] = threads
        if no_dashboard:
            changes["dashboard_address"] = None
        return dataclasses.replace(self, **changes) if changes else self

    def __post_init__(self) -> None:
        s = self.SECTION
        for key in ("n_workers", "threads_per_worker"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                _fail(s, key, "must be a positive integer or unset", value)
        value = self.malloc_mmap_threshold
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**25
        ):
            _fail(s, "malloc_mmap_threshold", "must be bytes in [0, 33554432] or unset", value)
        _choice(s, "gpu", self.gpu, ("auto", "never", "require"))
        if self.scheduler_address is not None and "://" not in self.scheduler_address:
            _fail(s, "scheduler_address", "must look like tcp://host:8786", self.scheduler_address)


@dataclass(frozen=True, kw_only=True)
class ConsentConfig:
    """Opt-out signals honoured and blocklists applied. Everything is on by default; a run that
    switches a check off says so in its ``config.toml``.
    """

    SECTION: ClassVar[str] = "consent"
    #: page level, at extraction: ``<meta name="robots">`` (and crawler-specific names such as
    #: ``googlebot``) carrying one of ``meta_tokens`` drops the page's pairs as ``page_robots_meta``
    page_meta: bool = True
    meta_tokens: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    #: meta names read as robots directives (lower case; ``robots`` addresses every crawler, the
    #: others name one: Common Crawl's, Google's and our own product token)
    meta_names: tuple[str, ...] = ("robots", "ccbot", "googlebot", "googlebot-image", "laion-dask")
    #: W3C TDMRep: ``<meta name="tdm-reservation" content="1">`` drops the page's pairs as
    #: ``page_tdm_reservation``
    tdm_reservation: bool = True
    #: image level, at download: a ``tdm-reservation: 1`` response header makes the row
    #: ``disallowed_tdm_reservation`` (``X-Robots-Tag`` is ``download.respect_robots_headers``)
    tdm_header: bool = True
    #: host level: robots.txt for our User-Agent's product token (RFC 9309), fetched once per
    #: host and cached in RUN/consent/; a disallowed URL is ``disallowed_robots_txt``
    robots_txt: bool = True
    #: what a robots.txt answering 4xx (RFC 9309 "unavailable") means: ``allow`` (RFC 9309)
    robots_txt_on_4xx: str = "allow"
    #: what a robots.txt answering 5xx/429 or timing out (RFC 9309 "unreachable") means:
    #: ``disallow`` (RFC 9309; rows become ``robots_txt_unreachable``). A host that accepts no
    #: connection at all is a download failure (``failed_to_download``, retried later), not this
    robots_txt_on_error: str = "disallow"
    #: host level: W3C TDMRep ``/.well-known/tdmrep.json``; a URL under a reserved location is
    #: ``disallowed_tdmrep`` (no file, or an unreadable one, reserves nothing)
    tdmrep: bool = True
    #: total seconds for fetching one host file (robots.txt, tdmrep.json), redirects included
    host_file_timeout: float = 10.0
    #: user opt-out lists of domains (text: one per line, ``#`` comments; parquet: a ``domain``
    #: column); a domain covers its subdomains; rows become ``opted_out_domain`` with no request
    domain_optout_lists: tuple[str, ...] = ()
    #: MD5 / SHA-256 hex digests of URL strings (text, or parquet with a ``hash``, ``md5`` or
    #: ``sha256`` column); rows become ``blocklisted_url`` with no request
    url_blocklists: tuple[str, ...] = ()
    #: MD5 / SHA-1 / SHA-256 hex digests of original image bytes (text, or parquet with a
    #: ``hash``, ``md5``, ``sha1`` or ``sha256`` column); checked before decoding, the bytes are
    #: dropped and the row becomes ``blocklisted_image``
    image_blocklists: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        s = self.SECTION
        for key in ("page_meta", "tdm_reservation", "tdm_header", "robots_txt", "tdmrep"):
            if not isinstance(getattr(self, key), bool):
                _fail(s, key, "must be true or false", getattr(self, key))
        for key in ("meta_tokens", "meta_names"):
            value = getattr(self, key)
            if not isinstance(value, tuple) or not all(
                isinstance(t, str) and t and t == t.strip().lower() for t in value
            ):
                _fail(s, key, "must be a list of lower-case words", value)
        _choice(s, "robots_txt_on_4xx", self.robots_txt_on_4xx, ("allow", "disallow"))
        _choice(s, "robots_txt_on_error", self.robots_txt_on_error, ("allow", "disallow"))
        _positive(s, "host_file_timeout", self.host_file_timeout)
        for key in ("domain_optout_lists", "url_blocklists", "image_blocklists"):
            value = getattr(self, key)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, key, value)
            if not isinstance(value, tuple) or not all(
                isinstance(p, str) and p.strip() for p in value
            ):
                _fail(s, key, "must be a list of file paths or URLs", value)
            object.__setattr__(self, key, tuple(str(p).strip() for p in value))


#: byte-size units: SI (``KB`` = 1000) and binary (``KiB`` = 1024), as Dask's ``parse_bytes``
#: and ``humanize`` write them; a bare ``B`` or no unit is bytes
_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "p": 10**15,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
_BYTE_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """``"4GB"`` -> 4_000_000_000, ``"1.5 GiB"`` -> 1_610_612_736, ``"512"`` -> 512.

    SI units are powers of 1000 and binary ones (``KiB`` ...) powers of 1024, case-insensitive;
    a fractional result is rounded to whole bytes. Raises ``ValueError`` on anything else
    (a negative number, an unknown unit, an empty string).
    """
    match = _BYTE_SIZE.match(text) if isinstance(text, str) else None
    unit = match.group(3).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(f"cannot read {text!r} as a byte size (e.g. 4GB, 512MiB, 1e9)")
    number = float(match.group(1)) * 10 ** int(match.group(2) or 0)
    return int(round(number * _BYTE_UNITS[unit]))


def _parse_bytes(value: int | str, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected bytes (e.g. 4GB), got {value!r}")
    if isinstance(value, int):
        out = value
    else:
        try:
            out = parse_bytes(value)
        except ValueError as err:
            raise ConfigError(f"{where}: cannot read {value!r} as bytes (e.g. 4GB)") from err
    if out <= 0:
        raise ConfigError(f"{where}: must be positive, got {value!r}")
    return out


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """How ``laion-dask index`` chooses, trains and checks an index (TOML table ``[index]``;
    the CLI's flags override it)."""

    SECTION: ClassVar[str] = "index"
    #: bytes the index may take in memory when searched (``"4GB"`` or an int)
    memory_budget: int | str = "4GB"
    #: exact Flat search up to this many vectors (a Flat query scans every vector)
    flat_max_vectors: int = 100_000
    #: nprobe is the smallest reaching this recall@k on the evaluation queries
    target_recall: float = 0.95
    recall_k: int = 10
    #: evaluation queries, drawn from the run's own vectors (their own id excluded)
    eval_queries: int = 500
    #: IVF lists; None = a power of two near sqrt(n)
    nlist: int | None = None
    #: training vectors per IVF list (faiss asks for at least 39)
    train_per_list: int = 40
    max_train_vectors: int = 200_000
    #: a faiss index_factory string that overrides the choice (inner-product metric)
    factory: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "memory_budget", _parse_bytes(self.memory_budget, "index.memory_budget")
        )
        ints = {
            "flat_max_vectors": (self.flat_max_vectors, 0),
            "recall_k": (self.recall_k, 1),
            "eval_queries": (self.eval_queries, 1),
            "train_per_list": (self.train_per_list, 1),
            "max_train_vectors": (self.max_train_vectors, 1),
        }
        for key, (value, low) in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"index.{key}: expected an integer >= {low}, got {value!r}")
        if self.nlist is not None and (not isinstance(self.nlist, int) or self.nlist < 1):
            raise ConfigError(f"index.nlist: expected an integer >= 1, got {self.nlist!r}")
        if not 0.0 < float(self.target_recall) <= 1.0:
            raise ConfigError(f"index.target_recall: must be in (0, 1], got {self.target_recall}")

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_budget)


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The whole run: one section per stage. ``strict`` stops at the first unreadable file."""

    input: InputConfig = field(default_factory=InputConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    consent: ConsentConfig = field(default_factory=ConsentConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    strict: bool = False

    def replace(self, section: str, **changes: Any) -> PipelineConfig:
        """Return a copy with ``changes`` applied to one section (validated again)."""
        return dataclasses.replace(
            self, **{section: dataclasses.replace(getattr(self, section), **changes)}
        )


_SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in fields(PipelineConfig)
    if f.name != "strict"
}


def _section_from_dict(cls: type, name: str, data: Mapping[str, Any]) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name}: must be a table, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:  # wrong type reaching a comparison inside a check
        raise ConfigError(f"{name}: {err}") from err


#: the table of facts a run appends to its ``config.toml`` (model revisions resolved, ...):
#: written by the run, read by nobody as configuration, so a run's own file is reusable as is
RUN_FACTS_SECTION = "run"


def config_from_dict(data: Mapping[str, Any]) -> PipelineConfig:
    """Build a validated :class:`PipelineConfig` from nested mappings (as read from TOML).

    A ``[run]`` table (the facts a run records in its ``config.toml``) is skipped, so the file a
    run wrote is accepted as ``--config`` and by ``laion-dask run`` unchanged.
    """
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == RUN_FACTS_SECTION:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: must be a table of run facts, got {value!r}")
            continue
        if key == "strict":
            if not isinstance(value, bool):
                raise ConfigError(f"strict: must be true or false, got {value!r}")
            kwargs[key] = value
        elif key in _SECTIONS:
            kwargs[key] = _section_from_dict(_SECTIONS[key], key, value)
        else:
            raise ConfigError(
                f"{key}: unknown section (known: {', '.join(sorted(_SECTIONS))}, strict, "
                f"{RUN_FACTS_SECTION})"
            )
    return PipelineConfig(**kwargs)


def config_to_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """Nested plain dict; ``None`` values are left out (TOML has no null)."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if v is not None}
        if isinstance(obj, tuple | list):
            return [clean(v) for v in obj]
        return obj

    return clean(dataclasses.asdict(cfg))


def load_config(
    path: str | Path, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> PipelineConfig:
    """Read a TOML file into a validated config; ``overrides`` (section -> key -> value) win."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def dump_config(cfg: PipelineConfig, path: str | Path | None = None) -> str:
    """Write ``cfg`` as TOML (to ``path`` when given) and return the text."""
    text = tomli_w.dumps(config_to_dict(cfg))
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def config_warnings(cfg: PipelineConfig | FilterConfig) -> list[str]:
    """One line per value that is valid but almost certainly not what was meant.

    A negative similarity threshold keeps every scored row (CLIP similarities of matching
    pairs are positive; ``-1`` is the way to say "keep all" and is not warned about), which is
    more often a lost digit or sign than a choice. The CLI prints these before any work starts.
    """
    filters = cfg.filters if isinstance(cfg, PipelineConfig) else cfg
    out = []
    for key in ("similarity_en", "similarity_multi", "similarity_nolang"):
        value = getattr(filters, key)
        if -1.0 < value < 0.0:
            out.append(
                f"filters.{key} = {value:g} keeps every scored row (similarities of matching "
                f"pairs are positive); did you mean {-value:g}? (-1 says keep all)"
            )
    return out


def filters_table(data: Mapping[str, Any], where: str = "thresholds") -> dict[str, Any]:
    """The threshold keys of a thresholds file's TOML (``[filters]`` table or bare keys).

    Refuses what cannot be meant: a file that sets no threshold at all (empty, or only other
    sections), and threshold keys written both in ``[filters]`` and outside it (the bare ones
    would be ignored). Other sections next to ``[filters]`` (a whole ``config.toml``) are fine.
    """
    known = {f.name for f in fields(FilterConfig)}
    table = data.get(FilterConfig.SECTION)
    bare = {k: v for k, v in data.items() if k in known}
    if table is None:
        others = [k for k in data if k not in known]
        if others:
            raise ConfigError(
                f"{where}: no [filters] table, and {', '.join(sorted(others))} "
                f"{'is not a threshold' if len(others) == 1 else 'are not thresholds'} "
                f"(known: {', '.join(sorted(known))})"
            )
        table = bare
    elif not isinstance(table, Mapping):
        raise ConfigError(f"{where}: filters must be a table, got {table!r}")
    elif bare:
        raise ConfigError(
            f"{where}: {', '.join(sorted(bare))} outside the [filters] table would be ignored; "
            "move it into [filters]"
        )
    if not table:
        raise ConfigError(
            f"{where}: sets no threshold; write a [filters] table (e.g. similarity_en = 0.28), "
            "or export one from `laion-dask dashboard RUN`"
        )
    for key in table:
        if key not in known:
            raise ConfigError(f"filters.{key}: unknown key (known: {', '.join(sorted(known))})")
    return dict(table)
