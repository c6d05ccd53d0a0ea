"""Frozen, validated configuration for every stage, read from and written to TOML.

Each stage has one dataclass; :class:`PipelineConfig` nests them under the section names used in
``config.toml`` (``[input]``, ``[extract]``, ``[language]``, ...). Values are checked on
construction, so a wrong value raises :class:`ConfigError` naming ``section.key`` before any work
starts. Unknown keys are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, ClassVar, NamedTuple, get_args, get_origin, get_type_hints

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


class _Check(NamedTuple):
    """A field's rule, declared in its annotation (``Annotated[int, POSITIVE_INT]``): a value
    that fails ``ok`` raises ``section.key: message, got value``."""

    message: str
    ok: Callable[[Any], bool]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _in(lo: float, hi: float) -> _Check:
    return _Check(f"must be a number in [{lo}, {hi}]", lambda v: _number(v) and lo <= v <= hi)


def _at_least(low: float, note: str = "") -> _Check:
    """For a field that an earlier check has made a number."""
    return _Check(f"must be >= {low}{note}", lambda v: v >= low)


def _int_at_least(low: int) -> _Check:
    return _Check(f"expected an integer >= {low}", lambda v: _integer(v) and v >= low)


def _one_of(*choices: str) -> _Check:
    return _Check(f"must be one of {', '.join(choices)}", lambda v: v in choices)


POSITIVE = _Check("must be a positive number", lambda v: _number(v) and v > 0)
NON_NEGATIVE = _Check("must be a non-negative number", lambda v: _number(v) and v >= 0)
POSITIVE_INT = _Check("must be a positive integer", lambda v: _integer(v) and v >= 1)
NON_NEGATIVE_INT = _Check("must be a non-negative integer", lambda v: _integer(v) and v >= 0)
#: for ``int | None`` fields, where None (left out of the TOML) means "no limit" or "auto"
POSITIVE_INT_OR_UNSET = _Check("must be a positive integer or unset", POSITIVE_INT.ok)
FRACTION = _in(0.0, 1.0)
SIMILARITY = _in(-1.0, 1.0)
IN_0_1 = _Check("must be in (0, 1]", lambda v: _number(v) and 0 < v <= 1)
QUALITY = _Check("must be an integer in [1, 100]", lambda v: _integer(v) and 1 <= v <= 100)
NOT_BLANK = _Check("must not be empty", lambda v: isinstance(v, str) and bool(v.strip()))
ALLOW_OR_DISALLOW = _one_of("allow", "disallow")
FLAG = _Check("must be true or false", lambda v: isinstance(v, bool))
LOWER_WORDS = _Check(
    "must be a list of lower-case words",
    lambda v: (
        isinstance(v, tuple) and all(isinstance(t, str) and t and t == t.strip().lower() for t in v)
    ),
)


@functools.cache
def _field_checks(cls: type) -> list[tuple[str, bool, tuple[_Check, ...]]]:
    """``(field, None allowed, checks)`` for each field whose annotation declares checks."""
    out = []
    for name, hint in get_type_hints(cls, include_extras=True).items():
        if get_origin(hint) is Annotated:
            optional = type(None) in get_args(get_args(hint)[0])
            checks = tuple(m for m in hint.__metadata__ if isinstance(m, _Check))
            out.append((name, optional, checks))
    return out


def _check_fields(cls: type, section: str, values: Mapping[str, Any]) -> None:
    for key, optional, checks in _field_checks(cls):
        value = values.get(key)
        for check in () if optional and value is None else checks:
            if not check.ok(value):
                _fail(section, key, check.message, value)


class _Section:
    """A config section: on construction every field is checked against the ``_Check`` rules
    its annotation declares, in field order; a section's own ``__post_init__`` adds what
    relates fields to each other (and calls this first)."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        _check_fields(type(self), self.SECTION, vars(self))


