"""Addresses, gateways and ranges as the config gives them: checked, with a message saying why."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _plain_ip(s: str) -> IPAddress:
    if "%" in s:
        raise ValueError(f"{s!r}: scoped addresses are not supported")
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        raise ValueError(f"{s!r} is not an IP address") from None


def parse_ip(s: str) -> str:
    return str(_plain_ip(s))


def parse_ipv4(s: str) -> ipaddress.IPv4Address:
    ip = _plain_ip(s)
    if not isinstance(ip, ipaddress.IPv4Address):
        raise ValueError(f"{s!r} is not an IPv4 address")
    return ip


def _check_unicast(ip: IPAddress, s: str) -> None:
    if ip.is_multicast or ip.is_loopback or ip.is_unspecified or ip.is_link_local or (
        isinstance(ip, ipaddress.IPv4Address) and ip.is_reserved
    ):
        raise ValueError(f"{s!r} is not a usable unicast address")


def parse_gateway4(s: str) -> ipaddress.IPv4Interface:
    if "/" not in s:
        raise ValueError(f"{s!r} needs a prefix length, like 10.0.0.1/24")
    try:
        iface = ipaddress.IPv4Interface(s)
    except ValueError:
        raise ValueError(f"{s!r} is not an IPv4 address with prefix (10.0.0.1/24)") from None
    _check_unicast(iface.ip, s)
    net = iface.network
    if net.prefixlen == 32:
        raise ValueError(f"{s!r}: a /32 leaves no room for guests")
    if net.prefixlen <= 30 and iface.ip in (net.network_address, net.broadcast_address):
        raise ValueError(f"{s!r} is the network or broadcast address of {net}; "
                         "the gateway must be a host address")
    return iface


def parse_gateway6(s: str) -> ipaddress.IPv6Interface:
    if "/" not in s or "%" in s:
        raise ValueError(f"{s!r} needs a prefix length, like fd00:1::1/64")
    try:
        iface = ipaddress.IPv6Interface(s)
    except ValueError:
        raise ValueError(f"{s!r} is not an IPv6 address with prefix (fd00:1::1/64)") from None
    _check_unicast(iface.ip, s)
    net = iface.network
    if net.prefixlen == 128:
        raise ValueError(f"{s!r}: a /128 leaves no room for guests")
    if net.prefixlen <= 126 and iface.ip == net.network_address:
        raise ValueError(f"{s!r} is the subnet-router anycast address of {net}")
    return iface


def parse_range(s: str) -> tuple[IPAddress, IPAddress]:
    start, sep, end = s.partition("-")
    if not sep:
        raise ValueError(f"range {s!r} must look like FIRST-LAST, e.g. 10.0.0.1-10.0.0.100")
    a, b = _plain_ip(start.strip()), _plain_ip(end.strip())
    if a.version != b.version:
        raise ValueError(f"range {s!r} mixes IPv4 and IPv6")
    if a > b:  # type: ignore[operator]  # same version checked above
        raise ValueError(f"range {s!r} starts after it ends")
    return a, b


# -- schema -------------------------------------------------------------------
