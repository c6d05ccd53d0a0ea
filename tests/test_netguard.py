"""The address guard, checked at the address level: no test here opens a connection."""

from __future__ import annotations

import pytest

from laion_dask.stages.netguard import (
    BlockedAddress,
    check_host,
    check_url,
    is_public_address,
    parse_ip_host,
)

BLOCKED = [
    # IPv4: this-network, private, CGNAT, loopback, link-local/metadata, protocol assignments,
    # documentation, 6to4 relay, benchmarking, multicast, reserved, broadcast
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "10.255.255.255",
    "100.64.0.1",
    "100.127.255.254",
    "127.0.0.1",
    "127.255.0.9",
    "169.254.169.254",
    "169.254.0.1",
    "172.16.0.1",
    "172.31.255.1",
    "192.0.0.8",
    "192.0.2.1",
    "192.88.99.1",
    "192.168.1.1",
    "198.18.0.1",
    "198.19.255.1",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    # IPv6: unspecified, loopback, v4-mapped/compatible/6to4/NAT64 forms of private v4,
    # discard, Teredo/benchmarking, documentation, ULA, link-local, site-local, multicast
    "::",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",
    "2002:7f00:1::",
    "2002:c0a8:101::1",
    "64:ff9b::7f00:1",
    "64:ff9b::a00:1",
    "64:ff9b:1::1",
    "100::1",
    "2001::1",
    "2001:2::1",
    "2001:db8::1",
    "3fff::1",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "fe80::1%eth0",
    "fec0::1",
    "ff02::1",
    "ff05::1:3",
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "2606:4700:4700::1111",
    "2a00:1450:4001::1",
    "::ffff:8.8.8.8",
    "2002:808:808::1",
    "64:ff9b::808:808",
    "100.128.0.1",
    "172.32.0.1",
]


@pytest.mark.parametrize("ip", BLOCKED)
def test_non_public_ranges_are_refused(ip: str) -> None:
    assert not is_public_address(ip)


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_pass(ip: str) -> None:
    assert is_public_address(ip)


def test_garbage_is_not_public() -> None:
    assert not is_public_address("not an ip")
    assert not is_public_address("")
    assert not is_public_address("1.2.3.4.5")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),  # one 32-bit decimal number
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),  # a.(24 bits)
        ("127.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),  # octal
        ("017700000001", "127.0.0.1"),
        ("0x7F.0.0.0x1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),  # trailing dot
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("3232235777", "192.168.1.1"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("example.com", None),
        ("1.2.3.4.5", None),
        ("256.1.1.1", None),
        ("0x1g.1", None),
    ],
)
def test_legacy_numeric_hosts_are_read_like_inet_aton(host: str, expected: str | None) -> None:
    parsed = parse_ip_host(host)
    assert (str(parsed) if parsed is not None else None) == expected


def _no_lookup(host: str) -> list[str]:
    raise AssertionError(f"an address literal must not be looked up: {host}")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.jpg",
        "http://127.0.0.1:8080/x.jpg",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]/",
        "https://169.254.169.254/latest/meta-data/",
        "http://[fe80::1%25eth0]/",
        "http://10.1.2.3/a.png",
        "HTTP://192.168.0.1/",
        "http://user:pw@127.0.0.1/",
    ],
)
def test_urls_naming_private_addresses_are_blocked_without_a_lookup(url: str) -> None:
    with pytest.raises(BlockedAddress):
        check_url(url, allow_private=False, resolver=_no_lookup)
    # the same URL passes when private networks are allowed (tests and the offline demo)
    assert check_url(url, allow_private=True, resolver=_no_lookup)


def _zone(answers: dict[str, list[str]]):
    def resolve(host: str) -> list[str]:
        if host not in answers:
            raise OSError(f"NXDOMAIN {host}")
        return answers[host]

    return resolve


def test_names_are_checked_after_resolution() -> None:
    resolver = _zone(
        {
            "public.test": ["93.184.216.34", "2606:2800:220:1::1"],
            "localhost": ["127.0.0.1", "::1"],
            "internal.test": ["10.0.0.5"],
            "mixed.test": ["93.184.216.34", "192.168.0.10"],  # a rebinding-style answer
        }
    )
    got = check_url("https://public.test/a.jpg", allow_private=False, resolver=resolver)
    assert got == ["93.184.216.34", "2606:2800:220:1::1"]
    for host in ("localhost", "internal.test", "mixed.test", "LOCALHOST."):
        with pytest.raises(BlockedAddress, match="non-public"):
            check_url(f"http://{host}/", allow_private=False, resolver=resolver)
    with pytest.raises(OSError, match="NXDOMAIN"):
        check_url("http://nowhere.test/", allow_private=False, resolver=resolver)


def test_check_host_refuses_an_empty_answer() -> None:
    with pytest.raises(OSError, match="no address"):
        check_host("empty.test", allow_private=False, resolver=_zone({"empty.test": []}))


@pytest.mark.parametrize(
    "url", ["ftp://8.8.8.8/a.jpg", "data:image/png;base64,AAAA", "file:///etc/passwd", "http:///x"]
)
def test_non_http_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        check_url(url, allow_private=True, resolver=_no_lookup)