@dataclass(frozen=True, kw_only=True)
class InputConfig(_Section):
    """What to read: paths, globs, fsspec URLs or crawl ids (``CC-MAIN-2024-22``)."""

    SECTION: ClassVar[str] = "input"
    paths: tuple[str, ...] = ()
    #: for crawl ids: which listing to expand (``wat`` or ``warc``)
    crawl_format: Annotated[str, _one_of("wat", "warc")] = "wat"
    #: keep at most this many files after expansion (None = all)
    limit: Annotated[int | None, POSITIVE_INT_OR_UNSET] = None
    #: keep this fraction of files (sampled with ``seed``) before ``limit`` applies
    sample: Annotated[float | None, FRACTION, IN_0_1] = None
    seed: Annotated[int, _Check("must be an integer", _integer)] = 0
    #: base URL of the Common Crawl data host, used to expand crawl ids
    crawl_base_url: str = "https://data.commoncrawl.org/"

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(_Section):
    """WAT/WARC parsing: one input file -> one partition of candidate pairs."""

    SECTION: ClassVar[str] = "extract"
    #: ``auto`` parses WAT JSON metadata records and HTML responses alike (records say which they
    #: are); ``wat`` / ``warc`` parse only that kind
    format: Annotated[str, _one_of("auto", "wat", "warc")] = "auto"
    #: ``auto`` = FastWARC where it reads the file, warcio otherwise (ARC, odd files)
    reader: Annotated[str, _one_of("auto", "fastwarc", "warcio")] = "auto"
    #: alt text is truncated to this many characters after clean-up
    max_text_chars: Annotated[int, POSITIVE] = 2000
    #: HTML bodies larger than this are skipped (counted as ``html_too_large``)
    max_html_bytes: Annotated[int, POSITIVE] = 10_000_000
    #: an unreadable file becomes an empty partition + an error in its summary instead of raising
    skip_unreadable_files: bool = True


@dataclass(frozen=True, kw_only=True)
class LanguageConfig(_Section):
    """Alt-text language identification."""

    SECTION: ClassVar[str] = "language"
    #: ``py3langid`` (default: most accurate on short alt texts and fastest), ``langid`` or
    #: ``lingua`` (optional extra); see benchmarks/RESULTS-language.md
    backend: Annotated[str, _one_of("py3langid", "langid", "lingua")] = "py3langid"
    #: below this normalised probability the language group is ``nolang``; 0.40 with
    #: ``english_prior`` 10 labels ~80% of 2-4 word strings at ~0.955 accuracy (py3langid)
    min_confidence: Annotated[float, FRACTION] = 0.40
    #: prior odds factor for English (1.0 = the model's uniform prior); short English alt text
    #: otherwise falls into ``nolang`` far more often than other languages
    english_prior: Annotated[float, POSITIVE, _at_least(1, " (1 = no prior)")] = 10.0


@dataclass(frozen=True, kw_only=True)
class RulesConfig(_Section):
    """Extraction rules; each failing rule is a named ``drop_reason``."""

    SECTION: ClassVar[str] = "rules"
    min_text_chars: Annotated[int, NON_NEGATIVE] = 5
    max_url_chars: Annotated[int, POSITIVE] = 2000
    allowed_schemes: tuple[str, ...] = ("http", "https")
    blocked_extensions: tuple[str, ...] = (".svg", ".gif")
    deduplicate: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_schemes", tuple(self.allowed_schemes))
        object.__setattr__(self, "blocked_extensions", tuple(self.blocked_extensions))
        super().__post_init__()
        s = self.SECTION
        if not self.allowed_schemes:
            _fail(s, "allowed_schemes", "must name at least one scheme", self.allowed_schemes)
        for ext in self.blocked_extensions:
            if not ext.startswith("."):
                _fail(s, "blocked_extensions", "entries must start with '.'", ext)


