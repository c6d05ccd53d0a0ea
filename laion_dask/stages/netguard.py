"""The address guard: refuse private, loopback, link-local, multicast and reserved targets.

A URL taken from a web page must not make our workers talk to the machine they run on, to the
cloud metadata service or to the internal network. :func:`check_url` resolves the host and raises
:class:`BlockedAddress` when any address it resolves to is not a public unicast address. The
downloader calls it on the first request and on every redirect hop, and connects to the very
addresses it checked (see ``download.py``), so a DNS answer cannot change between check and connect.

Host names that are numbers are read as the C library and browsers read them (``2130706433``,
``0x7f.1``, ``017700000001`` are all 127.0.0.1), so an encoding trick cannot slip past the check.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

__all__ = [
    "BlockedAddress",
    "Resolver",
    "is_public_address",
    "parse_ip_host",
    "check_host",
    "check_url",
    "system_resolver",
]

log = logging.getLogger(__name__)

#: ``resolver(host) -> [ip, ...]``; raises ``OSError`` when the name does not resolve
Resolver = Callable[[str], list[str]]

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges refused on top of what ``ipaddress`` flags as private/reserved/etc. Listed explicitly so
# the policy does not depend on the Python version's idea of ``is_global``.
_BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, incl. cloud metadata 169.254.169.254
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. broadcast
        "::/128",
        "::1/128",
        "::/96",  # IPv4-compatible (deprecated)
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments (Teredo, ORCHID, benchmarking...)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # segment routing SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
# IPv6 prefixes that embed an IPv4 address a packet can end up at: judge the embedded address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddress(Exception):
    """The URL's host is, or resolves to, an address the downloader must not contact."""


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _is_public(ip: _IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        inner = _embedded_v4(ip)
        if inner is not None:
            return _is_public(inner)
    if any(ip.version == net.version and ip in net for net in _BLOCKED_NETWORKS):
        return False
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def is_public_address(ip: str) -> bool:
    """True when ``ip`` is a public unicast address the downloader may contact.

    Parameters
    ----------
    ip : str
        An IPv4 or IPv6 address (IPv6 may carry brackets or a ``%zone``).

    Returns
    -------
    bool
        False for private, loopback, link-local, multicast, reserved, unspecified, CGNAT,
        documentation and benchmarking ranges, and for IPv6 forms that embed such an IPv4
        address (v4-mapped, 6to4, NAT64). False as well for text that is not an address.

    Examples
    --------
    >>> is_public_address("8.8.8.8"), is_public_address("::ffff:127.0.0.1")
    (True, False)
    """
    parsed = parse_ip_host(ip)
    return parsed is not None and _is_public(parsed)


def parse_ip_host(host: str) -> _IPAddress | None:
    """The address a URL host literally names, or None when it is a name to resolve.

    Reads dotted-quad, bracketed IPv6 (with or without a zone, kept as ``scope_id``) and the
    legacy numeric IPv4 forms that ``inet_aton`` and browsers accept (``2130706433``,
    ``0x7f.1``, ``0177.0.0.1``), through the C library's own ``inet_aton``.
    """
    text = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    # inet_aton stops at whitespace and takes what came before it: such a host is a name
    if not text.isascii() or any(c.isspace() for c in text):
        return None
    try:  # a trailing dot is allowed, as in a fully qualified name
        return ipaddress.IPv4Address(socket.inet_aton(text.removesuffix(".")))
    except (OSError, ValueError):
        return None


def system_resolver(host: str) -> list[str]:
    """Resolve ``host`` with the system resolver (``getaddrinfo``); unique addresses, in order."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in infos))


def check_host(
    host: str, *, allow_private: bool, resolver: Resolver = system_resolver
) -> list[str]:
    """Resolve ``host`` and return its addresses; raise :class:`BlockedAddress` if any is refused.

    An address literal (in any encoding :func:`parse_ip_host` reads) is checked without a lookup.
    Every address must be public: a name that resolves to one public and one private address is
    refused, since the connection could land on either. ``OSError`` from the resolver propagates.
    """
    literal = parse_ip_host(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        addresses = list(resolver(host.rstrip(".")))
        if not addresses:
            raise OSError(f"{host!r} resolved to no address")
    if not allow_private:
        for addr in addresses:
            if not is_public_address(addr):
                raise BlockedAddress(f"{host} resolves to non-public address {addr}")
    return addresses


def check_url(url: str, *, allow_private: bool, resolver: Resolver = system_resolver) -> list[str]:
    """Resolve the host of an http(s) ``url``; raise :class:`BlockedAddress` if it is refused.

    Parameters
    ----------
    url : str
        An absolute ``http://`` or ``https://`` URL.
    allow_private : bool
        Accept every address (the offline demo and tests serve from loopback).
    resolver : callable, optional
        ``resolver(host) -> [ip, ...]``; the system resolver by default.

    Returns
    -------
    list of str
        The addresses the host resolves to, all checked; connect to these and no others.

    Raises
    ------
    ValueError
        The URL is not http(s) or has no host.
    BlockedAddress
        An address is private, loopback, link-local, multicast or reserved.
    OSError
        The host name does not resolve.

    Examples
    --------
    >>> check_url("http://0x7f.1/", allow_private=False)
    Traceback (most recent call last):
    ...
    laion_dask.stages.netguard.BlockedAddress: 0x7f.1 resolves to non-public address 127.0.0.1
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url[:200]!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"URL has no host: {url[:200]!r}")
    return check_host(host, allow_private=allow_private, resolver=resolver)
