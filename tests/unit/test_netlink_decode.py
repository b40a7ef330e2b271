"""The rtnetlink decoder and the mirror, fed bytes captured from the kernel or built by hand."""

from __future__ import annotations

import ipaddress
import struct

from kvmnetd.adapters.rtnl import decode as nlp
from kvmnetd.adapters.rtnl.decode import (
    IFLA_BR_FORWARD_DELAY,
    IFLA_BR_STP_STATE,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
)
from kvmnetd.adapters.rtnl.mirror import Mirror
from kvmnetd.adapters.rtnl.requests import attr, attr_str, attr_u32
from kvmnetd.model.observed import Link, ObservedState, Route


def bridge_info(stp: bool, delay: int) -> bytes:
    data = attr_u32(IFLA_BR_FORWARD_DELAY, delay) + attr_u32(IFLA_BR_STP_STATE, int(stp))
    return attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "bridge") + attr(IFLA_INFO_DATA, data))

# Captured in a namespace: `ip addr add 192.0.2.1/24 dev v0` (ifindex 3) and the routes it and
# `ip route add 198.51.100.0/24 via 192.0.2.254 dev v0 metric 7` announced.
NEWADDR_V4 = bytes.fromhex(
    "4c0000001400000018f1066b9b320000021880000300000008000100c000020108000200c0000201"
    "0700030076300000080008008000000014000600ffffffffffffffffee430700ee430700")
ROUTE_LOCAL_TABLE = bytes.fromhex(
    "3c00000018000006000000000000000002200000ff02fe020000000008000f00ff00000008000100"
    "c000020108000700c00002010800040003000000")
ROUTE_CONNECTED = bytes.fromhex(
    "3c00000018000006000000000000000002180000fe02fd011000000008000f00fe00000008000100"
    "c000020008000700c00002010800040003000000")
ROUTE_STATIC = bytes.fromhex(
    "440000001800000618f1066b9c32000002180000fe0300011000000008000f00fe00000008000100"
    "c6336400080006000700000008000500c00002fe0800040003000000")


def message(kind: int, body: bytes, flags: int = 0, seq: int = 0) -> bytes:
    return nlp.NLMSGHDR.pack(16 + len(body), kind, flags, seq, 0) + body


def link_msg(kind: int = nlp.RTM_NEWLINK, family: int = 0, index: int = 5, flags: int = 0,
             attrs: bytes = b"") -> bytes:
    return message(kind, nlp.IFINFOMSG.pack(family, 0, index, flags, 0) + attrs)


def one(data: bytes) -> nlp.Record | None:
    records = list(nlp.messages(data, len(data)))
    assert len(records) == 1
    kind, flags, _, start, end = records[0]
    return nlp.decode(kind, flags, data, start, end)


def test_captured_address_and_routes() -> None:
    assert one(NEWADDR_V4) == nlp.AddrRec(True, 3, ipaddress.IPv4Interface("192.0.2.1/24"))
    assert one(ROUTE_LOCAL_TABLE) is None  # table 255
    connected = Route(dst=ipaddress.IPv4Network("192.0.2.0/24"), oif=3, proto=2, scope=253)
    assert one(ROUTE_CONNECTED) == nlp.RouteRec(True, False, connected)
    static = Route(dst=ipaddress.IPv4Network("198.51.100.0/24"), oif=3, gateway="192.0.2.254",
                   proto=3, priority=7)
    assert one(ROUTE_STATIC) == nlp.RouteRec(True, False, static)


def test_several_messages_in_one_datagram_and_a_truncated_tail() -> None:
    data = NEWADDR_V4 + ROUTE_CONNECTED + ROUTE_STATIC[:30]
    assert len(nlp.decode_all(data, len(data))) == 2


def test_bridge_link() -> None:
    attrs = (attr_str(nlp.IFLA_IFNAME, "br0") + attr_u32(nlp.IFLA_MTU, 1400)
             + attr(nlp.IFLA_ADDRESS, bytes.fromhex("0200000000AB"))
             + bridge_info(stp=True, delay=1499))
    rec = one(link_msg(flags=nlp.IFF_UP, attrs=attrs))
    assert rec == nlp.LinkRec(True, Link(index=5, name="br0", kind="bridge", up=True, mtu=1400,
                                         mac="02:00:00:00:00:ab", stp=True, forward_delay=15))


