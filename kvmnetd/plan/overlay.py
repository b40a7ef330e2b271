"""An overlay network's part of the plan: its VXLAN device, flood list and anycast gateway.

Pure, like the rest of the planner. In static mode the flood list is one all-zero fdb
entry per peer of [daemon.overlay]; in evpn mode FRR builds it, so none is touched here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from kvmnetd.model import actions as A
from kvmnetd.model.desired import DhcpHost, Network
from kvmnetd.model.observed import Link, ObservedState
from kvmnetd.model.overlay import HostOverlay, NetworkOverlay, split_range

ZERO_MAC = "00:00:00:00:00:00"
ADDRGENMODE_NONE = 1


def bridge_actions(net: Network, br: Link | None) -> list[A.Action]:
    """The anycast gateway's needs on the bridge, before it goes up: its MAC is set at
    creation (CreateBridge.mac); here the neighbour settings, and the MAC of one adopted."""
    ov = net.overlay
    if ov is None:
        return []
    acts: list[A.Action] = []
    if br is not None and br.mac and br.mac != ov.mac:
        acts.append(A.SetMac(net.name, net.bridge, ov.mac))
    if br is None or br.arp_accept is not True or br.addrgenmode != ADDRGENMODE_NONE:
        acts.append(A.SetBridgeNeighbours(net.name, net.bridge))
    return acts


def vxlan_actions(net: Network, host: HostOverlay, observed: ObservedState
                  ) -> tuple[list[A.Action], str | None]:
    """(actions, problem) for the network's VXLAN device and, in static mode, its flood list."""
    ov = net.overlay
    assert ov is not None
    name = ov.vxlan
    vx = observed.link(name)
    br = observed.link(net.bridge)
    acts: list[A.Action] = []
    if vx is not None and vx.kind != "vxlan":
        return [], (f"{name} exists and is a {vx.kind or 'physical'} device, not a VXLAN "
                    "device; remove it")
    if vx is not None and not _same_identity(vx, ov, host):
        # VNI, local address and port cannot be changed on a live device: make it anew.
        acts.append(A.DeleteVxlan(net.name, name))
        vx = None
    if vx is None:
        acts += [A.CreateVxlan(net.name, name, ov.vni, str(host.local), host.dstport, net.mtu),
                 A.SetLinkLocalOff(net.name, name),
                 A.AttachVxlan(net.name, name, net.bridge),
                 A.SetNeighSuppress(net.name, name, True),
                 A.SetUp(net.name, name)]
        flood: set[str] = set()
    else:
        if net.mtu is not None and vx.mtu != net.mtu:
            acts.append(A.SetMtu(net.name, name, net.mtu))
        if br is None or vx.master != br.index:
            acts.append(A.AttachVxlan(net.name, name, net.bridge))
        if vx.neigh_suppress is not True or br is None or vx.master != br.index:
            acts.append(A.SetNeighSuppress(net.name, name, True))
        if vx.addrgenmode != ADDRGENMODE_NONE:
            acts.append(A.SetLinkLocalOff(net.name, name))
        if not vx.up:
            acts.append(A.SetUp(net.name, name))
        flood = {dst for mac, dst in observed.fdb.get(vx.index, set())
                 if mac == ZERO_MAC and dst is not None}
    if ov.mode == "static":
        want = {str(p) for p in host.peers}
        acts += [A.AddFlood(net.name, name, dst) for dst in sorted(want - flood)]
        acts += [A.RemoveFlood(net.name, name, dst) for dst in sorted(flood - want)]
    return acts, None


def _same_identity(vx: Link, ov: NetworkOverlay, host: HostOverlay) -> bool:
    info = vx.vxlan
    return (info is not None and info.vni == ov.vni and info.local == str(host.local)
            and info.port == host.dstport and not info.learning)


def teardown(wanted: set[str], owned_vxlans: dict[str, str],
             observed: ObservedState) -> list[A.Action]:
    """Our VXLAN devices that no active network wants any more."""
    acts: list[A.Action] = []
    for name, network in sorted(owned_vxlans.items()):
        if name in wanted:
            continue
        # Deleted (or gone already: the action then only drops it from the record).
        acts.append(A.DeleteVxlan(network or None, name))
    return acts


def overlay_problem(net: Network, host: HostOverlay | None) -> str | None:
    """Why an overlay network cannot be built on this host (the config checks the rest)."""
    if net.overlay is not None and host is None:
        return "an overlay network needs [daemon.overlay]"
    return None


def wanted_vxlans(active: list[Network]) -> set[str]:
    return {n.overlay.vxlan for n in active if n.overlay is not None}


def own_share(net: Network) -> list[tuple[int, int]]:
    """This host's slices of the network's IPv4 ranges, as integer spans."""
    if net.dhcp is None or net.overlay is None:
        return []
    out = []
    for r in net.dhcp.ranges:
        if r.start.version == 4:
            part = split_range(int(r.start), int(r.end), *net.overlay.share)
            if part is not None:
                out.append(part)
    return out


def with_known_hosts(net: Network, observed: ObservedState) -> Network:
    """The network as its dnsmasq should serve it: with every guest the bridge has seen
    holding an address outside this host's slice (a guest that moved here, announced by
    its gratuitous ARP) as a known host, so its renewal is acknowledged, not refused."""
    if net.overlay is None or net.dhcp is None or net.ipv4 is None:
        return net
    seen = observed.neighbours_of(net.bridge)
    if not seen:
        return net
    mine = own_share(net)
    ips = {h.ip for h in net.dhcp.hosts}
    macs = {h.mac for h in net.dhcp.hosts} | {net.overlay.mac}
    extra: list[DhcpHost] = []
    for ip_s, mac in sorted(seen.items()):
        ip = ipaddress.IPv4Address(ip_s)
        n = int(ip)
        if (ip == net.ipv4.ip or ip not in net.ipv4.network or ip in ips or mac in macs
                or any(lo <= n <= hi for lo, hi in mine)):
            continue
        extra.append(DhcpHost(mac=mac, ip=ip))
        macs.add(mac)
    if not extra:
        return net
    return replace(net, dhcp=replace(net.dhcp, hosts=net.dhcp.hosts + tuple(extra)))
