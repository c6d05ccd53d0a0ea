"""The download stage: fetch, check, decode and resize the images of one candidate partition.

One call of :func:`download_images` runs its own asyncio event loop with one aiohttp session, so
it works the same in a notebook, a plain script or a Dask worker thread, and leaves no session,
socket or thread behind. Inside the call:

- at most ``cfg.concurrency`` requests run at once, at most ``cfg.per_host_concurrency`` per host
  (a row waiting for a busy host does not hold a global slot); with ``cfg.per_host_interval`` > 0,
  two requests to one host (image, retry or redirect hop) start at least that many seconds apart,
  also across the calls a worker process makes one after another (the download plan gives a host's
  rows to one chain of calls, so this holds for the whole cluster);
- each host is resolved once per call and checked by :mod:`laion_dask.stages.netguard` on the first
  request and on every redirect hop; aiohttp connects through a resolver that hands out only those
  checked addresses, so DNS cannot change between check and connect (no rebinding);
- redirects are followed by hand (each hop checked, ``cfg.max_redirects`` at most, loops and
  non-http(s) targets refused);
- connect and read timeouts apply per socket operation and ``cfg.deadline`` to the whole image,
  retries included, so a server that trickles bytes cannot hold a slot;
- transient failures (connection reset or dropped, truncated body, 429, 500/502/503/504) are
  retried ``cfg.retries`` times with exponential backoff; ``Retry-After`` is honoured up to
  ``cfg.max_retry_after``;
- bodies stream with a cap (``Content-Length`` checked first, a longer body is cut off, not
  read) under a per-call in-flight byte budget (``cfg.max_inflight_bytes``);
- hashing, decoding and resizing (:mod:`laion_dask.stages.imaging`) run in a small thread pool,
  off the loop.

Consent and safety (``[consent]``, :mod:`laion_dask.stages.consent`), in the order they are checked:

- before any request: a URL whose hash is on a URL blocklist (``blocklisted_url``) or whose host
  is, or is under, a domain on an opt-out list (``opted_out_domain``) is never fetched;
- per host, before its first image (and before every redirect hop to a new host): the address
  guard, then ``/robots.txt`` for our product token (``disallowed_robots_txt``; when it cannot be
  fetched, ``consent.robots_txt_on_4xx`` / ``robots_txt_on_error`` decide, the latter giving
  ``robots_txt_unreachable``), then ``/.well-known/tdmrep.json`` (``disallowed_tdmrep``). Each host
  file is fetched once per call through the same guarded session (its own
  ``consent.host_file_timeout``) and, with ``host_cache``, once per run (the pipeline keeps one
  cache folder per download chain, which holds all of a host's rows);
- on the image response's headers: ``X-Robots-Tag`` (``disallowed``) and ``tdm-reservation: 1``
  (``disallowed_tdm_reservation``), before the body is read;
- on the body, before decoding: its MD5/SHA-1/SHA-256 against the image blocklists
  (``blocklisted_image``); the bytes are dropped and never reach a shard.

Why asyncio rather than a thread pool: on loopback, a thread pool running the same decode code was
as fast (``benchmarks/bench_download.py``: 0.95-1.0x images/s, ~10% more CPU per image), so speed
does not decide; asyncio gives a deadline that really cancels a slow image, many idle sockets
without a thread each, and per-host limits that do not hold a global slot.

Per row the outcome is data: ``status`` in :data:`laion_dask.ground.schema.DOWNLOAD_STATUSES` plus
``error_message``; nothing raises for a row.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import pandas as pd
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from laion_dask.ground import schema
from laion_dask.ground.config import ConsentConfig, DownloadConfig
from laion_dask.stages.consent import (
    ROBOTS_MAX_BYTES,
    TDMREP_MAX_BYTES,
    ConsentLists,
    HostFile,
    HostFileCache,
    RobotsRules,
    TdmRepRules,
    load_lists,
    parse_robots_txt,
    parse_tdmrep,
    product_token,
)
from laion_dask.stages.imaging import ImageResult, process_image, reuse_image_memory
from laion_dask.stages.netguard import BlockedAddress, Resolver, check_host, system_resolver

__all__ = [
    "download_images",
    "download_stats",
    "robots_disallowed",
    "tdm_reserved",
    "is_transient",
    "ROBOTS_DIRECTIVES",
]

log = logging.getLogger(__name__)

#: X-Robots-Tag directives that make a row ``disallowed`` (img2dataset's defaults)
ROBOTS_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
# X-Robots-Tag directives that carry a value after a colon (not a user-agent scope)
_VALUED_DIRECTIVES = frozenset(
    {"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"}
)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# RFC 9309: follow at least five redirects for robots.txt; more means "unavailable"
_HOST_FILE_REDIRECTS = 5
_HOST_FILE_PATHS = {"robots": "/robots.txt", "tdmrep": "/.well-known/tdmrep.json"}
_HOST_FILE_CAPS = {"robots": ROBOTS_MAX_BYTES, "tdmrep": TDMREP_MAX_BYTES}
# no connection to the host at all: a dead host, not an answer about its host files
_CONNECT_FAILURES: tuple[type[Exception], ...] = (
    aiohttp.ClientConnectorError,
    getattr(aiohttp, "ConnectionTimeoutError", aiohttp.ClientConnectorError),  # aiohttp >= 3.10
)
_TRANSIENT_HTTP = frozenset({429, 500, 502, 503, 504})
_CHUNK = 64 * 1024
# reservation for a body without Content-Length; it grows as the body does
_UNKNOWN_LENGTH_RESERVE = 1 << 20
# error_message prefixes of failures worth retrying in a later run (see is_transient)
_TRANSIENT_PREFIXES = (
    *(f"HTTP {code}" for code in sorted(_TRANSIENT_HTTP)),
    "connection error",
    "cannot connect",  # refused now, maybe up later: not retried within a call, only across runs
    "timeout",
    "deadline",
)


class _Failed(Exception):
    """Ends one row with ``status`` and ``message``."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    """A transient failure: the attempt may be repeated after ``delay`` seconds."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