@dataclass(frozen=True, kw_only=True)
class DownloadConfig(_Section):
    """Image fetching, decoding and resizing."""

    SECTION: ClassVar[str] = "download"
    #: concurrent requests per partition task
    concurrency: Annotated[int, POSITIVE_INT] = 64
    #: requests in flight to one host; the download plan gives a host to one task at a time,
    #: so this bounds the whole cluster
    per_host_concurrency: Annotated[int, POSITIVE_INT] = 8
    #: minimum seconds between the starts of two requests to one host (0 = no spacing), kept
    #: across the calls of a host's chain: a cluster-wide rate of at most 1/interval per host
    per_host_interval: Annotated[float, NON_NEGATIVE] = 0.0
    connect_timeout: Annotated[float, POSITIVE] = 10.0
    read_timeout: Annotated[float, POSITIVE] = 10.0
    #: overall per-image deadline: a trickling server cannot hold a slot longer than this
    deadline: Annotated[float, POSITIVE] = 30.0
    retries: Annotated[int, NON_NEGATIVE_INT] = 2
    retry_backoff: Annotated[float, NON_NEGATIVE] = 0.5
    #: a 429/503 ``Retry-After`` longer than this is cut to it (seconds)
    max_retry_after: Annotated[float, NON_NEGATIVE] = 10.0
    max_redirects: Annotated[int, NON_NEGATIVE_INT] = 5
    max_bytes: Annotated[int, POSITIVE_INT] = 20_000_000
    min_bytes: Annotated[int, NON_NEGATIVE_INT] = 5_000
    max_pixels: Annotated[int, POSITIVE_INT] = 89_478_484
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
    resize_mode: Annotated[str, _one_of("no", "keep_ratio", "center_crop", "border")] = "keep_ratio"
    image_size: Annotated[int, POSITIVE_INT] = 256
    #: ``resize_only_if_bigger`` as img2dataset: never upscale
    resize_only_if_bigger: bool = False
    encode_format: Annotated[str, _one_of("jpg", "png", "webp")] = "jpg"
    encode_quality: Annotated[int, QUALITY] = 95
    user_agent: Annotated[str, NOT_BLANK] = DEFAULT_USER_AGENT
    #: honour X-Robots-Tag noai / noimageai / noindex / noimageindex
    respect_robots_headers: bool = True
    #: allow loopback / private / link-local targets (only the offline demo and tests)
    allow_private_networks: bool = False
    #: bound on bytes held in flight per task (bodies being read + decoded images)
    max_inflight_bytes: Annotated[int, POSITIVE_INT] = 256_000_000
    #: rows per download task; candidate partitions are split into chunks of this size
    rows_per_task: Annotated[int, POSITIVE_INT] = 2_000
    #: threads decoding/resizing per task, off the event loop (Pillow releases the GIL; a few
    #: more than the cores a task gets keeps them busy while one thread holds the GIL)
    decode_threads: Annotated[int, POSITIVE_INT] = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(f.upper() for f in self.formats))
        super().__post_init__()
        s = self.SECTION
        if self.per_host_interval * self.per_host_concurrency >= self.deadline:
            # a row waits for the spacing inside its deadline: it would fail without a request
            _fail(
                s,
                "per_host_interval",
                f"x per_host_concurrency ({self.per_host_concurrency}) must be under deadline "
                f"({self.deadline:g}s)",
                self.per_host_interval,
            )
        if self.min_bytes > self.max_bytes:
            _fail(s, "min_bytes", f"must not exceed max_bytes ({self.max_bytes})", self.min_bytes)
        known = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
        for f in self.formats:
            if f not in known:
                _fail(s, "formats", f"entries must be among {sorted(known)}", f)


@dataclass(frozen=True, kw_only=True)
class ClipConfig(_Section):
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
    device: Annotated[str, _one_of("auto", "cpu", "cuda")] = "auto"
    #: ``auto`` = float16 on cuda, float32 on cpu
    dtype: Annotated[str, _one_of("auto", "float32", "float16", "bfloat16")] = "auto"
    batch_size: Annotated[int, POSITIVE_INT] = 64
    #: threads decoding and preprocessing images while the model runs
    loader_threads: Annotated[int, POSITIVE_INT] = 2
    #: torch intra-op threads on CPU (0 = the worker's threads)
    torch_threads: Annotated[int, NON_NEGATIVE_INT] = 0
    #: ``zero-shot`` from prompt sets, or ``head`` = a learned probe loaded from ``tag_head``
    tags: Annotated[str, _one_of("zero-shot", "head")] = "zero-shot"
    tag_head: str | None = None
    write_embeddings: bool = True
    #: decode JPEGs at a reduced DCT scale when >= 2x the model's input (faster, ~1e-3 change)
    jpeg_draft: bool = True
    #: decoder processes per worker process (0 = decode in the loader threads); they need a
    #: non-daemonic worker (``distributed.worker.daemon = False``, which ``make_client`` sets
    #: for a local cluster when this is > 0)
    loader_processes: Annotated[int, NON_NEGATIVE_INT] = 0

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
        super().__post_init__()
        if not self.model:
            _fail(self.SECTION, "model", "must name a hub model or a local path", self.model)
        if self.tags == "head" and not self.tag_head:
            _fail(self.SECTION, "tag_head", "must be set when tags = 'head'", self.tag_head)


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
_SUBSET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def check_subset_name(name: Any, section: str = "filters.subsets") -> str:
    """``name`` if it can name an output subset (a folder ``RUN/dataset/NAME``), else ConfigError.

    1-64 lower-case ASCII letters, digits, ``-`` or ``_``, starting with a letter or digit, and
    not a language group (``en``, ``multi``, ``nolang``: the base dataset's folders).
    """
    if not isinstance(name, str) or not _SUBSET_NAME.fullmatch(name):
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


