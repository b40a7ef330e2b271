"""A network back to TOML, for `define` persisting it under networks.d/.

load(render_network_toml(n)) gives n back; a property test checks that.
"""

from __future__ import annotations

from typing import Any

import tomli_w

from kvmnetd.model.desired import DhcpRange, Network
from kvmnetd.model.forward import Forward
from kvmnetd.model.rate import format_rate


def _plain(v: object) -> Any:
    """TOML-ready: flags and numbers stay, sequences become lists, the rest their text."""
    if isinstance(v, bool | int):
        return v
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return str(v)


def _table(items: list[tuple[str, object]]) -> dict[str, Any]:
    return {k: _plain(v) for k, v in items if v is not None}


def _ranges(rs: tuple[DhcpRange, ...]) -> list[str]:
    return [f"{r.start}-{r.end}" for r in rs]


def forward_table(f: Forward) -> dict[str, Any]:
    """One [[network.NAME.forward]]: a single port as a number, a range as its text."""
    port: int | str = f.port if f.port == f.port_end else f.ports
    return _table([("proto", f.proto), ("port", port), ("address", f.address),
                   ("to", f.to), ("to_port", f.to_port)])


def render_network_toml(net: Network) -> str:
    """A [network.NAME] document that parses back to an equal Network."""
    body = _table([
        ("mode", net.mode.value), ("bridge", net.bridge), ("ipv4", net.ipv4),
        ("ipv6", net.ipv6), ("uplink", net.uplink), ("stp", net.stp),
        ("forward_delay", net.forward_delay), ("mtu", net.mtu), ("autostart", net.autostart),
        ("host_access", net.host_access), ("isolate_ports", net.isolate_ports),
        ("port_rate", format_rate(net.port_rate) if net.port_rate else None),
        ("anti_spoofing", net.anti_spoofing),
        ("allow_users", net.allow_users or None), ("allow_groups", net.allow_groups or None),
    ])
    d = net.dhcp
    if d is not None:
        dhcp = body["dhcp"] = _table([
            ("ranges", _ranges(d.ranges)), ("ranges6", _ranges(d.ranges6) or None),
            ("lease_time", d.lease_time), ("router", d.router), ("ping_check", d.ping_check),
            ("tftp_root", d.tftp_root), ("boot_file", d.boot_file),
            ("next_server", d.next_server), ("ra", d.ra), ("dhcpv6", d.dhcpv6),
        ])
        if d.boot.items():
            dhcp["boot"] = _table(list(d.boot.items()))
        if d.hosts:
            dhcp["host"] = [_table([("mac", h.mac), ("ip", h.ip), ("name", h.name),
                                    ("lease_time", h.lease_time)]) for h in d.hosts]
        if d.hosts6:
            dhcp["host6"] = [_table([("id", h.id), ("ip", h.ip), ("name", h.name),
                                     ("lease_time", h.lease_time)]) for h in d.hosts6]
    body["dns"] = _table([("enabled", net.dns.enabled), ("domain", net.dns.domain),
                          ("forwarders", net.dns.forwarders)])
    if net.dns.hosts:
        body["dns"]["host"] = [_table([("ip", h.ip), ("names", h.names)])
                               for h in net.dns.hosts]
    if net.overlay is not None:
        ov = net.overlay
        body["overlay"] = _table([("vni", ov.vni), ("mode", ov.mode),
                                  ("gateway_mac", ov.gateway_mac), ("dhcp_split", ov.dhcp_split)])
    if net.dnsmasq_options:
        body["dnsmasq"] = _table([("options", net.dnsmasq_options)])
    if net.port_forwards:
        body["forward"] = [forward_table(f) for f in net.port_forwards]
    return tomli_w.dumps({"network": {net.name: body}})
