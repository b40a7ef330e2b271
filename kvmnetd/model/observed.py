"""Observed state: a mirror of the system, updated only from adapter events and dumps."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from kvmnetd.model.guard import GuardElement

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
RTPROT_RA = 9  # a route the kernel (or a daemon) learned from a router advertisement


@dataclass(frozen=True)
class Vxlan:
    """A VXLAN device's identity: what cannot change without making it anew."""

    vni: int
    local: str | None  # the source (VTEP) address
    port: int
    learning: bool


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None  # "bridge", "tun", "veth"; None for a physical NIC
    master: int | None = None  # ifindex of the bridge it is enslaved to
    up: bool = False
    mtu: int = 1500
    mac: str = ""
    stp: bool | None = None  # bridges only
    forward_delay: int | None = None  # bridges only, whole seconds
    tun_owner: int | None = None  # taps only: uid allowed to use it (-1/None: any)
    tun_group: int | None = None
    isolated: bool | None = None  # bridge ports only: bridge port isolation
    neigh_suppress: bool | None = None  # bridge ports only: ARP/ND answered by the bridge
    vxlan: Vxlan | None = None  # vxlan devices only
    arp_accept: bool | None = None  # bridges only: gratuitous ARP creates neighbours
    addrgenmode: int | None = None  # bridges, vxlan: IPv6 link-local generation (1: none)


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    oif: int | None = None
    gateway: str | None = None
    table: int = 254  # main
    proto: int = 0
    scope: int = 0
    priority: int | None = None


@dataclass(frozen=True)
class RateSeen:
    """A port's rate limit as found (model/rate.py), bytes/s; None: no limit that way.

    egress: the tbf on the port (towards the guest); ingress: the tbf on the port's ifb,
    counted only while the port has the ingress qdisc that redirects there.
    """

    egress: int | None = None
    ingress: int | None = None


@dataclass
class ObservedState:
    links: dict[int, Link] = field(default_factory=dict)
    addresses: dict[int, set[IPInterface]] = field(default_factory=dict)
    routes: set[Route] = field(default_factory=set)
    # family (4 or 6) -> forwarding enabled
    forwarding: dict[int, bool] = field(default_factory=dict)
    # device -> net.ipv6.conf.DEV.accept_ra, read for devices with an RA-learned default route
    accept_ra: dict[str, int] = field(default_factory=dict)
    # Fingerprint of our nftables table as found (None: absent or not observed).
    firewall: str | None = None
    # port ifname -> its rate limit as found (only ports with a tbf or an ingress qdisc)
    port_rates: dict[str, RateSeen] = field(default_factory=dict)
    # vxlan ifindex -> its fdb entries as (MAC, remote VTEP or None): the flood list
    # (all-zero MAC) and the MACs learned or installed behind it, own and the bridge's.
    fdb: dict[int, set[tuple[str, str | None]]] = field(default_factory=dict)
    # ifindex -> IPv4 address -> MAC, from ARP entries that resolved: on a bridge, who
    # holds which address (fed to DHCP as known hosts on an overlay network); on the
    # underlay, which peers answer.
    neighbours: dict[int, dict[str, str]] = field(default_factory=dict)
    # Our anti-spoofing bridge table: its fingerprint as found ("tampered", None: absent
    # or not observed) and the set elements it holds, as last applied.
    guard: str | None = None
    guard_elements: frozenset[GuardElement] = frozenset()
    # name -> index, kept by whoever fills `links` (the netlink mirror); empty: scan.
    by_name: dict[str, int] = field(default_factory=dict)

    def link(self, name: str) -> Link | None:
        if self.by_name:
            index = self.by_name.get(name)
            link = self.links.get(index) if index is not None else None
            return link if link is not None and link.name == name else None
        for link in self.links.values():
            if link.name == name:
                return link
        return None

    def name_of(self, index: int | None) -> str | None:
        link = self.links.get(index) if index is not None else None
        return link.name if link else None

    def addresses_of(self, name: str) -> set[IPInterface]:
        link = self.link(name)
        return set(self.addresses.get(link.index, set())) if link else set()

    def ra_default_devices(self) -> list[str]:
        """Devices whose IPv6 default route came from a router advertisement."""
        return sorted({name for r in self.routes
                       if r.dst.version == 6 and r.dst.prefixlen == 0 and r.proto == RTPROT_RA
                       and (name := self.name_of(r.oif)) is not None})

    def fdb_of(self, name: str) -> set[tuple[str, str | None]]:
        link = self.link(name)
        return set(self.fdb.get(link.index, set())) if link else set()

    def neighbours_of(self, name: str) -> dict[str, str]:
        link = self.link(name)
        return dict(self.neighbours.get(link.index, {})) if link else {}

    def routes_via(self, name: str) -> set[Route]:
        link = self.link(name)
        if link is None:
            return set()
        return {r for r in self.routes if r.oif == link.index}
