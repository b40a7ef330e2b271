"""The planner's overlay part: VXLAN device, flood list, anycast gateway, DHCP known hosts."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

from kvmnetd.adapters.rtnl.decode import (
    IFINFOMSG,
    IFLA_ADDRESS,
    IFLA_IFNAME,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    IFLA_VXLAN_ID,
    IFLA_VXLAN_LEARNING,
    IFLA_VXLAN_LOCAL,
    IFLA_VXLAN_PORT,
    NDA_DST,
    NDA_LLADDR,
    NDMSG,
    NUD_FAILED,
    NUD_PERMANENT,
    NUD_REACHABLE,
    RTM_DELNEIGH,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    FdbRec,
    LinkRec,
    NeighRec,
    decode,
)
from kvmnetd.adapters.rtnl.mirror import Mirror
from kvmnetd.adapters.rtnl.requests import attr, attr_str, attr_u32
from kvmnetd.model import actions as A
from kvmnetd.model.desired import DesiredState, Dhcp, DhcpRange, Mode, Network
from kvmnetd.model.observed import Link, ObservedState, Vxlan
from kvmnetd.model.overlay import HostOverlay, NetworkOverlay
from kvmnetd.model.owned import Owned
from kvmnetd.plan.nft import render_ruleset
from kvmnetd.plan.overlay import with_known_hosts
from kvmnetd.plan.planner import plan
from tests.support.core import make_core

IP = ipaddress.IPv4Address
HOST = HostOverlay(local=IP("192.0.2.11"), peers=(IP("192.0.2.12"), IP("192.0.2.13")))
OV = NetworkOverlay(vni=100, mode="static", share=(0, 3))
NET = Network(name="ov", mode=Mode.NAT, bridge="kvov",
              ipv4=ipaddress.IPv4Interface("10.60.0.1/24"), mtu=1450, overlay=OV,
              dhcp=Dhcp(ranges=(DhcpRange(IP("10.60.0.10"), IP("10.60.0.249")),)))
MAC = "02:6b:76:00:00:64"
ZERO = "00:00:00:00:00:00"


def desired(net: Network = NET, host: HostOverlay | None = HOST) -> DesiredState:
    return DesiredState(networks={net.name: net}, active=frozenset({net.name}), overlay=host)


def names(actions: list[A.Action]) -> list[str]:
    return [A.describe(a) for a in actions]


def converged(flood: tuple[str, ...] = ("192.0.2.12", "192.0.2.13")) -> ObservedState:
    br = Link(index=5, name="kvov", kind="bridge", up=True, mtu=1450, mac=MAC, stp=False,
              forward_delay=0, arp_accept=True, addrgenmode=1)
    vx = Link(index=6, name="kvx100", kind="vxlan", master=5, up=True, mtu=1450,
              mac="aa:00:00:00:00:01", neigh_suppress=True, addrgenmode=1,
              vxlan=Vxlan(100, "192.0.2.11", 4789, False))
    obs = ObservedState(links={5: br, 6: vx},
                        addresses={5: {ipaddress.IPv4Interface("10.60.0.1/24")}},
                        fdb={6: {(ZERO, d) for d in flood}}, forwarding={4: True})
    return obs


def overlay_actions(obs: ObservedState, d: DesiredState | None = None) -> list[str]:
    p = plan(d or desired(), obs, Owned(bridges={"kvov": "ov"}, created={"kvov"},
                                        vxlans={"kvx100": "ov"}))
    return [n for n in names(p.actions) if "Firewall" not in n]


def test_a_new_overlay_network_in_order() -> None:
    p = plan(desired(), ObservedState(forwarding={4: True}), Owned())
    got = [n for n in names(p.actions) if "Firewall" not in n]
    assert got == [
        f"CreateBridge(bridge=kvov, mtu=1450, mac={MAC})",
        "SetMtu(ifname=kvov, mtu=1450)",
        "SetBridgeNeighbours(bridge=kvov)",
        "AddAddress(ifname=kvov, address=10.60.0.1/24)",
        "SetUp(ifname=kvov)",
        "CreateVxlan(ifname=kvx100, vni=100, local=192.0.2.11, port=4789, mtu=1450)",
        "SetLinkLocalOff(ifname=kvx100)",
        "AttachVxlan(ifname=kvx100, bridge=kvov)",
        "SetNeighSuppress(ifname=kvx100, on=True)",
        "SetUp(ifname=kvx100)",
        "AddFlood(ifname=kvx100, dst=192.0.2.12)",
        "AddFlood(ifname=kvx100, dst=192.0.2.13)",
    ]


def test_converged_overlay_plans_nothing() -> None:
    assert overlay_actions(converged()) == []


def test_flood_list_follows_the_peers() -> None:
    obs = converged(flood=("192.0.2.13", "192.0.2.99"))
    assert overlay_actions(obs) == ["AddFlood(ifname=kvx100, dst=192.0.2.12)",
                                    "RemoveFlood(ifname=kvx100, dst=192.0.2.99)"]


def test_evpn_mode_leaves_the_flood_list_to_frr() -> None:
    net = Network(**{**vars(NET), "overlay": NetworkOverlay(vni=100, mode="evpn")})
    host = HostOverlay(local=IP("192.0.2.11"), asn=65000, neighbors=(IP("192.0.2.12"),))
    obs = converged(flood=("192.0.2.12", "192.0.2.77"))
    assert overlay_actions(obs, desired(net, host)) == []


def test_changed_identity_makes_the_device_anew() -> None:
    obs = converged()
    vx = obs.links[6]
    obs.links[6] = Link(**{**vars(vx), "vxlan": Vxlan(100, "192.0.2.99", 4789, False)})
    got = overlay_actions(obs)
    assert got[0] == "DeleteVxlan(ifname=kvx100)"
    assert got[1].startswith("CreateVxlan(ifname=kvx100, vni=100, local=192.0.2.11")


def test_healing_suppression_mac_and_bridge_settings() -> None:
    obs = converged()
    obs.links[6] = Link(**{**vars(obs.links[6]), "neigh_suppress": False})
    obs.links[5] = Link(**{**vars(obs.links[5]), "arp_accept": False, "mac": "aa:bb:cc:00:00:01"})
    assert overlay_actions(obs) == [f"SetMac(ifname=kvov, mac={MAC})",
                                    "SetBridgeNeighbours(bridge=kvov)",
                                    "SetNeighSuppress(ifname=kvx100, on=True)"]


def test_a_foreign_device_of_that_name_fails_the_network() -> None:
    obs = converged()
    obs.links[6] = Link(index=6, name="kvx100", kind="veth")
    p = plan(desired(), obs, Owned(bridges={"kvov": "ov"}, created={"kvov"}))
    assert "not a VXLAN device" in p.problems["ov"]
    assert not [a for a in p.actions if isinstance(a, A.CreateVxlan | A.DeleteVxlan)]


def test_network_without_overlay_loses_its_vxlan_device() -> None:
    plain = Network(**{**vars(NET), "overlay": None})
    got = overlay_actions(converged(), desired(plain))
    assert "DeleteVxlan(ifname=kvx100)" in got


def test_dhcp_is_split_and_kept_off_the_vxlan_port() -> None:
    from kvmnetd.model.desired import Settings
    from kvmnetd.plan.dnsmasq import dnsmasq_paths, render_config

    conf = render_config(NET, dnsmasq_paths(Settings(), "ov"))
    assert "dhcp-range=10.60.0.10,10.60.0.89,255.255.255.0,1h" in conf
    assert "dhcp-option=option:mtu,1450" in conf
    rules = render_ruleset([NET])
    assert "table bridge kvmnetd_ov {" in rules
    assert 'oifname "kvx100" udp dport 67-68 drop' in rules
    assert 'iifname "kvx100" udp dport 67-68 drop' in rules


def test_guests_seen_outside_this_hosts_slice_become_known_hosts() -> None:
    obs = converged()
    obs.neighbours[5] = {"10.60.0.150": "52:54:00:00:00:02",  # another host's slice
                         "10.60.0.20": "52:54:00:00:00:03",  # ours: dnsmasq knows it
                         "10.60.0.1": MAC}
    net = with_known_hosts(NET, obs)
    assert net.dhcp is not None
    assert [(h.mac, str(h.ip)) for h in net.dhcp.hosts] == [("52:54:00:00:00:02",
                                                              "10.60.0.150")]
    assert with_known_hosts(NET, converged()) is NET


# ---- decoding and mirroring --------------------------------------------------------


def test_vxlan_link_and_its_fdb_are_decoded_and_mirrored() -> None:
    data = (attr_u32(IFLA_VXLAN_ID, 100) + attr(IFLA_VXLAN_LOCAL, IP("192.0.2.11").packed)
            + attr(IFLA_VXLAN_LEARNING, b"\0") + attr(IFLA_VXLAN_PORT, struct.pack(">H", 4789)))
    body = (IFINFOMSG.pack(0, 0, 6, 1, 0) + attr_str(IFLA_IFNAME, "kvx100")
            + attr(IFLA_ADDRESS, bytes(6))
            + attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "vxlan") + attr(IFLA_INFO_DATA, data)))
    rec = decode(RTM_NEWLINK, 0, body, 0, len(body))
    assert isinstance(rec, LinkRec) and rec.link.vxlan == Vxlan(100, "192.0.2.11", 4789, False)
    fdb = (NDMSG.pack(socket.AF_BRIDGE, 6, NUD_PERMANENT, 2, 0) + attr(NDA_LLADDR, bytes(6))
           + attr(NDA_DST, IP("192.0.2.12").packed))
    frec = decode(RTM_NEWNEIGH, 0, fdb, 0, len(fdb))
    assert frec == FdbRec(True, 6, ZERO, "192.0.2.12")
    obs = ObservedState()
    m = Mirror(obs)
    assert m.apply(rec) and m.apply(frec)
    assert obs.fdb_of("kvx100") == {(ZERO, "192.0.2.12")}
    gone = decode(RTM_DELNEIGH, 0, fdb, 0, len(fdb))
    assert m.apply(gone)  # type: ignore[arg-type]
    assert obs.fdb_of("kvx100") == set()


def test_arp_entries_on_bridges_change_the_plan_and_others_only_the_mirror() -> None:
    obs = ObservedState()
    m = Mirror(obs)
    m.apply(LinkRec(True, Link(index=5, name="kvov", kind="bridge")))
    m.apply(LinkRec(True, Link(index=2, name="ul0", kind="veth")))

    def neigh(index: int, ip: str, mac: bytes | None, state: int, new: bool = True) -> NeighRec:
        body = NDMSG.pack(socket.AF_INET, index, state, 0, 0) + attr(NDA_DST, IP(ip).packed)
        if mac is not None:
            body += attr(NDA_LLADDR, mac)
        rec = decode(RTM_NEWNEIGH if new else RTM_DELNEIGH, 0, body, 0, len(body))
        assert isinstance(rec, NeighRec)
        return rec

    guest = bytes.fromhex("525400000002")
    assert m.apply(neigh(5, "10.60.0.150", guest, NUD_REACHABLE))
    assert not m.apply(neigh(5, "10.60.0.150", guest, NUD_REACHABLE))  # no change
    assert not m.apply(neigh(2, "192.0.2.12", guest, NUD_REACHABLE))  # kept, no pass
    assert obs.neighbours[2] == {"192.0.2.12": "52:54:00:00:00:02"}
    assert not m.apply(neigh(2, "192.0.2.12", None, NUD_FAILED))
    assert obs.neighbours[2] == {}
    assert m.apply(neigh(5, "10.60.0.150", guest, NUD_REACHABLE, new=False))
    assert obs.neighbours_of("kvov") == {}


def test_an_unrecorded_vxlan_device_of_ours_is_taken_into_the_record() -> None:
    p = plan(desired(), converged(), Owned(bridges={"kvov": "ov"}, created={"kvov"}))
    assert p.adopt_vxlans == [("kvx100", "ov")]
    p = plan(desired(), converged(), Owned(bridges={"kvov": "ov"}, created={"kvov"},
                                           vxlans={"kvx100": "ov"}))
    assert p.adopt_vxlans == []


# ---- through the core and the loop, over the fakes -----------------------------------

CORE_CONFIG = ('[daemon.overlay]\nlocal = "192.0.2.11"\npeers = ["192.0.2.12", "192.0.2.13"]\n'
               '[network.ov]\nbridge = "kvov"\nipv4 = "10.60.0.1/24"\n[network.ov.dhcp]\n'
               '[network.ov.overlay]\nvni = 100\nmode = "static"\n')


async def test_core_builds_the_overlay_and_a_second_pass_writes_nothing(tmp_path: Path) -> None:
    rig = await make_core(tmp_path, CORE_CONFIG)
    obs = rig.netlink.observed
    assert obs.fdb_of("kvx100") == {(ZERO, "192.0.2.12"), (ZERO, "192.0.2.13")}
    assert rig.core.rec.owned.vxlans == {"kvx100": "ov"}
    ov = rig.core.describe()["networks"][0]["overlay"]
    assert ov["device"] == "kvx100" and ov["dhcp_share"] == [0, 3]
    assert [p["state"] for p in ov["peers"]] == ["no route", "no route"]
    writes = rig.netlink.writes
    await rig.core.apply({})
    assert rig.netlink.writes == writes
    # A peer dropped from the file loses its flood entry on reload.
    rig.write_config(CORE_CONFIG.replace(', "192.0.2.13"', ""))
    from kvmnetd.model.records import ROOT

    await rig.core.reload(ROOT)
    assert obs.fdb_of("kvx100") == {(ZERO, "192.0.2.12")}
