"""[daemon.overlay] and [network.NAME.overlay]: reading them, and the checks across both."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal, cast

from kvmnetd.config.addresses import parse_ipv4
from kvmnetd.config.locate import FileCtx, Table, suggest
from kvmnetd.model.desired import Mode, Network, Settings
from kvmnetd.model.overlay import (
    MAX_VNI,
    OVERLAY_MODES,
    VXLAN_OVERHEAD,
    VXLAN_PORT,
    HostOverlay,
    NetworkOverlay,
    OverlayMode,
)

HOST_KEYS = ("local", "peers", "asn", "neighbors", "frr_pathspace", "bfd", "dstport",
             "underlay_mtu")
NETWORK_KEYS = ("vni", "mode", "gateway_mac", "dhcp_split")
PATHSPACE_RE = re.compile(r"[A-Za-z0-9_-]{0,32}")
MAX_ASN = 2**32 - 1
# The smallest underlay that leaves IPv4's own minimum (68) to the guests.
MIN_UNDERLAY_MTU = 68 + VXLAN_OVERHEAD
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _choice(*choices: str) -> Callable[[str], str]:
    def check(s: str) -> str:
        if s not in choices:
            raise ValueError(f"{s!r} is not one of {', '.join(choices)}{suggest(s, choices)}")
        return s

    return check


def _vtep(s: str) -> ipaddress.IPv4Address:
    ip = parse_ipv4(s)
    if ip.is_multicast or ip.is_loopback or ip.is_unspecified or ip.is_reserved:
        raise ValueError(f"{s!r} is not a usable unicast address")
    return ip


def _pathspace(s: str) -> str:
    if not PATHSPACE_RE.fullmatch(s):
        raise ValueError(f"pathspace {s!r} must be 0 to 32 of A-Z a-z 0-9 _ -")
    return s


def _addresses(t: Table, key: str, local: ipaddress.IPv4Address | None,
               ) -> tuple[ipaddress.IPv4Address, ...]:
    out = t.texts(key, _vtep)
    seen: set[ipaddress.IPv4Address] = set()
    for i, ip in enumerate(out):
        if ip == local:
            t.error((key, i), f"{ip} is this host's own address (local)")
        elif ip in seen:
            t.error((key, i), f"{ip} is listed twice")
        seen.add(ip)
    return tuple(ip for ip in out if ip != local)


def read_host_overlay(ctx: FileCtx, data: dict[str, Any]) -> HostOverlay:
    """[daemon.overlay]. Issues go to ctx (and fail the load); the networks are still
    checked against what could be read."""
    t = Table(ctx, ("daemon", "overlay"), data, HOST_KEYS)
    local = t.text("local", _vtep, None)
    if not t.has("local"):
        t.error((), 'local is required: this host\'s underlay address, e.g. local = "192.0.2.11"')
    asn = t.number("asn", 0, 1, MAX_ASN) if t.has("asn") else None
    return HostOverlay(
        local=local or ipaddress.IPv4Address(0),
        peers=_addresses(t, "peers", local),
        asn=asn,
        neighbors=_addresses(t, "neighbors", local),
        frr_pathspace=t.text("frr_pathspace", _pathspace, ""),
        bfd=t.flag("bfd", False),
        dstport=t.number("dstport", VXLAN_PORT, 1, 65535),
        underlay_mtu=t.number("underlay_mtu", 1500, MIN_UNDERLAY_MTU, 65535),
    )


def read_network_overlay(net: Table) -> NetworkOverlay | None:
    """[network.NAME.overlay]; None when absent or when it has issues."""
    sub = net.table("overlay")
    if sub is None:
        return None
    t = Table(net.ctx, (*net.path, "overlay"), sub, NETWORK_KEYS)
    before = len(net.ctx.issues)
    if not t.has("vni"):
        t.error((), f"vni is required: the network's VXLAN id, 1..{MAX_VNI}, the same on "
                    "every host")
    if not t.has("mode"):
        t.error((), 'mode is required: "static" (peers listed in [daemon.overlay]) or '
                    '"evpn" (BGP EVPN through FRR)')
    vni = t.number("vni", 0, 1, MAX_VNI)
    mode = cast(OverlayMode, t.text("mode", _choice(*OVERLAY_MODES), "static"))
    mac = t.text("gateway_mac", _gateway_mac, None)
    split = cast(Literal["auto", "all"], t.text("dhcp_split", _choice("auto", "all"), "auto"))
    if len(net.ctx.issues) != before:
        return None
    return NetworkOverlay(vni=vni, mode=mode, gateway_mac=mac,
                          dhcp_split=split)


def _gateway_mac(s: str) -> str:
    mac = s.lower().replace("-", ":")
    if not MAC_RE.fullmatch(mac):
        raise ValueError(f"{s!r} is not a MAC address (six hex octets like 02:00:00:00:00:01)")
    first = int(mac[:2], 16)
    if first & 1:
        raise ValueError(f"{s!r} is a multicast MAC; the gateway needs a unicast one")
    if mac == "00:00:00:00:00:00":
        raise ValueError("the gateway MAC may not be all zeros")
    return mac


def check_overlays(decls: Sequence[tuple[Network, FileCtx | None]],
                   settings: Settings) -> dict[str, Network]:
    """Checks between networks' overlays and the host's; returns the overlay networks with
    what follows from the host filled in: the MTU from the underlay where the file left it
    unset, and this host's share of the DHCP ranges."""
    host = settings.overlay
    vnis: dict[int, Network] = {}
    filled: dict[str, Network] = {}
    for net, ctx in decls:
        ov = net.overlay
        if ov is None:
            continue
        if ctx is None:  # an existing network, checked when it was loaded
            vnis.setdefault(ov.vni, net)
            continue
        path = ("network", net.name, "overlay")

        def err(key: str | None, msg: str, path: tuple[str, ...] = path,
                ctx: FileCtx = ctx) -> None:
            ctx.error(path if key is None else (*path, key), msg)

        if ov.vni in vnis:
            other = vnis[ov.vni]
            src = f" ({other.source.file}:{other.source.line})" if other.source else ""
            err("vni", f"VNI {ov.vni} is already used by network {other.name!r}{src}")
        else:
            vnis[ov.vni] = net
        if net.mode == Mode.BRIDGED:
            err(None, "a bridged network is already on a physical LAN; stretch it with the "
                      "LAN's own switches, or use mode = nat, isolated or routed")
        if host is None:
            err(None, "an overlay network needs [daemon.overlay] in the main configuration "
                      "file (local, and peers or asn + neighbors)")
            continue
        if ov.mode == "static" and not host.peers:
            err("mode", 'static mode needs peers in [daemon.overlay]: the other hosts\' '
                        'underlay addresses')
        if ov.mode == "evpn" and (host.asn is None or not host.neighbors):
            err("mode", "evpn mode needs asn and neighbors in [daemon.overlay]")
        if net.mtu is not None and net.mtu > host.guest_mtu:
            ctx.error(("network", net.name, "mtu"),
                      f"MTU {net.mtu} does not fit the underlay: VXLAN adds "
                      f"{VXLAN_OVERHEAD} bytes and underlay_mtu is {host.underlay_mtu}; use at "
                      f"most {host.guest_mtu} or raise underlay_mtu")
        if net.mtu is None and net.ipv6 is not None and host.guest_mtu < 1280:
            err(None, f"IPv6 needs an MTU of at least 1280; underlay_mtu {host.underlay_mtu} "
                      f"leaves the guests {host.guest_mtu} after VXLAN's {VXLAN_OVERHEAD} bytes")
        share = host.position(ov.mode) if ov.dhcp_split == "auto" else (0, 1)
        filled[net.name] = replace(net, mtu=net.mtu or host.guest_mtu,
                                   overlay=replace(ov, share=share))
    return filled

