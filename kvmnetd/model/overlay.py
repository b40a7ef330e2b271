"""One network across hosts: the host's overlay settings and a network's VNI. Plain data."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

IPv4Address = ipaddress.IPv4Address

# Outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8): what every guest frame pays
# on the underlay.
VXLAN_OVERHEAD = 50
VXLAN_PORT = 4789  # IANA
MAX_VNI = 2**24 - 1

OverlayMode = Literal["static", "evpn"]
OVERLAY_MODES: tuple[OverlayMode, ...] = ("static", "evpn")


@dataclass(frozen=True)
class HostOverlay:
    """[daemon.overlay]: this host's place in the fabric."""

    local: IPv4Address  # this host's VTEP (underlay) address
    peers: tuple[IPv4Address, ...] = ()  # static mode: the other hosts
    asn: int | None = None  # evpn mode
    neighbors: tuple[IPv4Address, ...] = ()  # evpn mode: BGP neighbours or route reflectors
    frr_pathspace: str = ""  # "" = the host's FRR; "h1" = vtysh/zebra/bgpd -N h1
    bfd: bool = False
    dstport: int = VXLAN_PORT
    # The MTU of the underlay path between hosts; guests get this minus VXLAN_OVERHEAD.
    underlay_mtu: int = 1500

    @property
    def guest_mtu(self) -> int:
        return self.underlay_mtu - VXLAN_OVERHEAD

    def fabric(self, mode: OverlayMode) -> tuple[IPv4Address, ...]:
        """Every host of the fabric for `mode`, this one included, in one order all agree on."""
        others = self.peers if mode == "static" else self.neighbors
        return tuple(sorted({self.local, *others}))

    def position(self, mode: OverlayMode) -> tuple[int, int]:
        """(this host's index, number of hosts) in fabric(mode)."""
        hosts = self.fabric(mode)
        return hosts.index(self.local), len(hosts)


@dataclass(frozen=True)
class NetworkOverlay:
    """[network.NAME.overlay]: the network is one L2 segment across hosts."""

    vni: int
    mode: OverlayMode
    # The gateway's MAC, the same on every host (anycast); None: derived from the VNI.
    gateway_mac: str | None = None
    # This host's share of the DHCP ranges: "auto" splits them by the host's position
    # in the sorted fabric, "all" keeps them whole (the ranges are then this host's own).
    dhcp_split: Literal["auto", "all"] = "auto"
    # (this host's index, number of hosts) for the split, filled in from [daemon.overlay]
    # when the config is read; (0, 1): the ranges whole.
    share: tuple[int, int] = (0, 1)

    @property
    def vxlan(self) -> str:
        """The VXLAN device's name."""
        return vxlan_name(self.vni)

    @property
    def mac(self) -> str:
        return self.gateway_mac or anycast_mac(self.vni)


def vxlan_name(vni: int) -> str:
    return f"kvx{vni}"


def anycast_mac(vni: int) -> str:
    """A locally administered unicast MAC from the VNI alone: every host derives the same
    one without talking, and two overlay networks never share it."""
    return "02:6b:76:" + ":".join(f"{(vni >> s) & 0xFF:02x}" for s in (16, 8, 0))


def split_range(first: int, last: int, index: int, count: int) -> tuple[int, int] | None:
    """Host `index` of `count`'s contiguous share of [first, last] (integers), or None
    when the range has fewer addresses than hosts."""
    size = last - first + 1
    share = size // count
    if share == 0:
        return None
    lo = first + index * share
    hi = last if index == count - 1 else lo + share - 1
    return lo, hi

