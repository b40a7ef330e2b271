"""Pure renderer: anti-spoofing as kvmnetd's own `bridge` table.

The table's chains and sets never change; which ports are guarded and what each may
send are set elements keyed by the port's name. A lease or a new port is then an element
update, never a rewrite, and the per-port drop counters (elements of `drops`) survive it.

    prerouting   every frame a guarded port receives from its guest -> guard
    guard        rogue DHCP servers and router advertisements: dropped, whatever the
                 sender; a port whose MAC is still unknown may only ask for DHCP
    own_mac      the port's own MAC: ARP, IPv4, IPv6 from its own addresses only
    spoofed      the drop, counted per port

The bridge has no `meta ibrname` here (not built into every kernel), so a port is guarded
by being in the `ports` set: the planner adds it there before the port joins its bridge.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

from kvmnetd.model.desired import Network, is_nft_name
from kvmnetd.model.guard import GuardElement, PortIdentity
from kvmnetd.plan.nft import quote

# Set name -> its type; the order is the order of the table.
SETS: tuple[tuple[str, str], ...] = (
    ("ports", "type ifname"),  # guarded ports
    ("drops", "type ifname\n\t\tcounter"),  # the same ports: a drop counter each
    ("bound", "type ifname"),  # ports whose MAC is known
    ("macs", "type ifname . ether_addr"),
    ("addr4", "type ifname . ipv4_addr"),
    ("addr6", "type ifname . ipv6_addr"),
    # Neighbour advertisement targets: 1.0.6 has no `icmpv6 taddr`, so the raw field.
    ("nd6", "typeof iifname . @th,64,128"),
)

_DHCP_DISCOVERY = "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67"

_CHAINS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prerouting", (
        "type filter hook prerouting priority filter; policy accept;",
        "iifname @ports jump guard",
    )),
    ("guard", (
        # No guest answers DHCP (v4 server or relay port, DHCPv6 server port) or acts
        # as a router, whatever address it uses.
        "udp sport { 67, 547 } goto spoofed",
        "icmpv6 type { nd-router-advert, nd-redirect } goto spoofed",
        "iifname . ether saddr @macs goto own_mac",
        # MAC not known yet: it is learned from the guest's first DHCP exchange. What the
        # guest sends before (router solicitations, DAD) is not counted as spoofing.
        f"iifname != @bound ether type ip {_DHCP_DISCOVERY} accept",
        "iifname != @bound drop",
        "goto spoofed",
    )),
    ("own_mac", (
        f"ether type ip {_DHCP_DISCOVERY} accept",
        "ether type ip iifname . ip saddr @addr4 accept",
        "ether type arp iifname . arp saddr ether != @macs goto spoofed",
        "ether type arp arp saddr ip 0.0.0.0 accept",  # address probes (RFC 5227)
        "ether type arp iifname . arp saddr ip @addr4 accept",
        "icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @nd6 goto spoofed",
        # Duplicate address detection and MLD before an address is assigned.
        "ip6 saddr :: meta l4proto ipv6-icmp accept",
        "ether type ip6 iifname . ip6 saddr @addr6 accept",
        "goto spoofed",
    )),
    ("spoofed", (
        "iifname @drops drop",
        "drop",
    )),
)


def _check_table(table: str) -> str:
    if not is_nft_name(table):
        raise ValueError(f"invalid nftables table name: {table!r}")
    return table


def _skeleton(table: str) -> list[str]:
    lines: list[str] = []
    for name, decl in SETS:
        lines += [f"\tset {name} {{", f"\t\t{decl}", "\t}"]
    for name, rules in _CHAINS:
        lines.append(f"\tchain {name} {{")
        lines.extend(f"\t\t{rule}" for rule in rules)
        lines.append("\t}")
    return lines


def fingerprint(table: str = "kvmnetd") -> str:
    """Short sha256 of the chains and sets (not the elements): the table's comment."""
    text = f"bridge {_check_table(table)}\n" + "\n".join(_skeleton(table))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def eui64(mac: str, prefix: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    """The address SLAAC derives from `mac` in a /64 (modified EUI-64)."""
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    iid = bytes([*octets[:3], 0xFF, 0xFE, *octets[3:]])
    return ipaddress.IPv6Address(int(prefix.network_address) | int.from_bytes(iid, "big"))


_LINK_LOCAL = ipaddress.IPv6Network("fe80::/64")


def port_addresses(net: Network, ident: PortIdentity
                   ) -> tuple[list[ipaddress.IPv4Address], list[ipaddress.IPv6Address]]:
    """What the guest behind a port may send from: its leases, its static DHCP host,
    and in IPv6 its link-local and SLAAC addresses derived from its MAC."""
    mac = ident.mac
    if mac is None:
        return [], []
    # Leases of this network only: a guest moved here keeps no address from another.
    v4 = {a for a in map(ipaddress.IPv4Address, ident.ipv4)
          if net.ipv4 is not None and a in net.ipv4.network}
    v6 = {a for a in map(ipaddress.IPv6Address, ident.ipv6)
          if net.ipv6 is not None and a in net.ipv6.network}
    if net.dhcp is not None:
        v4 |= {h.ip for h in net.dhcp.hosts if h.mac == mac and h.ip is not None}
    v6.add(eui64(mac, _LINK_LOCAL))
    if net.ipv6 is not None and net.ipv6.network.prefixlen == 64:
        v6.add(eui64(mac, net.ipv6.network))
    return sorted(v4), sorted(v6)


def port_elements(ifname: str, net: Network, ident: PortIdentity | None) -> set[GuardElement]:
    """Every set element that guards one port."""
    port = quote(ifname)
    out: set[GuardElement] = {("ports", port), ("drops", port)}
    if ident is None or ident.mac is None:
        return out
    out |= {("bound", port), ("macs", f"{port} . {ident.mac}")}
    v4, v6 = port_addresses(net, ident)
    out |= {("addr4", f"{port} . {a}") for a in v4}
    out |= {("addr6", f"{port} . {a}") for a in v6}
    out |= {("nd6", f"{port} . 0x{int(a):032x}") for a in v6}
    return out


def port_of(element: GuardElement) -> str:
    """The port an element belongs to (its name, unquoted)."""
    return element[1].split(" . ", 1)[0].strip('"')


def _elements_by_set(elements: Iterable[GuardElement]) -> dict[str, list[str]]:
    by_set: dict[str, list[str]] = {}
    for name, value in sorted(elements):
        by_set.setdefault(name, []).append(value)
    return by_set


def render_table(elements: Iterable[GuardElement], table: str = "kvmnetd") -> str:
    """The whole table with its elements, as one transaction for `nft -f -`."""
    _check_table(table)
    by_set = _elements_by_set(elements)
    lines = [
        f"add table bridge {table}",
        f"delete table bridge {table}",
        f"table bridge {table} {{",
        f'\tcomment "kvmnetd {fingerprint(table)}"',
        *_skeleton(table),
        "}",
    ]
    for name, _ in SETS:
        if by_set.get(name):
            lines.append(f"add element bridge {table} {name} {{ {', '.join(by_set[name])} }}")
    return "\n".join(lines) + "\n"


def render_update(add: Iterable[GuardElement], delete: Iterable[GuardElement],
                  table: str = "kvmnetd") -> str:
    """Element changes as one transaction: deletions first, so a port's address can move."""
    _check_table(table)
    lines: list[str] = []
    for verb, elements in (("delete", delete), ("add", add)):
        for name, values in _elements_by_set(elements).items():
            lines.append(f"{verb} element bridge {table} {name} {{ {', '.join(values)} }}")
    return "\n".join(lines) + "\n" if lines else ""