def test_tap_owner_group_master_and_nested_flag() -> None:
    nested = 0x8000  # NLA_F_NESTED, set by some senders
    data = attr_u32(nlp.IFLA_TUN_OWNER, 65534) + attr_u32(nlp.IFLA_TUN_GROUP, 100)
    info = attr(nlp.IFLA_LINKINFO | nested,
                attr_str(nlp.IFLA_INFO_KIND, "tun") + attr(nlp.IFLA_INFO_DATA | nested, data))
    attrs = attr_str(nlp.IFLA_IFNAME, "tap0") + attr_u32(nlp.IFLA_MASTER, 7) + info
    rec = one(link_msg(index=9, attrs=attrs))
    assert isinstance(rec, nlp.LinkRec)
    assert (rec.link.kind, rec.link.master, rec.link.tun_owner, rec.link.tun_group) == (
        "tun", 7, 65534, 100)
    assert rec.link.mtu == 0 and rec.link.mac == "" and rec.link.stp is None


def test_bridge_family_copies_and_nameless_links_are_skipped() -> None:
    name = attr_str(nlp.IFLA_IFNAME, "tap0")
    assert one(link_msg(nlp.RTM_DELLINK, family=7, attrs=name)) is None
    assert one(link_msg(attrs=attr_u32(nlp.IFLA_MTU, 1500))) is None
    rec = one(link_msg(nlp.RTM_DELLINK, attrs=name))
    assert isinstance(rec, nlp.LinkRec) and not rec.new and rec.link.index == 5


def test_ipv6_link_local_is_never_ours() -> None:
    ll = ipaddress.IPv6Address("fe80::1").packed
    body = nlp.IFADDRMSG.pack(10, 64, 0, 253, 4) + attr(nlp.IFA_ADDRESS, ll)
    assert one(message(nlp.RTM_NEWADDR, body)) is None
    gua = ipaddress.IPv6Address("2001:db8::1").packed
    body = nlp.IFADDRMSG.pack(10, 64, 0, 0, 4) + attr(nlp.IFA_ADDRESS, gua)
    assert one(message(nlp.RTM_DELADDR, body)) == nlp.AddrRec(
        False, 4, ipaddress.IPv6Interface("2001:db8::1/64"))
    rt = nlp.RTMSG.pack(10, 64, 0, 0, 254, 2, 0, 1, 0) + attr(nlp.RTA_DST, ll)
    assert one(message(nlp.RTM_NEWROUTE, rt)) is None


def test_default_route_replace_and_cloned() -> None:
    gw = ipaddress.IPv6Address("2001:db8::fe").packed
    body = (nlp.RTMSG.pack(10, 0, 0, 0, 254, 4, 0, 1, 0) + attr(nlp.RTA_GATEWAY, gw)
            + attr_u32(nlp.RTA_OIF, 2) + attr_u32(nlp.RTA_PRIORITY, 1024))
    rec = one(message(nlp.RTM_NEWROUTE, body, flags=nlp.NLM_F_REPLACE))
    assert rec == nlp.RouteRec(True, True, Route(dst=ipaddress.IPv6Network("::/0"), oif=2,
                                                 gateway="2001:db8::fe", proto=4,
                                                 priority=1024))
    cloned = nlp.RTMSG.pack(10, 0, 0, 0, 254, 4, 0, 1, nlp.RTM_F_CLONED)
    assert one(message(nlp.RTM_NEWROUTE, cloned)) is None


def test_error_with_extended_ack() -> None:
    inner = nlp.NLMSGHDR.pack(40, nlp.RTM_NEWLINK, 5, 9, 0)
    tlv = attr(nlp.NLMSGERR_ATTR_MSG, b"mtu greater than device maximum\0")
    body = struct.pack("=i", -34) + inner + tlv
    data = message(nlp.NLMSG_ERROR, body, flags=nlp.NLM_F_CAPPED | nlp.NLM_F_ACK_TLVS, seq=9)
    [(kind, flags, seq, start, end)] = nlp.messages(data, len(data))
    assert (kind, seq) == (nlp.NLMSG_ERROR, 9)
    assert nlp.decode_error(data, flags, start, end) == (34, "mtu greater than device maximum")
    ack = message(nlp.NLMSG_ERROR, struct.pack("=i", 0) + inner)
    assert nlp.decode_error(ack, 0, 16, len(ack)) == (0, "")
    err = nlp.kernel_error(34, "mtu greater than device maximum", "set mtu 9 on v0")
    assert "v0" in str(err) and "ERANGE" in str(err)


def _link(index: int, name: str, up: bool = True) -> nlp.LinkRec:
    return nlp.LinkRec(True, Link(index=index, name=name, kind=None, up=up))


