"""Pure renderer: desired networks -> one nftables transaction for our own `inet` table.

The text replaces our table atomically and touches nothing else:

    add table inet T       (so the delete cannot fail when the table is absent)
    delete table inet T
    table inet T { comment "kvmnetd <fingerprint>" ... }
    add table bridge T_ov  (the same for the overlay networks' VXLAN ports)
    delete table bridge T_ov
    table bridge T_ov { ... }   (only with overlay networks)

Only chains that carry rules are emitted, so an empty network list (or bridged
networks only) gives an empty table. The caller may instead remove the table
altogether; both leave the host's traffic alone.

br_netfilter is on: traffic between two ports of one bridge also passes the
forward hook, so every forward rule set first lets bridge-local traffic through
(or, for isolated networks, only drops what leaves or enters the bridge).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Iterable

from kvmnetd.model.desired import Mode, Network, is_nft_name
from kvmnetd.plan.forwards import forward_rules, gateways_of, sets_for

# Multicast control and limited broadcast are never masqueraded (as libvirt does).
_NO_MASQUERADE = ("224.0.0.0/24", "255.255.255.255")

_CHAINS = (
    ("postrouting", "type nat hook postrouting priority srcnat; policy accept;"),
    ("forward", "type filter hook forward priority filter; policy accept;"),
    ("input", "type filter hook input priority filter; policy accept;"),
    # Port forwards only (plan/forwards.py): DNAT before routing, and for the host's own
    # connections. -100 is dstnat; nft 1.0.6 knows that name for prerouting only.
    ("prerouting", "type nat hook prerouting priority dstnat; policy accept;"),
    ("output", "type nat hook output priority -100; policy accept;"),
)


def quote(value: str) -> str:
    """Quote a name for nft; names are validated elsewhere, this refuses what would break out."""
    if not value or any(c in value for c in '"\\\n\r\t') or not value.isprintable():
        raise ValueError(f"name not usable in an nftables rule: {value!r}")
    return f'"{value}"'


def _check_table(table: str) -> str:
    if not is_nft_name(table):
        raise ValueError(f"invalid nftables table name: {table!r}")
    return table


class _Rules:
    """Rules of one network, each tagged with a comment naming it."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.br = quote(net.bridge)
        self.tag = quote(f"net:{net.name}")
        self.postrouting: list[str] = []
        self.forward: list[str] = []
        self.input: list[str] = []
        self.prerouting: list[str] = []
        self.output: list[str] = []
        self.maps: list[str] = []  # port forwards' DNAT maps

    def add(self, chain: list[str], rule: str) -> None:
        chain.append(f"{rule} comment {self.tag}")


