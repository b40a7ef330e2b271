"""Pure: a network's port forwards -> nftables maps and rules for our `inet` table.

The single-port forwards of a network go into DNAT maps, one per address family and kind
(any host address or one given `address`; a guest port given, or the host's port kept),
keyed by protocol and port; a few rules look them up. A port range is a rule of its own
(ranges are few; as map elements they would need an interval map, whose elements nft
monitor does not report, so their loss could not be healed at once). The hooks:

- prerouting: DNAT of connections from outside (and from guests: hairpin) to the
  host's addresses; no SNAT, so the guest sees the real client address;
- output: the same for connections the host itself opens;
- postrouting: masquerade only the hairpin flow (a guest of the network reaching the
  forward), else the target would answer the other guest directly, from an address
  that guest never spoke to;
- forward: accept what our DNAT sends into the bridge, before the network's drops.

A thousand single-port forwards are then a thousand map elements, not two thousand
rules: one lookup per new connection, and `nft -f` of the table stays fast.

Without `address`, a forward listens on every local address of the host except the
gateway addresses of our own networks (`fib daddr type local`, minus a named set).
Loopback is left alone: the kernel does not route 127.0.0.0/8 to another host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kvmnetd.model.desired import Mode, Network
from kvmnetd.model.forward import Forward, IPAddress

# Modes where a forward has a way in: the host routes the network's traffic.
FORWARD_MODES = (Mode.NAT, Mode.ROUTED)


def targets(fwd: Forward, net: Network) -> list[IPAddress]:
    """The guest addresses `fwd` goes to: its address, or its named host's v4 and v6."""
    addr = fwd.to_address()
    if addr is not None:
        return [addr]
    out: list[IPAddress] = []
    dhcp = net.dhcp
    if dhcp is None:
        return out
    out += [h.ip for h in dhcp.hosts if h.name == fwd.to and h.ip is not None][:1]
    out += [h.ip for h in dhcp.hosts6 if h.name == fwd.to and h.ip is not None][:1]
    return out


def _fam(addr: IPAddress) -> str:
    return "ip" if addr.version == 4 else "ip6"


@dataclass
class ForwardRules:
    maps: list[str] = field(default_factory=list)  # declarations, at the table's top
    prerouting: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    postrouting: list[str] = field(default_factory=list)
    forward: list[str] = field(default_factory=list)


# Named sets of the addresses a forward without `address` does not listen on: one per
# family and hook, declared once in the table (sets_for), not once per rule.
SKIP_SETS = {("ip", False): "forward_skip4", ("ip", True): "forward_skip4_out",
             ("ip6", False): "forward_skip6", ("ip6", True): "forward_skip6_out"}


def _listen(fam: str, output: bool) -> str:
    """Where a forward without `address` listens: local addresses but our gateways."""
    return f"fib daddr type local {fam} daddr != @{SKIP_SETS[(fam, output)]}"


def sets_for(rules: list[str], gateways: Iterable[IPAddress]) -> list[str]:
    """Declarations of the skip sets `rules` use: our gateways, and loopback for output."""
    out = []
    text = "\n".join(rules)
    for (fam, output), name in SKIP_SETS.items():
        if f"@{name} " not in text:
            continue
        elems = [str(g) for g in sorted(gateways, key=lambda a: (a.version, a))
                 if _fam(g) == fam]
        if output:
            elems.append("127.0.0.0/8" if fam == "ip" else "::1/128")
        kind = "ipv4_addr" if fam == "ip" else "ipv6_addr"
        flags = " flags interval;" if output else ""
        body = f" elements = {{ {', '.join(elems)} }}" if elems else ""
        out.append(f"set {name} {{ type {kind};{flags}{body} }}")
    return out


_L4 = "meta l4proto { tcp, udp }"
_KEY = "meta l4proto . th dport"
_TYPES = {"ip": "ipv4_addr", "ip6": "ipv6_addr"}


def _range_rules(r: ForwardRules, fwd: Forward, to: IPAddress, tag: str) -> None:
    """A port range: a rule of its own per hook (ranges keep their ports, so no to_port)."""
    fam = _fam(to)
    for chain, output in ((r.prerouting, False), (r.output, True)):
        listen = _listen(fam, output) if fwd.address is None \
            else f"fib daddr type local {fam} daddr {fwd.address}"
        chain.append(f"{listen} {fwd.proto} dport {fwd.ports} dnat {fam} to {to} comment {tag}")