def test_mirror_replace_down_and_delete() -> None:
    state = ObservedState()
    mirror = Mirror(state)
    net = ipaddress.IPv4Network("0.0.0.0/0")
    old = Route(dst=net, oif=2, gateway="192.0.2.1", proto=4)
    new = Route(dst=net, oif=3, gateway="192.0.2.9", proto=4)
    mirror.load([_link(2, "eth0"), _link(3, "br0"), nlp.RouteRec(True, False, old)])
    assert state.link("br0") is not None and state.routes == {old}
    assert mirror.apply(nlp.RouteRec(True, True, new)) and state.routes == {new}
    assert mirror.apply(_link(3, "br0", up=False)) and state.routes == set()
    iface = ipaddress.IPv4Interface("192.0.2.1/24")
    assert mirror.apply(nlp.AddrRec(True, 2, iface))
    assert not mirror.apply(nlp.AddrRec(True, 2, iface))
    assert not mirror.apply(nlp.AddrRec(False, 7, iface)) and 7 not in state.addresses
    assert mirror.update_link("eth0", master=3) and state.links[2].master == 3
    assert not mirror.update_link("nosuch", master=3)
    assert mirror.apply(nlp.LinkRec(False, Link(index=2, name="eth0", kind=None)))
    assert 2 not in state.addresses and state.link("eth0") is None
    assert not mirror.apply(nlp.LinkRec(False, Link(index=2, name="eth0", kind=None)))


def _slave_info(isolated: int) -> bytes:
    data = attr(nlp.IFLA_BRPORT_ISOLATED, bytes([isolated]))
    return attr(nlp.IFLA_LINKINFO, attr_str(nlp.IFLA_INFO_KIND, "tun")
                + attr_str(nlp.IFLA_INFO_SLAVE_KIND, "bridge")
                + attr(nlp.IFLA_INFO_SLAVE_DATA, data))


def test_bridge_port_isolation_from_the_ports_slave_data() -> None:
    attrs = attr_str(nlp.IFLA_IFNAME, "tap0") + attr_u32(nlp.IFLA_MASTER, 7)
    on = one(link_msg(index=9, attrs=attrs + _slave_info(1)))
    off = one(link_msg(index=9, attrs=attrs + _slave_info(0)))
    plain = one(link_msg(index=9, attrs=attrs))
    assert isinstance(on, nlp.LinkRec) and on.link.isolated is True and on.link.kind == "tun"
    assert isinstance(off, nlp.LinkRec) and off.link.isolated is False
    assert isinstance(plain, nlp.LinkRec) and plain.link.isolated is None


def test_bridge_family_copy_gives_the_ports_isolation() -> None:
    nested = 0x8000  # the kernel marks IFLA_PROTINFO nested
    protinfo = attr(nlp.IFLA_PROTINFO | nested, attr(nlp.IFLA_BRPORT_ISOLATED, b"\x01"))
    attrs = attr_str(nlp.IFLA_IFNAME, "tap0") + attr_u32(nlp.IFLA_MASTER, 7) + protinfo
    assert one(link_msg(family=7, index=9, attrs=attrs)) == nlp.PortRec(9, True)
    assert one(link_msg(family=7, index=9, attrs=attr_str(nlp.IFLA_IFNAME, "tap0"))) is None


def test_mirror_takes_isolation_of_known_ports_only() -> None:
    state = ObservedState()
    mirror = Mirror(state)
    mirror.apply(nlp.LinkRec(True, Link(index=9, name="tap0", kind="tun", master=7,
                                        isolated=True)))
    mirror.apply(nlp.LinkRec(True, Link(index=8, name="tap1", kind="tun")))
    assert mirror.apply(nlp.PortRec(9, False)) is True
    assert state.links[9].isolated is False
    assert mirror.apply(nlp.PortRec(9, False)) is False  # nothing new
    assert mirror.apply(nlp.PortRec(8, True)) is False  # not a port
    assert mirror.apply(nlp.PortRec(99, True)) is False


def _neigh(state: int, flags: int) -> bytes:
    body = nlp.NDMSG.pack(2, 7, state, flags, 1)  # AF_INET, ifindex 7
    body += attr(nlp.NDA_DST, bytes([10, 60, 0, 120]))
    body += attr(nlp.NDA_LLADDR, bytes.fromhex("5254006b0001"))
    return body


def test_evpn_neighbour_of_a_remote_guest_is_followed() -> None:
    # zebra installs a remote guest's MAC/IP (type-2 route) as NOARP + extern_learn.
    buf = _neigh(nlp.NUD_NOARP, nlp.NTF_EXT_LEARNED)
    rec = nlp.decode_fdb(True, buf, 0, len(buf))
    assert rec == nlp.NeighRec(True, 7, "10.60.0.120", "52:54:00:6b:00:01")
    # A static NOARP entry made by hand says nothing about a guest.
    buf = _neigh(nlp.NUD_NOARP, 0)
    assert nlp.decode_fdb(True, buf, 0, len(buf)) is None