@dataclass
class _Outcome:
    """Mutable per-row result while the row is in flight."""

    status: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    width: int | None = None
    height: int | None = None
    original_bytes: int | None = None
    sha256: str | None = None
    image: bytes | None = None


class _ByteBudget:
    """Bytes in flight in one call; a request larger than the limit runs alone, never deadlocks."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cond = asyncio.Condition()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    async def acquire(self, n: int) -> None:
        async with self._cond:
            await self._cond.wait_for(partial(self._fits, n))
            self.used += n
            self.peak = max(self.peak, self.used)

    async def release(self, n: int) -> None:
        if n:
            async with self._cond:
                self.used -= n
                self._cond.notify_all()


def _once(futures: dict[Any, asyncio.Future[Any]], key: Any, start: Callable[[], Any]) -> Any:
    """The one future of ``key`` (started by ``start()`` on first use), shielded: a waiter hitting
    its deadline must not cancel what other rows wait on. Errors are cached too."""
    if key not in futures:
        futures[key] = asyncio.ensure_future(start())
    return asyncio.shield(futures[key])


class _CheckedDNS:
    """Per-call DNS cache holding only guard-checked answers; one lookup per host."""

    def __init__(self, cfg: DownloadConfig, resolver: Resolver) -> None:
        self._allow = cfg.allow_private_networks
        self._resolver = resolver
        self._lookups: dict[Any, asyncio.Future[Any]] = {}

    async def lookup(self, host: str) -> list[str]:
        """Checked addresses of ``host``; raises BlockedAddress or OSError (cached too)."""
        key = host.lower()
        check = partial(check_host, key, allow_private=self._allow, resolver=self._resolver)
        loop = asyncio.get_running_loop()
        return list(await _once(self._lookups, key, partial(loop.run_in_executor, None, check)))


class _GuardedResolver(AbstractResolver):
    """aiohttp resolver that hands out only the addresses the guard checked for this call."""

    def __init__(self, dns: _CheckedDNS) -> None:
        self._dns = dns

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await self._dns.lookup(host)
        results: list[ResolveResult] = []
        for addr in addresses:
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            if family not in (socket.AF_UNSPEC, fam):
                continue
            results.append(
                {
                    "hostname": host,
                    "host": addr,
                    "port": port,
                    "family": fam,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        if not results:
            raise OSError(f"{host}: no address of family {family!r}")
        return results

    async def close(self) -> None:
        return None


def robots_disallowed(values: Iterable[str], ua_token: str) -> str | None:
    """The X-Robots-Tag directive that forbids use by ``ua_token``, or None.

    Each header value is a comma-separated list; ``name: directive`` scopes the directives that
    follow it to one user agent (ours, or ``*``), as in ``googlebot: noindex, laion-dask: noai``.

    Examples
    --------
    >>> robots_disallowed(["otherbot: noai", "nofollow"], "laion-dask") is None
    True
    >>> robots_disallowed(["laion-dask: noimageai"], "laion-dask")
    'noimageai'
    """
    for value in values:
        scope: str | None = None
        for raw in value.split(","):
            item = raw.strip().lower()
            if ":" in item:
                name, _, rest = item.partition(":")
                name = name.strip()
                if name in _VALUED_DIRECTIVES:
                    continue
                scope, item = name, rest.strip()
            if (scope is None or scope in (ua_token, "*")) and item in ROBOTS_DIRECTIVES:
                return item
    return None


def is_transient(status: str | None, error_message: str | None) -> bool:
    """True for failures worth retrying in a later run (429, 5xx, timeouts, dropped connections).

    Used by ``--retry-failed``: everything else (404, blocked, disallowed, bad image) is final.
    """
    if status == "robots_txt_unreachable":
        return True  # robots.txt answered 5xx/429 or timed out: asked again by a retry
    if status != "failed_to_download" or not error_message:
        return False
    return error_message.startswith(_TRANSIENT_PREFIXES)


def _retry_after(headers: Any, cap: float) -> float | None:
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), cap)


class _HostPacer:
    """Start times of the last request per host, for ``per_host_interval``, shared by every call
    in this process: the download plan hands all of a host's rows to one chain of calls, so
    consecutive calls must keep the spacing too. Entries older than any interval are pruned.
    """

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.lock = threading.Lock()  # download tasks of one worker run in several threads

    def reserve(self, host: str, interval: float) -> float:
        """Book the next start for ``host``; return how long to wait for it (seconds)."""
        with self.lock:
            now = time.monotonic()
            start = max(now, self.last.get(host, -interval) + interval)
            self.last[host] = start
            if len(self.last) > 100_000:  # hosts of finished chains: no longer matter
                horizon = now - interval
                self.last = {h: t for h, t in self.last.items() if t > horizon}
            return start - now


_PACER = _HostPacer()


@dataclass
class _Fetcher:
    """Everything one call shares: session, limits, DNS cache, byte budget, decode pool."""

    cfg: DownloadConfig
    session: aiohttp.ClientSession
    dns: _CheckedDNS
    pool: ThreadPoolExecutor
    consent: ConsentConfig
    lists: ConsentLists
    host_cache: HostFileCache

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.cfg.concurrency)
        semaphore = partial(asyncio.Semaphore, self.cfg.per_host_concurrency)
        self.host_slots: defaultdict[str, asyncio.Semaphore] = defaultdict(semaphore)
        self.budget = _ByteBudget(self.cfg.max_inflight_bytes)
        self.ua_token = product_token(self.cfg.user_agent)
        # one fetch per (kind, origin) per call; rows wait on the same task
        self.host_files: dict[Any, asyncio.Future[Any]] = {}

    async def row(self, url: object) -> _Outcome:
        """Fetch, check and decode one URL; never raises (except cancellation)."""
        out = _Outcome()
        reserved = [0]  # bytes this row holds in the budget, released when the row is done
        try:
            self._listed(url, "URL")
            target = _parse_url(url)
            # the first host's guard and consent checks run before the row takes a slot and
            # before its deadline starts: rows of one host wait together on one robots.txt
            await self._guard(target)
            await self._consent(target)
            body = None
            async with self.host_slots[target.host or ""], self.slots:
                try:
                    async with asyncio.timeout(self.cfg.deadline):
                        body = await self._with_retries(target, out, reserved)
                except TimeoutError:
                    raise _Failed(
                        "failed_to_download", f"deadline of {self.cfg.deadline:g}s exceeded"
                    ) from None
            await self._decode(body, out)
        except _Failed as fail:
            out.status, out.error_message = fail.status, str(fail)[:500]
        finally:
            await self.budget.release(reserved[0])
        return out

    async def _with_retries(self, url: URL, out: _Outcome, reserved: list[int]) -> bytes:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        deadline_at = loop.time() + cfg.deadline
        message = ""
        for attempt in range(cfg.retries + 1):
            try:
                return await self._attempt(url, out, reserved)
            except _Retryable as err:
                message = str(err)
                delay = err.delay
            except aiohttp.ClientConnectorError as err:  # refused, unreachable: not transient
                raise _Failed("failed_to_download", f"cannot connect: {err}") from None
            except aiohttp.ServerTimeoutError as err:  # connect or read timeout
                raise _Failed("failed_to_download", f"timeout: {type(err).__name__}") from None
            except BlockedAddress as err:  # raised by the guarded resolver inside aiohttp
                raise _Failed("blocked_address", str(err)) from None
            except (
                aiohttp.ServerDisconnectedError,
                aiohttp.ClientPayloadError,
                aiohttp.ClientOSError,
                ConnectionError,
            ) as err:  # reset, dropped or truncated mid-transfer: worth another try
                message, delay = f"connection error: {type(err).__name__}: {err}", None
            except aiohttp.ClientError as err:
                raise _Failed("failed_to_download", f"{type(err).__name__}: {err}") from None
            await self.budget.release(reserved[0])
            reserved[0] = 0
            if attempt == cfg.retries:
                break
            if delay is None:
                delay = min(cfg.retry_backoff * 2**attempt, cfg.max_retry_after)
            if loop.time() + delay >= deadline_at:
                message += f" (retry in {delay:g}s would pass the deadline)"
                break
            await asyncio.sleep(delay)
        attempts = f"{attempt + 1} attempt" + ("s" if attempt else "")
        raise _Failed("failed_to_download", f"{message} ({attempts})")

    async def _attempt(self, url: URL, out: _Outcome, reserved: list[int]) -> bytes:
        """One try, following redirects by hand; returns the body or raises."""
        cfg = self.cfg
        seen = {str(url)}
        for hop in range(cfg.max_redirects + 1):
            # the first URL was checked (lists, guard, robots.txt, tdmrep) before the row began;
            # a redirect target is checked here: the lists first, so a listed host is not even
            # looked up in DNS
            if hop:
                self._listed(str(url), "redirect target URL")
            await self._guard(url)
            if hop:
                await self._consent(url)
            if cfg.per_host_interval > 0:
                # booked, then slept: requests of one host keep their order and spacing
                await asyncio.sleep(_PACER.reserve(url.host or "", cfg.per_host_interval))
            try:
                response_cm = self.session.get(url, allow_redirects=False)
                async with response_cm as resp:
                    out.http_status = resp.status
                    if resp.status in _REDIRECTS:
                        url = _next_hop(url, resp.headers.get("Location"), seen)
                        continue
                    return await self._body(resp, reserved)
            except (ValueError, UnicodeError) as err:  # yarl/aiohttp refusing a URL (InvalidURL)
                raise _Failed("failed_to_download", f"invalid request: {err}") from None
            except aiohttp.ClientResponseError as err:  # malformed response
                raise _Failed("failed_to_download", f"bad response: {err.message}") from None
        raise _Failed("failed_to_download", f"more than {cfg.max_redirects} redirects")

    def _listed(self, url: object, what: str) -> None:
        """Raise ``_Failed`` when the user's lists remove ``url`` (no DNS, no request): its hash
        on a URL blocklist first, then its host under an opted-out domain."""
        lists = self.lists
        if lists.empty:
            return
        algo = lists.blocked_urls([url])[0]
        if algo is not None:
            raise _Failed("blocklisted_url", f"{what} {algo} on a URL blocklist")
        if lists.domains:
            host = _parse_url(url).raw_host or ""  # an unparsable URL fails as it would anyway
            listed = lists.opted_out_domain(host)
            if listed is not None:
                raise _Failed("opted_out_domain", f"{host} is covered by opted-out {listed}")

    async def _consent(self, url: URL) -> None:
        """Raise ``_Failed`` when robots.txt or tdmrep.json of ``url``'s host says no."""
        c = self.consent
        if not (c.robots_txt or c.tdmrep):
            return
        origin = url.origin()
        path = url.raw_path_qs or "/"
        if c.robots_txt:
            robots = await self._host_file("robots", origin)
            if robots.outcome == "ok" and isinstance(robots.rules, RobotsRules):
                allowed, rule = robots.rules.decide(path)
                if not allowed:
                    group = robots.rules.group
                    raise _Failed(
                        "disallowed_robots_txt",
                        f"robots.txt of {origin} (user-agent {group}): {rule}",
                    )
            elif robots.outcome == "down":  # no answer at all: the host, not its robots.txt
                raise _Failed("failed_to_download", f"cannot connect: robots.txt of {robots.error}")
            elif robots.outcome == "unreachable" and c.robots_txt_on_error == "disallow":
                raise _Failed(
                    "robots_txt_unreachable",
                    f"robots.txt of {origin} unreachable ({robots.error}); "
                    "consent.robots_txt_on_error = disallow",
                )
            elif robots.outcome == "unavailable" and c.robots_txt_on_4xx == "disallow":
                raise _Failed(
                    "disallowed_robots_txt",
                    f"robots.txt of {origin} unavailable ({robots.error}); "
                    "consent.robots_txt_on_4xx = disallow",
                )
        if c.tdmrep:
            tdm = await self._host_file("tdmrep", origin)
            if tdm.outcome == "ok" and isinstance(tdm.rules, TdmRepRules):
                reserved, location, policy = tdm.rules.decide(path)
                if reserved:
                    extra = f"; tdm-policy {policy}" if policy else ""
                    raise _Failed(
                        "disallowed_tdmrep",
                        f"tdmrep.json of {origin}: location {location} reserved{extra}",
                    )

    async def _host_file(self, kind: str, origin: URL) -> HostFile:
        load = partial(self._load_host_file, kind, origin)
        return await _once(self.host_files, (kind, str(origin)), load)

    async def _load_host_file(self, kind: str, origin: URL) -> HostFile:
        """robots.txt / tdmrep.json of ``origin``: the run's cached answer, else a GET (guarded,
        redirects by hand, capped, own timeout) published to the cache unless the host is down.
        """
        cache, name = self.host_cache, str(origin)
        loop = asyncio.get_running_loop()
        published = await loop.run_in_executor(None, cache.get, kind, name)
        if published is not None:
            return published
        timeout = self.consent.host_file_timeout
        try:
            async with asyncio.timeout(timeout):
                url = origin.with_path(_HOST_FILE_PATHS[kind])
                code, body = await self._get_host_file(url, kind)
        except TimeoutError:
            record = HostFile(kind, name, "unreachable", None, f"timeout after {timeout:g}s")
        except _HostFileFailure as fail:
            record = HostFile(kind, name, fail.outcome, fail.http_status, str(fail))
        else:
            try:
                robots = kind == "robots"
                rules = parse_robots_txt(body, self.ua_token) if robots else parse_tdmrep(body)
                record = HostFile(kind, name, "ok", code, None, rules)
            except ValueError as err:  # tdmrep.json that is not a rule list reserves nothing
                record = HostFile(kind, name, "invalid", code, f"invalid {kind} file: {err}")
        if record.outcome != "ok":
            log.debug("%s of %s: %s (%s)", kind, name, record.outcome, record.error)
        if record.outcome == "down":  # a dead host is not an answer to keep for the whole run
            return record
        return await loop.run_in_executor(None, cache.put, record)

    async def _get_host_file(self, url: URL, kind: str) -> tuple[int, bytes]:
        seen = {str(url)}
        code: int | None = None
        for _hop in range(_HOST_FILE_REDIRECTS + 1):
            first = code is None
            try:
                await self.dns.lookup(url.host or "")
            except BlockedAddress as err:
                raise _HostFileFailure("unreachable", code, f"refused address: {err}") from None
            except OSError as err:
                outcome = "down" if first else "unreachable"
                raise _HostFileFailure(outcome, code, f"{url}: DNS lookup failed: {err}") from None
            try:
                async with self.session.get(url, allow_redirects=False) as resp:
                    code = resp.status
                    if code in _REDIRECTS:
                        try:
                            url = _next_hop(url, resp.headers.get("Location"), seen)
                        except _Failed as fail:
                            raise _HostFileFailure("unavailable", code, str(fail)) from None
                        continue
                    if 200 <= code < 300:
                        return code, await _read_capped(resp, _HOST_FILE_CAPS[kind])
                    # 429 means "not now", not "no file": treated as unreachable, as Google does
                    if 400 <= code < 500 and code != 429:
                        raise _HostFileFailure("unavailable", code, f"HTTP {code}")
                    raise _HostFileFailure("unreachable", code, f"HTTP {code}")
            except _CONNECT_FAILURES as err:
                # the host itself does not answer (refused, unreachable network, connect timeout)
                outcome = "down" if first else "unreachable"
                raise _HostFileFailure(outcome, code, f"{url}: {err}") from None
            except (aiohttp.ClientError, OSError, ValueError, UnicodeError) as err:
                raise _HostFileFailure(
                    "unreachable", code, f"{type(err).__name__}: {err}"
                ) from None
        raise _HostFileFailure("unavailable", code, f"more than {_HOST_FILE_REDIRECTS} redirects")

    async def _guard(self, url: URL) -> None:
        try:
            await self.dns.lookup(url.host or "")
        except BlockedAddress as err:
            raise _Failed("blocked_address", str(err)) from None
        except OSError as err:
            raise _Failed("failed_to_download", f"DNS lookup failed: {err}") from None

    async def _body(self, resp: aiohttp.ClientResponse, reserved: list[int]) -> bytes:
        cfg = self.cfg
        status = resp.status
        if status in _TRANSIENT_HTTP:
            delay = _retry_after(resp.headers, cfg.max_retry_after)
            raise _Retryable(f"HTTP {status}", delay)
        if not 200 <= status < 300:
            raise _Failed("failed_to_download", f"HTTP {status}")
        if cfg.respect_robots_headers:
            hit = robots_disallowed(resp.headers.getall("X-Robots-Tag", []), self.ua_token)
            if hit:
                raise _Failed("disallowed", f"X-Robots-Tag: {hit}")
        if self.consent.tdm_header and tdm_reserved(resp.headers.getall("tdm-reservation", [])):
            policy = resp.headers.get("tdm-policy")
            extra = f"; tdm-policy {policy}" if policy else ""
            raise _Failed("disallowed_tdm_reservation", f"tdm-reservation: 1{extra}")
        length = resp.content_length
        if length is not None and length > cfg.max_bytes:
            resp.close()
            raise _Failed("too_large", f"Content-Length {length} > max_bytes {cfg.max_bytes}")
        want = length if length is not None else min(_UNKNOWN_LENGTH_RESERVE, cfg.max_bytes)
        await self.budget.acquire(want)
        reserved[0] += want
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > cfg.max_bytes:
                resp.close()  # drop the connection: the rest is never read
                raise _Failed("too_large", f"body over max_bytes {cfg.max_bytes}")
            if size > reserved[0]:
                grow = max(size - reserved[0], _UNKNOWN_LENGTH_RESERVE)
                await self.budget.acquire(grow)
                reserved[0] += grow
            chunks.append(chunk)
        return b"".join(chunks)

    async def _decode(self, body: bytes | None, out: _Outcome) -> None:
        if body is None:
            return
        out.original_bytes = len(body)
        loop = asyncio.get_running_loop()
        try:
            # hashing too runs off the loop: on the loop thread, each digest gave the GIL away
            # and waited behind the decode threads to get it back (~1 ms per image, cProfile)
            result = await loop.run_in_executor(
                self.pool, _check_and_process, body, self.cfg, self.lists, out
            )
        except (MemoryError, RuntimeError, AttributeError, NotImplementedError) as err:
            # a decoder bug on one hostile file must not fail the whole partition
            log.warning("decoder raised %s on a %d-byte body", type(err).__name__, len(body))
            raise _Failed("failed_to_decode", f"{type(err).__name__}: {err}") from None
        out.status, out.error_message = result.status, result.error_message
        out.original_width, out.original_height = result.original_width, result.original_height
        out.width, out.height, out.image = result.width, result.height, result.image