def _value(fwd: Forward, to: IPAddress) -> str:
    return str(to) if fwd.to_port is None else f"{to} . {fwd.to_port}"


def forward_rules(net: Network, tag: str, quote_br: str, prefix: str) -> ForwardRules:
    """Maps (named `prefix`_...) and rules of one network's forwards; rules end in `comment
    TAG`."""
    r = ForwardRules()
    if net.mode not in FORWARD_MODES or not net.port_forwards:
        return r
    # (family, by address, guest port given) -> map elements of single ports
    elements: dict[tuple[str, bool, bool], list[str]] = {}
    families: set[str] = set()
    for fwd in net.port_forwards:
        for to in targets(fwd, net):
            fam = _fam(to)
            if fwd.address is not None and _fam(fwd.address) != fam:
                continue
            families.add(fam)
            if fwd.port != fwd.port_end:
                _range_rules(r, fwd, to, tag)
                continue
            key = f"{fwd.proto} . {fwd.port}"
            if fwd.address is not None:
                key = f"{fwd.address} . {key}"
            kind = (fam, fwd.address is not None, fwd.to_port is not None)
            elements.setdefault(kind, []).append(f"{key} : {_value(fwd, to)}")
    for (fam, by_address, mapped), elems in sorted(elements.items()):
        name = f"{prefix}_{fam}{'_addr' if by_address else ''}{'_port' if mapped else ''}"
        ktype = f"{_TYPES[fam]} . " if by_address else ""
        vtype = f"{_TYPES[fam]} . inet_service" if mapped else _TYPES[fam]
        # No interval flag: nft monitor does not report elements of concatenated interval
        # maps, and a deleted element must be seen to be healed.
        r.maps.append(f"map {name} {{ type {ktype}inet_proto . inet_service : {vtype}; "
                      f"elements = {{ {', '.join(elems)} }} }}")
        for chain, output in ((r.prerouting, False), (r.output, True)):
            where = f"{fam} daddr . {_KEY}" if by_address else _KEY
            # With an address too: only while it is the host's, never traffic routed through.
            listen = "fib daddr type local " if by_address else f"{_listen(fam, output)} "
            chain.append(f"{listen}{_L4} dnat {fam} to {where} map @{name} comment {tag}")
    prefixes = {fam: pfx for fam, pfx in (
        ("ip", net.ipv4.network if net.ipv4 else None),
        ("ip6", net.ipv6.network if net.ipv6 else None)) if pfx is not None}
    for fam in sorted(families):
        pfx = prefixes.get(fam)
        if pfx is not None:
            r.postrouting.append(f"{fam} saddr {pfx} {fam} daddr {pfx} ct status dnat "
                                 f"masquerade comment {tag}")
            r.forward.append(f"oifname {quote_br} {fam} daddr {pfx} ct status dnat accept"
                             f" comment {tag}")
    return r


def gateways_of(networks: Iterable[Network]) -> list[IPAddress]:
    """Our own networks' gateway addresses: a forward without `address` skips them."""
    out: list[IPAddress] = []
    for n in networks:
        out += [a.ip for a in (n.ipv4, n.ipv6) if a is not None]
    return out


def reserved_ports(networks: Iterable[Network]) -> dict[tuple[str, int], str]:
    """(proto, port) -> what of kvmnetd's own dnsmasq uses it, over the given networks."""
    out: dict[tuple[str, int], str] = {}
    for n in networks:
        if n.mode is Mode.BRIDGED or not n.needs_dnsmasq:
            continue
        if n.dns.enabled:
            out[("udp", 53)] = out[("tcp", 53)] = "DNS"
        if n.dhcp is not None and n.ipv4 is not None:
            out[("udp", 67)] = "DHCP"
        if n.dhcp is not None and n.ipv6 is not None:
            out[("udp", 547)] = "DHCPv6"
        if n.dhcp is not None and n.dhcp.tftp_root:
            out[("udp", 69)] = "TFTP"
    return out


def in_subnet(addr: IPAddress, net: Network) -> bool:
    iface = net.ipv4 if addr.version == 4 else net.ipv6
    return iface is not None and addr in iface.network and addr != iface.ip