def refuse_unknown_keys(cls: type, where: str, table: Mapping[str, Any]) -> None:
    """ConfigError naming the first key of ``table`` that is not a field of ``cls``: a typo
    must not fall back to a default silently."""
    known = sorted(f.name for f in fields(cls))
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(known)})")


def _check_cut(where: str, table: Mapping[str, Any]) -> None:
    refuse_unknown_keys(SubsetConfig, where, table)
    _check_fields(SubsetConfig, where, table)
    if all(table.get(f.name) is None for f in fields(SubsetConfig)):
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
    max_punsafe: Annotated[float | None, FRACTION] = None
    max_pwatermark: Annotated[float | None, FRACTION] = None

    def __post_init__(self) -> None:
        _check_cut(self.SECTION, vars(self))


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
class FilterConfig(_Section):
    """Thresholds applied to stored scores at explore/materialize time (never rescoring)."""

    SECTION: ClassVar[str] = "filters"
    #: LAION-5B English cut, CLIP ViT-B/32
    similarity_en: Annotated[float, SIMILARITY] = 0.28
    #: LAION-5B cut for other languages (mCLIP text tower)
    similarity_multi: Annotated[float, SIMILARITY] = 0.26
    similarity_nolang: Annotated[float, SIMILARITY] = 0.26
    #: drop rows whose punsafe / pwatermark exceed these (None = tag only)
    max_punsafe: Annotated[float | None, FRACTION] = None
    max_pwatermark: Annotated[float | None, FRACTION] = None
    min_side: Annotated[int, NON_NEGATIVE] = 0
    max_aspect_ratio: Annotated[float | None, POSITIVE, _at_least(1)] = None
    min_text_chars: Annotated[int, NON_NEGATIVE] = 5
    #: extra output subsets, ``[filters.subsets.NAME]`` tables (:class:`SubsetConfig`): each
    #: is written to ``RUN/dataset/NAME/`` with its own cut-offs on top of these thresholds;
    #: None = none (the base dataset alone, in ``RUN/dataset/{en,multi,nolang}``)
    subsets: Mapping[str, SubsetConfig] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "subsets", _subsets(self.SECTION, self.subsets))
        super().__post_init__()

    def similarity_for(self, group: str) -> float:
        """Threshold for one language group (``en``, ``multi`` or ``nolang``)."""
        return {"en": self.similarity_en, "multi": self.similarity_multi}.get(
            group, self.similarity_nolang
        )


