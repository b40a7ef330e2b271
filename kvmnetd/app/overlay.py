"""What `status`, `network show` and `doctor` say about overlay networks. Pure: it reads
the desired and the observed state only."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from kvmnetd.app.doctor import Finding
from kvmnetd.model.desired import Network
from kvmnetd.model.observed import Link, ObservedState
from kvmnetd.model.overlay import VXLAN_OVERHEAD, HostOverlay

ZERO_MAC = "00:00:00:00:00:00"


def underlay_link(host: HostOverlay, obs: ObservedState) -> Link | None:
    """The device that carries this host's VTEP address (local)."""
    for index, addrs in obs.addresses.items():
        if any(a.ip == host.local for a in addrs):
            return obs.links.get(index)
    return None


def _route_to(peer: ipaddress.IPv4Address, obs: ObservedState) -> bool:
    return any(r.dst.version == 4 and peer in r.dst for r in obs.routes)


def _next_hop(peer: ipaddress.IPv4Address, obs: ObservedState) -> str:
    """The address ARP resolves for the peer: itself on a connected subnet, else the
    gateway of the longest matching route."""
    hits = [r for r in obs.routes if r.dst.version == 4 and peer in r.dst]
    if not hits:
        return str(peer)
    best = max(hits, key=lambda r: r.dst.prefixlen)
    return best.gateway or str(peer)


def _answers(peer: ipaddress.IPv4Address, under: Link | None, obs: ObservedState) -> bool:
    """Has the underlay resolved the peer (or its next hop) by ARP?"""
    if under is None:
        return False
    return _next_hop(peer, obs) in obs.neighbours.get(under.index, {})


def overlay_status(net: Network, host: HostOverlay | None,
                   obs: ObservedState) -> dict[str, Any] | None:
    """The overlay part of a network's status; None for a network on this host only."""
    ov = net.overlay
    if ov is None:
        return None
    vx = obs.link(ov.vxlan)
    entries = obs.fdb.get(vx.index, set()) if vx is not None else set()
    flood: set[str | None] = {dst for mac, dst in entries if mac == ZERO_MAC and dst}
    own = vx.mac if vx is not None else ""
    remote = sorted({mac for mac, _ in entries if mac not in (ZERO_MAC, own)})
    under = underlay_link(host, obs) if host is not None else None
    out: dict[str, Any] = {
        "vni": ov.vni, "mode": ov.mode, "device": ov.vxlan,
        "device_state": "missing" if vx is None else "up" if vx.up else "down",
        "gateway_mac": ov.mac, "mtu": net.mtu,
        "local": str(host.local) if host else None,
        "underlay": under.name if under else None,
        "underlay_mtu": under.mtu if under else None,
        "dhcp_share": list(ov.share),
        "remote_macs": remote,
        "problems": [f.message for f in overlay_findings([net], host, obs)],
    }
    if host is not None and ov.mode == "static":
        out["peers"] = [{"address": str(p), "state": _peer_state(p, flood, under, obs)}
                        for p in host.peers]
    return out


def _peer_state(peer: ipaddress.IPv4Address, flood: set[str | None], under: Link | None,
                obs: ObservedState) -> str:
    if str(peer) not in flood:
        return "no flood entry"
    if not _route_to(peer, obs):
        return "no route"
    return "answering" if _answers(peer, under, obs) else "not answering"


def overlay_findings(nets: Iterable[Network], host: HostOverlay | None,
                     obs: ObservedState) -> list[Finding]:
    out: list[Finding] = []
    for net in nets:
        ov = net.overlay
        if ov is None or host is None:
            continue
        under = underlay_link(host, obs)
        if under is None:
            out.append(Finding(
                check="overlay-local-missing", severity="error", network=net.name,
                subject=str(host.local),
                message=(f"no device carries this host's underlay address {host.local} "
                         "([daemon.overlay] local): VXLAN packets cannot leave"),
                fix=f"add {host.local} to the underlay NIC, or correct local"))
        elif net.mtu is not None and under.mtu < net.mtu + VXLAN_OVERHEAD:
            out.append(Finding(
                check="overlay-mtu", severity="error", network=net.name, subject=under.name,
                message=(f"the underlay device {under.name} has MTU {under.mtu}, but guests "
                         f"on {net.name} use {net.mtu} and VXLAN adds {VXLAN_OVERHEAD}: "
                         f"frames over {under.mtu - VXLAN_OVERHEAD} bytes between hosts are "
                         "dropped without an error"),
                fix=(f"raise {under.name}'s MTU (and the switches') to at least "
                     f"{net.mtu + VXLAN_OVERHEAD}, or set underlay_mtu = {under.mtu} in "
                     "[daemon.overlay] so guests get "
                     f"{under.mtu - VXLAN_OVERHEAD}")))
        vx = obs.link(ov.vxlan)
        if vx is None:
            out.append(Finding(
                check="overlay-device-missing", severity="error", network=net.name,
                subject=ov.vxlan,
                message=f"the VXLAN device {ov.vxlan} of {net.name} is missing",
                fix="kvmnetd makes it again; see the network's state for why it cannot"))
            continue
        if ov.mode != "static":
            continue
        flood = {dst for mac, dst in obs.fdb.get(vx.index, set()) if mac == ZERO_MAC}
        for peer in host.peers:
            if str(peer) not in flood:
                out.append(Finding(
                    check="overlay-peer-missing", severity="error", network=net.name,
                    subject=str(peer),
                    message=(f"peer {peer} has no flood entry on {ov.vxlan}: broadcasts "
                             "(ARP, DHCP) of guests there do not reach this host's guests"),
                    fix="kvmnetd adds it again; see the network's state for why it cannot"))
            elif not _route_to(peer, obs):
                out.append(Finding(
                    check="overlay-peer-unroutable", severity="error", network=net.name,
                    subject=str(peer),
                    message=f"no route to peer {peer}: its guests are unreachable",
                    fix=f"route the underlay to {peer}, or remove it from peers"))
            elif not _answers(peer, under, obs):
                hop = _next_hop(peer, obs)
                via = "" if hop == str(peer) else f" (via {hop})"
                out.append(Finding(
                    check="overlay-peer-silent", severity="warning", network=net.name,
                    subject=str(peer),
                    message=(f"peer {peer}{via} does not answer ARP on the underlay"
                             f"{' ' + under.name if under else ''}: the host is down, "
                             "unplugged or not configured with this address; its guests "
                             "are unreachable"),
                    fix=(f"check that {peer} is up and has local = \"{peer}\" in its "
                         "[daemon.overlay]; remove it from peers if it left for good")))
        extra = sorted(d for d in flood - {str(p) for p in host.peers} if d is not None)
        for dst in extra:
            out.append(Finding(
                check="overlay-peer-unknown", severity="warning", network=net.name,
                subject=str(dst),
                message=f"{ov.vxlan} floods to {dst}, which is not among the peers",
                fix="kvmnetd removes it; a reload applies a changed peers list"))
    return out