def _families(net: Network) -> Iterable[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    if net.ipv4 is not None:
        yield "ip", net.ipv4.network
    if net.ipv6 is not None:
        yield "ip6", net.ipv6.network


def _service_rules(r: _Rules, open_host: bool) -> None:
    """Input from the bridge: the services the network's config turns on, on every mode.

    On isolated networks without host_access everything else to the host is dropped.
    """
    net, br = r.net, r.br
    dhcp = net.dhcp
    if dhcp is not None and net.ipv4 is not None:
        r.add(r.input, f"iifname {br} udp dport 67 accept")
    if dhcp is not None and net.ipv6 is not None:
        r.add(r.input, f"iifname {br} udp dport 547 accept")
    if net.dns.enabled:
        r.add(r.input, f"iifname {br} udp dport 53 accept")
        r.add(r.input, f"iifname {br} tcp dport 53 accept")
    if dhcp is not None and dhcp.tftp_root:
        # Only the request: dnsmasq answers from a new port of its own, so the guest's
        # acknowledgements are replies to that flow and pass as established below.
        r.add(r.input, f"iifname {br} udp dport 69 accept")
    if net.ipv6 is not None or not open_host:
        # Router solicitations for RA, and neighbour discovery, which even a bridge
        # with only its link-local address needs where the rest is dropped.
        r.add(r.input, f"iifname {br} icmpv6 type "
                       "{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept")
    if open_host:
        return
    # Replies to flows the host opened: TFTP data, its own connections to guests.
    r.add(r.input, f"iifname {br} ct state established,related accept")
    r.add(r.input, f"iifname {br} drop")


def _forward_rules(r: _Rules) -> None:
    """nat and routed: guests out with their own prefix; in only where the mode allows."""
    net, br = r.net, r.br
    out = f" oifname {quote(net.uplink)}" if net.uplink else ""
    r.add(r.forward, f"iifname {br} oifname {br} accept")
    for fam, prefix in _families(net):
        r.add(r.forward, f"iifname {br}{out} {fam} saddr {prefix} accept")
        if net.mode is Mode.NAT and fam == "ip":
            # NAT: only replies come back in.
            r.add(r.forward,
                  f"oifname {br} {fam} daddr {prefix} ct state established,related accept")
        else:
            # Routed (and IPv6 on a nat network): the prefix is reachable as is.
            r.add(r.forward, f"oifname {br} {fam} daddr {prefix} accept")
    # Spoofed sources out, anything else in.
    r.add(r.forward, f"iifname {br} drop")
    r.add(r.forward, f"oifname {br} drop")


def _nat_rules(r: _Rules) -> None:
    net = r.net
    if net.ipv4 is None:
        return
    prefix = net.ipv4.network
    for dst in _NO_MASQUERADE:
        r.add(r.postrouting, f"ip saddr {prefix} ip daddr {dst} return")
    out = f" oifname {quote(net.uplink)}" if net.uplink else ""
    r.add(r.postrouting, f"ip saddr {prefix} ip daddr != {prefix}{out} masquerade")


def _rules_for(net: Network, index: int) -> _Rules:
    r = _Rules(net)
    if net.mode is Mode.NAT:
        _nat_rules(r)
        _forward_rules(r)
        _service_rules(r, open_host=True)
    elif net.mode is Mode.ROUTED:
        _forward_rules(r)
        _service_rules(r, open_host=True)
    elif net.mode is Mode.ISOLATED:
        # Not a bare `iifname BR drop`: that would also cut guests off from each other.
        r.add(r.forward, f"iifname {r.br} oifname != {r.br} drop")
        r.add(r.forward, f"oifname {r.br} iifname != {r.br} drop")
        _service_rules(r, open_host=net.host_access)
    # bridged: the host only switches; no rules.
    fwd = forward_rules(net, r.tag, r.br, f"forward{index}")
    # Hairpin masquerade and the accept of DNAT-ed flows go before the network's own
    # returns and drops.
    r.postrouting[:0] = fwd.postrouting
    r.forward[:0] = fwd.forward
    r.prerouting, r.output, r.maps = fwd.prerouting, fwd.output, fwd.maps
    return r


def _body(networks: list[Network]) -> list[str]:
    chains: dict[str, list[str]] = {name: [] for name, _ in _CHAINS}
    maps: list[str] = []
    for index, net in enumerate(sorted(networks, key=lambda n: n.name)):
        r = _rules_for(net, index)
        maps += r.maps
        chains["postrouting"] += r.postrouting
        chains["forward"] += r.forward
        chains["input"] += r.input
        chains["prerouting"] += r.prerouting
        chains["output"] += r.output
    decls = sets_for(chains["prerouting"] + chains["output"], gateways_of(networks)) + maps
    lines = [f"\t{decl}" for decl in decls]
    for name, header in _CHAINS:
        if not chains[name]:
            continue
        lines.append(f"\tchain {name} {{")
        lines.append(f"\t\t{header}")
        lines.extend(f"\t\t{rule}" for rule in chains[name])
        lines.append("\t}")
    return lines


# What must not cross a VXLAN port: DHCP (each host's dnsmasq answers its own guests
# only) and router solicitations/advertisements (each host is the router of its own).
_LOCAL_ONLY = ("udp dport 67-68", "udp dport 546-547",
               "icmpv6 type { nd-router-solicit, nd-router-advert }")
_BRIDGE_CHAINS = (
    ("forward", "type filter hook forward priority filter; policy accept;", ("iif", "oif")),
    ("input", "type filter hook input priority filter; policy accept;", ("iif",)),
    ("output", "type filter hook output priority filter; policy accept;", ("oif",)),
)


def overlay_table(table: str) -> str:
    """The bridge-family table for overlay networks' VXLAN ports, beside our inet table."""
    suffix = "_ov"
    return table[:32 - len(suffix)] + suffix


def _overlay_body(networks: list[Network]) -> list[str]:
    ports = sorted(n.overlay.vxlan for n in networks if n.overlay is not None)
    if not ports:
        return []
    lines: list[str] = []
    for name, header, sides in _BRIDGE_CHAINS:
        lines += [f"\tchain {name} {{", f"\t\t{header}"]
        for port in ports:
            for side in sides:
                for match in _LOCAL_ONLY:
                    lines.append(f"\t\t{side}name {quote(port)} {match} drop")
        lines.append("\t}")
    return lines


def _digest(table: str, body: list[str]) -> str:
    text = f"{table}\n" + "\n".join(body)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(networks: list[Network], table: str = "kvmnetd") -> str:
    """Short sha256 of the table body; it is also written into the table's comment."""
    return _fingerprint(tuple(networks), table)


@functools.lru_cache(maxsize=16)
def _fingerprint(networks: tuple[Network, ...], table: str) -> str:
    # Called on every pass with the same frozen networks: render once per change.
    return _digest(_check_table(table), _body(list(networks)) + _overlay_body(list(networks)))


def render_ruleset(networks: list[Network], table: str = "kvmnetd") -> str:
    """The whole transaction for `nft -f -`."""
    _check_table(table)
    body = _body(networks)
    overlay = _overlay_body(networks)
    lines = [
        f"add table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        f'\tcomment "kvmnetd {_digest(table, body + overlay)}"',
        *body,
        "}",
    ]
    # Made anew with the inet table, or removed once no overlay network is left.
    ov = overlay_table(table)
    lines += [f"add table bridge {ov}", f"delete table bridge {ov}"]
    if overlay:
        lines += [f"table bridge {ov} {{", *overlay, "}"]
    return "\n".join(lines) + "\n"
