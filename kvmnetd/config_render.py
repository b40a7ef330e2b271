"""A network back to TOML, for `define` persisting it under networks.d/.

load(render_network_toml(n)) gives n back; a property test checks that.
"""

from __future__ import annotations

import re

from .model import DhcpRange, Network


def _quote(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return _quote(str(v))


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _quote(name)


def _ranges(rs: tuple[DhcpRange, ...]) -> list[str]:
    return [f"{r.start}-{r.end}" for r in rs]


def render_network_toml(net: Network) -> str:
    """A [network.NAME] document that parses back to an equal Network."""
    head = f"network.{_key(net.name)}"
    out: list[str] = []

    def table(header: str, items: list[tuple[str, object]]) -> None:
        out.append(f"\n{header}" if out else header)
        out.extend(f"{k} = {_value(v)}" for k, v in items if v is not None)

    table(f"[{head}]", [
        ("mode", net.mode.value), ("bridge", net.bridge), ("ipv4", net.ipv4),
        ("ipv6", net.ipv6), ("uplink", net.uplink), ("stp", net.stp),
        ("forward_delay", net.forward_delay), ("mtu", net.mtu), ("autostart", net.autostart),
        ("host_access", net.host_access),
        ("allow_users", net.allow_users or None), ("allow_groups", net.allow_groups or None),
    ])
    d = net.dhcp
    if d is not None:
        table(f"[{head}.dhcp]", [
            ("ranges", _ranges(d.ranges)), ("ranges6", _ranges(d.ranges6) or None),
            ("lease_time", d.lease_time), ("router", d.router), ("ping_check", d.ping_check),
            ("tftp_root", d.tftp_root), ("boot_file", d.boot_file),
            ("next_server", d.next_server), ("ra", d.ra), ("dhcpv6", d.dhcpv6),
        ])
        if d.boot.items():
            table(f"[{head}.dhcp.boot]", list(d.boot.items()))
        for h in d.hosts:
            table(f"[[{head}.dhcp.host]]", [
                ("mac", h.mac), ("ip", h.ip), ("name", h.name), ("lease_time", h.lease_time)])
        for h6 in d.hosts6:
            table(f"[[{head}.dhcp.host6]]", [
                ("id", h6.id), ("ip", h6.ip), ("name", h6.name), ("lease_time", h6.lease_time)])
    table(f"[{head}.dns]", [("enabled", net.dns.enabled), ("domain", net.dns.domain),
                            ("forwarders", net.dns.forwarders)])
    for dh in net.dns.hosts:
        table(f"[[{head}.dns.host]]", [("ip", dh.ip), ("names", dh.names)])
    if net.dnsmasq_options:
        table(f"[{head}.dnsmasq]", [("options", net.dnsmasq_options)])
    return "\n".join(out) + "\n"