@dataclass(frozen=True, kw_only=True)
class ClusterConfig(_Section):
    """Where the Dask graph runs."""

    SECTION: ClassVar[str] = "cluster"
    #: ``tcp://host:8786`` of a running scheduler; None = start a local cluster
    scheduler_address: str | None = None
    n_workers: Annotated[int | None, POSITIVE_INT_OR_UNSET] = None
    threads_per_worker: Annotated[int | None, POSITIVE_INT_OR_UNSET] = None
    memory_limit: str = "auto"
    #: ``auto`` = LocalCUDACluster when CUDA and dask-cuda are present, ``never``, ``require``
    gpu: Annotated[str, _one_of("auto", "never", "require")] = "auto"
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
        changes: dict[str, Any] = {"dashboard_address": None} if no_dashboard else {}
        flags = {
            "scheduler_address": scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None,
            "n_workers": workers,
            "threads_per_worker": threads,
        }
        changes |= {key: value for key, value in flags.items() if value is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def __post_init__(self) -> None:
        super().__post_init__()
        s, value = self.SECTION, self.malloc_mmap_threshold
        if value is not None and not (_integer(value) and 0 <= value <= 2**25):
            _fail(s, "malloc_mmap_threshold", "must be bytes in [0, 33554432] or unset", value)
        if self.scheduler_address is not None and "://" not in self.scheduler_address:
            _fail(s, "scheduler_address", "must look like tcp://host:8786", self.scheduler_address)


@dataclass(frozen=True, kw_only=True)
class ConsentConfig(_Section):
    """Opt-out signals honoured and blocklists applied. Everything is on by default; a run that
    switches a check off says so in its ``config.toml``.
    """

    SECTION: ClassVar[str] = "consent"
    #: page level, at extraction: ``<meta name="robots">`` (and crawler-specific names such as
    #: ``googlebot``) carrying one of ``meta_tokens`` drops the page's pairs as ``page_robots_meta``
    page_meta: Annotated[bool, FLAG] = True
    meta_tokens: Annotated[tuple[str, ...], LOWER_WORDS] = (
        "noai",
        "noimageai",
        "noindex",
        "noimageindex",
    )
    #: meta names read as robots directives (lower case; ``robots`` addresses every crawler, the
    #: others name one: Common Crawl's, Google's and our own product token)
    meta_names: Annotated[tuple[str, ...], LOWER_WORDS] = (
        "robots",
        "ccbot",
        "googlebot",
        "googlebot-image",
        "laion-dask",
    )
    #: W3C TDMRep: ``<meta name="tdm-reservation" content="1">`` drops the page's pairs as
    #: ``page_tdm_reservation``
    tdm_reservation: Annotated[bool, FLAG] = True
    #: image level, at download: a ``tdm-reservation: 1`` response header makes the row
    #: ``disallowed_tdm_reservation`` (``X-Robots-Tag`` is ``download.respect_robots_headers``)
    tdm_header: Annotated[bool, FLAG] = True
    #: host level: robots.txt for our User-Agent's product token (RFC 9309), fetched once per
    #: host and cached in RUN/consent/; a disallowed URL is ``disallowed_robots_txt``
    robots_txt: Annotated[bool, FLAG] = True
    #: what a robots.txt answering 4xx (RFC 9309 "unavailable") means: ``allow`` (RFC 9309)
    robots_txt_on_4xx: Annotated[str, ALLOW_OR_DISALLOW] = "allow"
    #: what a robots.txt answering 5xx/429 or timing out (RFC 9309 "unreachable") means:
    #: ``disallow`` (RFC 9309; rows become ``robots_txt_unreachable``). A host that accepts no
    #: connection at all is a download failure (``failed_to_download``, retried later), not this
    robots_txt_on_error: Annotated[str, ALLOW_OR_DISALLOW] = "disallow"
    #: host level: W3C TDMRep ``/.well-known/tdmrep.json``; a URL under a reserved location is
    #: ``disallowed_tdmrep`` (no file, or an unreadable one, reserves nothing)
    tdmrep: Annotated[bool, FLAG] = True
    #: total seconds for fetching one host file (robots.txt, tdmrep.json), redirects included
    host_file_timeout: Annotated[float, POSITIVE] = 10.0
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
        super().__post_init__()
        s = self.SECTION
        for key in ("domain_optout_lists", "url_blocklists", "image_blocklists"):
            value = getattr(self, key)
            if isinstance(value, list):
                value = tuple(value)
            if not isinstance(value, tuple) or not all(
                isinstance(p, str) and p.strip() for p in value
            ):
                _fail(s, key, "must be a list of file paths or URLs", value)
            object.__setattr__(self, key, tuple(p.strip() for p in value))


#: byte-size units: SI (``KB`` = 1000) and binary (``KiB`` = 1024), as Dask's ``parse_bytes``
#: and ``humanize`` write them; a bare ``B`` or no unit is bytes
_BYTE_UNITS = {"": 1, "b": 1} | {
    prefix + suffix: base**power
    for power, prefix in enumerate("kmgtp", start=1)
    for suffix, base in (("", 1000), ("b", 1000), ("ib", 1024))
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
class IndexConfig(_Section):
    """How ``laion-dask index`` chooses, trains and checks an index (TOML table ``[index]``;
    the CLI's flags override it)."""

    SECTION: ClassVar[str] = "index"
    #: bytes the index may take in memory when searched (``"4GB"`` or an int)
    memory_budget: int | str = "4GB"
    #: exact Flat search up to this many vectors (a Flat query scans every vector)
    flat_max_vectors: Annotated[int, _int_at_least(0)] = 100_000
    #: nprobe is the smallest reaching this recall@k on the evaluation queries
    target_recall: Annotated[float, IN_0_1] = 0.95
    recall_k: Annotated[int, _int_at_least(1)] = 10
    #: evaluation queries, drawn from the run's own vectors (their own id excluded)
    eval_queries: Annotated[int, _int_at_least(1)] = 500
    #: IVF lists; None = a power of two near sqrt(n)
    nlist: Annotated[int | None, _int_at_least(1)] = None
    #: training vectors per IVF list (faiss asks for at least 39)
    train_per_list: Annotated[int, _int_at_least(1)] = 40
    max_train_vectors: Annotated[int, _int_at_least(1)] = 200_000
    #: a faiss index_factory string that overrides the choice (inner-product metric)
    factory: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "memory_budget", _parse_bytes(self.memory_budget, "index.memory_budget")
        )
        super().__post_init__()

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
    refuse_unknown_keys(cls, name, data)
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
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
    refuse_unknown_keys(FilterConfig, FilterConfig.SECTION, table)
    return dict(table)
