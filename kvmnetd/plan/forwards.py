"""Pure: a network's port forwards -> nftables rules for our `inet` table.

For each forward and each address family its target has:

- prerouting: DNAT of connections from outside (and from guests: hairpin) to the
  host's addresses; no SNAT, so the guest sees the real client address;
- output: the same for connections the host itself opens;
- postrouting: masquerade only the hairpin flow (a guest of the network reaching the
  forward), else the target would answer the other guest directly, from an address
  that guest never spoke to;
- forward: accept what our DNAT sends into the bridge, before the network's drops.

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
    prerouting: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    postrouting: list[str] = field(default_factory=list)
    forward: list[str] = field(default_factory=list)


# Named sets of the addresses a forward without `address` does not listen on: one per
# family and hook, declared once in the table (sets_for), not once per rule.
SKIP_SETS = {("ip", False): "forward_skip4", ("ip", True): "forward_skip4_out",
             ("ip6", False): "forward_skip6", ("ip6", True): "forward_skip6_out"}


def _listen(fwd: Forward, fam: str, output: bool) -> str | None:
    """The match on where the packet was sent; None when the forward has nothing here."""
    if fwd.address is not None:
        return None if _fam(fwd.address) != fam else f"{fam} daddr {fwd.address}"
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


def _dnat(fwd: Forward, to: IPAddress) -> str:
    if fwd.to_port is None:
        return f"dnat {_fam(to)} to {to}"
    host = str(to) if to.version == 4 else f"[{to}]"
    return f"dnat {_fam(to)} to {host}:{fwd.to_port}"


def forward_rules(net: Network, tag: str, quote_br: str) -> ForwardRules:
    """Rules of one network's forwards, each ending in `comment TAG`."""
    r = ForwardRules()
    if net.mode not in FORWARD_MODES or not net.port_forwards:
        return r
    families: set[str] = set()
    for fwd in net.port_forwards:
        ports = fwd.ports
        for to in targets(fwd, net):
            fam = _fam(to)
            families.add(fam)
            for chain, output in ((r.prerouting, False), (r.output, True)):
                listen = _listen(fwd, fam, output)
                if listen is not None:
                    chain.append(f"{listen} {fwd.proto} dport {ports} {_dnat(fwd, to)}"
                                 f" comment {tag}")
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