def _check_and_process(
    body: bytes, cfg: DownloadConfig, lists: ConsentLists, out: _Outcome
) -> ImageResult:
    """On a decode thread: ``out.sha256``, the image blocklists and ``min_bytes`` (``_Failed``),
    then :func:`process_image`."""
    out.sha256 = hashlib.sha256(body).hexdigest()
    algo = lists.blocked_image(body) if lists.image_hashes else None
    if algo is not None:
        # never decoded, never resized, never written: the caller drops the only reference
        raise _Failed("blocklisted_image", f"image {algo} on an image blocklist")
    if len(body) < cfg.min_bytes:
        raise _Failed("too_small", f"{len(body)} bytes < min_bytes {cfg.min_bytes}")
    return process_image(body, cfg)


class _HostFileFailure(Exception):
    """A host file could not be had: ``outcome`` is ``unavailable``, ``unreachable`` or ``down``."""

    def __init__(self, outcome: str, http_status: int | None, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.http_status = http_status


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The first ``cap`` bytes of a body; the rest is not read (the connection is dropped)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        chunks.append(chunk[: cap - size])
        size += len(chunks[-1])
        if size >= cap:
            resp.close()
            break
    return b"".join(chunks)


def tdm_reserved(values: Iterable[str]) -> bool:
    """True when a ``tdm-reservation`` response header says ``1`` (W3C TDMRep).

    Examples
    --------
    >>> tdm_reserved(["1"]), tdm_reserved([" 0 "]), tdm_reserved([])
    (True, False, False)
    """
    return any(v.strip() == "1" for v in values)


def _parse_url(url: object) -> URL:
    if not isinstance(url, str) or not url.strip():
        raise _Failed("failed_to_download", "empty URL")
    try:
        parsed = URL(url.strip())
    except (ValueError, UnicodeError) as err:
        raise _Failed("failed_to_download", f"invalid URL: {err}") from None
    if parsed.scheme not in ("http", "https"):
        raise _Failed("failed_to_download", f"unsupported URL scheme {parsed.scheme!r}")
    if not parsed.host:
        raise _Failed("failed_to_download", "URL has no host")
    return parsed


def _next_hop(current: URL, location: str | None, seen: set[str]) -> URL:
    """The target of a redirect (added to ``seen``); ``_Failed`` for a bad one or a loop."""
    if not location:
        raise _Failed("failed_to_download", "redirect without Location")
    try:
        nxt = current.join(URL(location.strip()))
    except (ValueError, UnicodeError) as err:
        raise _Failed("failed_to_download", f"invalid redirect target: {err}") from None
    if nxt.scheme not in ("http", "https"):
        raise _Failed("failed_to_download", f"redirect to non-http(s) URL ({nxt.scheme}:) refused")
    if not nxt.host:
        raise _Failed("failed_to_download", "redirect target has no host")
    if str(nxt) in seen:
        raise _Failed("failed_to_download", f"redirect loop at {nxt}")
    seen.add(str(nxt))
    return nxt


async def _download_all(
    urls: list[object],
    cfg: DownloadConfig,
    resolver: Resolver,
    consent: ConsentConfig,
    lists: ConsentLists,
    host_cache: HostFileCache,
) -> list[_Outcome]:
    dns = _CheckedDNS(cfg, resolver)
    connector = aiohttp.TCPConnector(
        limit=cfg.concurrency,
        limit_per_host=cfg.per_host_concurrency,
        resolver=_GuardedResolver(dns),
        use_dns_cache=False,  # _CheckedDNS is the cache, and it holds checked answers only
    )
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout
    )
    reuse_image_memory()  # the decode threads reuse pixel buffers instead of faulting in new ones
    pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="laion-dask-decode")
    try:
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": cfg.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        ) as session:
            fetcher = _Fetcher(cfg, session, dns, pool, consent, lists, host_cache)
            outcomes = await asyncio.gather(*(fetcher.row(u) for u in urls))
            peak = fetcher.budget.peak
            log.debug("peak in-flight bytes %d", peak, extra={"peak": peak})
        await asyncio.sleep(0)  # let transports finish closing inside this loop
    finally:
        pool.shutdown(wait=True)
    return list(outcomes)


