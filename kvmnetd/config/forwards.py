"""Port forwards: `[[network.NAME.forward]]` tables, and the checks that config and
kvmnetctl's `forward add` share (each problem as (key, message))."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from kvmnetd.config.addresses import parse_ip
from kvmnetd.config.locate import Table, type_name
from kvmnetd.model.desired import Network
from kvmnetd.model.forward import PROTOS, Forward, parse_ports
from kvmnetd.plan.forwards import FORWARD_MODES, in_subnet, reserved_ports, targets

FORWARD_KEYS = ("proto", "port", "address", "to", "to_port")
Problem = tuple[str, str]  # (key, message)


def check_proto(s: str) -> str:
    if s not in PROTOS:
        raise ValueError(f"proto {s!r} must be tcp or udp")
    return s


def check_port(s: str) -> int:
    lo, hi = parse_ports(s.strip())
    if lo != hi:
        raise ValueError(f"to_port {s!r} must be one port")
    return lo


def parse_address(s: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(parse_ip(s))


def forward_problems(fwd: Forward, net: Network) -> list[Problem]:
    """What is wrong with `fwd` on `net` alone (overlaps are checked across networks)."""
    out: list[Problem] = []
    if net.mode not in FORWARD_MODES:
        why = ("the host only switches its traffic" if net.mode.value == "bridged"
               else "its guests have no way out or in through the host")
        out.append(("", f"port forwards need a nat or routed network; {net.name} is "
                        f"{net.mode.value}: {why}"))
        return out
    if fwd.to_port is not None and fwd.port != fwd.port_end:
        out.append(("to_port", f"a port range ({fwd.ports}) keeps its ports; remove "
                               "to_port"))
    addr = fwd.to_address()
    if addr is not None:
        if not in_subnet(addr, net):
            out.append(("to", f"{addr} is not a guest address of network {net.name} "
                              f"({', '.join(str(a.network) for a in (net.ipv4, net.ipv6) if a)})"))
    else:
        names = sorted(_host_names(net))
        if not targets(fwd, net):
            known = f" (known: {', '.join(names)})" if names else ""
            out.append(("to", f"{fwd.to!r} is neither an address nor the name of a "
                              f"[[network.{net.name}.dhcp.host]] with ip{known}"))
    if fwd.address is not None and all(t.version != fwd.address.version
                                       for t in targets(fwd, net)):
        out.append(("address", f"{fwd.address} is IPv{fwd.address.version}, the target "
                               f"{fwd.to} has no IPv{fwd.address.version} address"))
    return out


def _host_names(net: Network) -> set[str]:
    if net.dhcp is None:
        return set()
    return ({h.name for h in net.dhcp.hosts if h.name and h.ip is not None}
            | {h.name for h in net.dhcp.hosts6 if h.name and h.ip is not None})


def reserved_problem(fwd: Forward, networks: Iterable[Network]) -> str | None:
    """A forward over a port that kvmnetd's own dnsmasq serves, or None."""
    for (proto, port), what in sorted(reserved_ports(networks).items()):
        if proto == fwd.proto and fwd.port <= port <= fwd.port_end:
            return (f"{proto} port {port} is kvmnetd's {what} (dnsmasq); a forward there "
                    "would take it from the guests")
    return None


def overlap_problem(fwd: Forward, net_name: str,
                    others: Iterable[tuple[str, Forward]]) -> str | None:
    """The first of `others` (network, forward) that catches the same packets."""
    for name, other in others:
        if fwd.overlaps(other):
            return (f"{fwd.describe()} overlaps {other.describe()} of network {name}")
    return None


def overlapping(items: list[tuple[str, Forward]]) -> dict[int, tuple[str, Forward]]:
    """Index of each item that overlaps an earlier one (by position) -> that earlier one.

    A sweep over the forwards sorted by port, so a thousand of them cost a sort, not a
    million comparisons.
    """
    order = sorted(range(len(items)), key=lambda i: (items[i][1].proto, items[i][1].port, i))
    found: dict[int, tuple[str, Forward]] = {}
    open_: list[int] = []  # earlier in port order, their range not yet ended
    proto = None
    for i in order:
        fwd = items[i][1]
        if fwd.proto != proto:
            open_, proto = [], fwd.proto
        open_ = [j for j in open_ if items[j][1].port_end >= fwd.port]
        for j in open_:
            if fwd.overlaps(items[j][1]) and max(i, j) not in found:
                found[max(i, j)] = items[min(i, j)]
        open_.append(i)
    return found


def read_forwards(t: Table, net: Network) -> tuple[Forward, ...]:
    """The network's [[network.NAME.forward]] tables; issues go to t's file."""
    out: list[Forward] = []
    tables: list[Table] = []
    for i, data in t.tables("forward"):
        f = Table(t.ctx, (*t.path, "forward", i), data, FORWARD_KEYS)
        fwd = _read_one(f, i)
        if fwd is None:
            continue
        for key, msg in forward_problems(fwd, net):
            f.error(key or (), msg)
        if problem := reserved_problem(fwd, [net]):
            f.error("port", problem)
        out.append(fwd)
        tables.append(f)
    for k, (name, other) in overlapping([(net.name, f) for f in out]).items():
        tables[k].error("port", f"{out[k].describe()} overlaps {other.describe()} of "
                                f"network {name}")
    return tuple(out)


def _read_one(f: Table, index: int) -> Forward | None:
    for key in ("proto", "port", "to"):
        if not f.has(key):
            f.error((), f"{key} is required")
    proto = f.text("proto", check_proto, None)
    port = _ports(f)
    to = f.text("to", _check_to, None)
    to_port = f.number("to_port", 0, 1, 65535) if f.has("to_port") else None
    address = f.text("address", parse_address, None)
    if proto is None or port is None or to is None or "to_port" in f.bad:
        return None
    return Forward(proto=proto, port=port[0], port_end=port[1], to=to, to_port=to_port,
                   address=address, index=index)


def _ports(f: Table) -> tuple[int, int] | None:
    if not f.has("port"):
        return None
    v: Any = f.data["port"]
    if type(v) is int:
        v = str(v)
    elif type(v) is not str:
        f.error("port", f"expected a number or a string like \"8000-8010\", got {type_name(v)}")
        return None
    try:
        return parse_ports(v)
    except ValueError as e:
        f.error("port", str(e))
        return None


def _check_to(s: str) -> str:
    try:
        return str(parse_address(s))
    except ValueError:
        pass
    if not s or len(s) > 253 or any(c.isspace() or c in ",/:" for c in s):
        raise ValueError(f"to {s!r} must be a guest address or the name of a dhcp host")
    return s


def parse_target(text: str) -> tuple[str, int | None]:
    """kvmnetctl's TO[:TO_PORT]: "10.0.0.5", "web:80", "fd00::5", "[fd00::5]:80"."""
    host, port = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} must be [IPV6] or [IPV6]:PORT")
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    to = _check_to(host)
    if port == "" and text.endswith(":"):
        raise ValueError(f"{text!r} has an empty port")
    return to, check_port(port) if port else None