def _run(urls: list[object], cfg: DownloadConfig, resolver: Resolver, *rest: Any) -> list[_Outcome]:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_download_all(urls, cfg, resolver, *rest))
    # called from inside a running loop (a notebook): run ours on a helper thread
    with ThreadPoolExecutor(1, thread_name_prefix="laion-dask-download") as helper:
        return helper.submit(asyncio.run, _download_all(urls, cfg, resolver, *rest)).result()


def download_images(
    df: pd.DataFrame,
    cfg: DownloadConfig,
    *,
    consent: ConsentConfig | None = None,
    host_cache: str | None = None,
    resolver: Resolver | None = None,
    refresh_unreachable: bool = False,
) -> pd.DataFrame:
    """Download, check, decode and resize the images of the kept rows of one partition.

    Parameters
    ----------
    df : pandas.DataFrame
        Candidate rows (``schema.CANDIDATES`` columns; at least ``uid`` and ``url``). Rows whose
        ``drop_reason`` is set pass through untouched with ``status`` <NA>.
    cfg : DownloadConfig
        Limits, timeouts, resize settings, politeness and the address guard.
    consent : ConsentConfig, optional
        Opt-out signals and blocklists (every host-level check on when omitted).
    host_cache : str, optional
        Folder (local or fsspec URL) where robots.txt / tdmrep.json results are shared by the
        calls that use it (the pipeline: one folder per download chain, ``RUN/consent/chain-N``);
        each call adds one journal file. Without it they are fetched once per call.
    resolver : callable, optional
        ``resolver(host) -> [ip, ...]`` used for every lookup (the system resolver by default);
        its answers are checked by the guard before any connection.
    refresh_unreachable : bool
        Ask again a host whose robots.txt / tdmrep.json was ``unreachable`` in ``host_cache``
        (``--retry-failed``); the new answer replaces it for the rest of the run.

    Returns
    -------
    pandas.DataFrame
        ``df`` in the same row order plus ``schema.DOWNLOAD_DTYPES`` columns and ``schema.IMAGE``
        (encoded resized bytes; None unless ``status == "success"``).

    Examples
    --------
    >>> cfg = DownloadConfig(allow_private_networks=True)  # the offline demo's loopback host
    >>> download_images(candidates, cfg)["status"].value_counts()  # doctest: +SKIP
    """
    consent = consent if consent is not None else ConsentConfig()
    lists = load_lists(consent)  # a bad list file raises here, before any request
    rows = [_Outcome()] * len(df)  # a row with a drop_reason keeps the empty outcome
    drop = df.get(schema.DROP_REASON, pd.Series(pd.NA, index=df.index, dtype="string"))
    positions = [i for i, fetch in enumerate(drop.isna()) if fetch]
    if positions:
        started = time.perf_counter()
        token = product_token(cfg.user_agent)
        cache = HostFileCache(host_cache, token, refresh_unreachable=refresh_unreachable)
        urls = df[schema.URL].tolist()
        urls = [urls[i] for i in positions]
        try:
            got = _run(urls, cfg, resolver or system_resolver, consent, lists, cache)
        finally:
            cache.flush()  # what this call learned about hosts: one journal file
        for i, res in zip(positions, got, strict=True):
            rows[i] = res
        log.info("downloaded %d rows in %.1fs", len(positions), time.perf_counter() - started)
    columns = {
        col: pd.Series(pd.array([getattr(r, col) for r in rows], dtype=dtype), index=df.index)
        for col, dtype in schema.DOWNLOAD_DTYPES.items()
    }
    images = pd.Series([r.image for r in rows], index=df.index, dtype=object)
    return df.assign(**columns, **{schema.IMAGE: images})


def download_stats(df: pd.DataFrame, seconds: float) -> dict[str, Any]:
    """Counts of one downloaded partition; ``count == successes + sum(failures.values())``.

    Parameters
    ----------
    df : pandas.DataFrame
        Output of :func:`download_images`.
    seconds : float
        Wall time the call took.

    Returns
    -------
    dict
        ``count`` (rows attempted), ``skipped`` (rows with a drop_reason), ``successes``,
        ``failures`` (status -> rows, every non-success status listed), ``bytes`` (original
        bytes of the bodies read), ``duration`` (seconds) and ``images_per_second``.
    """
    status = df[schema.STATUS]
    attempted = status.notna()
    counts = status[attempted].value_counts()
    failures = {s: int(counts.get(s, 0)) for s in schema.DOWNLOAD_STATUSES if s != "success"}
    successes = int(counts.get("success", 0))
    unknown = set(counts.index) - set(schema.DOWNLOAD_STATUSES)
    for s in sorted(unknown):  # never silently lose a row with an unexpected status
        failures[str(s)] = int(counts[s])
    total_bytes = df.loc[attempted, schema.ORIGINAL_BYTES].sum()
    return {
        "count": int(attempted.sum()),
        "skipped": int((~attempted).sum()),
        "successes": successes,
        "failures": failures,
        "bytes": int(total_bytes) if pd.notna(total_bytes) else 0,
        "duration": float(seconds),
        "images_per_second": successes / seconds if seconds > 0 else 0.0,
    }
