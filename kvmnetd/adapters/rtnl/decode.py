"""Decode rtnetlink messages into observed-state records; map kernel errors to typed ones.

Pure: no sockets here, so recorded or hand-made bytes can be fed in. Only the fields the
mirror needs are read (layouts: linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h).
The message layouts and flag constants are defined here once: the request channel
(netlink_raw), the configuration writes (netlink_config) and sock_diag (conflicts)
encode and walk messages with them.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

from kvmnetd.model.errors import (
    Busy,
    Conflict,
    InvalidArgument,
    KvmnetError,
    NoSuchPort,
    NotSupported,
    PermissionDenied,
)
from kvmnetd.model.observed import IPInterface, IPNetwork, Link, Route, Vxlan

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x200, 0x400, 0x800
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # on NLMSG_ERROR
NLMSGERR_ATTR_MSG = 1
IFF_UP = 0x1
IFA_F_NODAD = 0x02
RTN_UNICAST = 1
RTPROT_STATIC = 4
RTM_F_CLONED = 0x200
MAIN_TABLE = 254
USER_HZ = 100  # IFLA_BR_FORWARD_DELAY is in clock_t units

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_PROTINFO, IFLA_LINKINFO = (
    1, 3, 4, 10, 12, 18)
IFLA_AF_SPEC = 26
IFLA_EXT_MASK = 29
IFLA_INET_CONF = 1  # in IFLA_AF_SPEC / AF_INET: u32 per IPV4_DEVCONF_*, from 1
IPV4_DEVCONF_ARP_ACCEPT = 21
IFLA_INET6_ADDR_GEN_MODE = 8  # in IFLA_AF_SPEC / AF_INET6
IFLA_BRPORT_NEIGH_SUPPRESS = 32  # u8, like IFLA_BRPORT_ISOLATED
IFLA_VXLAN_ID, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING, IFLA_VXLAN_PORT = 1, 4, 7, 15
NDA_DST, NDA_LLADDR = 1, 2
NTF_SELF = 0x02
NTF_EXT_LEARNED = 0x10
NUD_INCOMPLETE, NUD_REACHABLE, NUD_FAILED, NUD_NOARP, NUD_PERMANENT = 0x01, 0x02, 0x20, 0x40, 0x80
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
IFLA_BRPORT_ISOLATED = 33  # u8, in IFLA_PROTINFO (AF_BRIDGE) and a port's slave data
IFLA_BR_FORWARD_DELAY, IFLA_BR_STP_STATE = 1, 5
IFLA_TUN_OWNER, IFLA_TUN_GROUP = 1, 2
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
# family, dst_len, src_len, tos, table, proto, scope, type, flags
RTMSG = struct.Struct("=BBBBBBBBI")
NLMSGERR = struct.Struct("=i")
RTA = struct.Struct("=HH")  # rtattr: len, type
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_U32 = struct.Struct("=I")
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

_LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")

Buffer = bytes | bytearray | memoryview


class LinkRec(NamedTuple):
    new: bool
    link: Link


class AddrRec(NamedTuple):
    new: bool
    ifindex: int
    iface: IPInterface


class RouteRec(NamedTuple):
    new: bool
    replace: bool  # NLM_F_REPLACE: an older route with the same key was swapped out silently
    route: Route


class PortRec(NamedTuple):
    """A bridge port's own view (an AF_BRIDGE RTM_NEWLINK): its isolated and neigh_suppress
    flags. `bridge link set ... isolated` announces itself only this way."""

    ifindex: int
    isolated: bool
    neigh_suppress: bool | None = None


class FdbRec(NamedTuple):
    """A bridge-family fdb entry (AF_BRIDGE RTM_NEWNEIGH/DELNEIGH): MAC and remote VTEP."""

    new: bool
    ifindex: int
    mac: str
    dst: str | None


class NeighRec(NamedTuple):
    """An IPv4 neighbour (ARP) entry: which MAC holds the address (new), or that none is
    known any more (not new; mac "")."""

    new: bool
    ifindex: int
    ip: str
    mac: str


Record = LinkRec | AddrRec | RouteRec | PortRec | FdbRec | NeighRec


def messages(buf: Buffer, size: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, start, end) of each message in one datagram; start is past the header."""
    off = 0
    while off + 16 <= size:
        length, kind, flags, seq, _ = NLMSGHDR.unpack_from(buf, off)
        if length < 16 or off + length > size:
            return
        yield kind, flags, seq, off + 16, off + length
        off += (length + 3) & ~3


def attrs(buf: Buffer, off: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (start, end) of its payload; the last one of a type wins."""
    out: dict[int, tuple[int, int]] = {}
    unpack = RTA.unpack_from
    while off + 4 <= end:
        length, kind = unpack(buf, off)
        if length < 4:
            break
        out[kind & _NLA_TYPE_MASK] = (off + 4, off + length)
        off += (length + 3) & ~3
    return out


def decode(kind: int, flags: int, buf: Buffer, start: int, end: int,
           port_flags: bool = True) -> Record | None:
    """One message body as a record; None for what the mirror does not follow.

    port_flags: read bridge ports' isolated and neigh_suppress flags. Without, links
    show them as None (not known): their ~40 attributes are most of a port's decoding."""
    if kind == RTM_NEWLINK or kind == RTM_DELLINK:
        if kind == RTM_NEWLINK and end - start >= IFINFOMSG.size \
                and buf[start] == socket.AF_BRIDGE:
            return decode_port(buf, start, end) if port_flags else None
        link = decode_link(buf, start, end, port_flags)
        return LinkRec(kind == RTM_NEWLINK, link) if link is not None else None
    if kind == RTM_NEWADDR or kind == RTM_DELADDR:
        addr = decode_addr(buf, start, end)
        return AddrRec(kind == RTM_NEWADDR, *addr) if addr is not None else None
    if kind == RTM_NEWROUTE or kind == RTM_DELROUTE:
        route = decode_route(buf, start, end)
        if route is None:
            return None
        return RouteRec(kind == RTM_NEWROUTE, bool(flags & NLM_F_REPLACE), route)
    if kind == RTM_NEWNEIGH or kind == RTM_DELNEIGH:
        return decode_fdb(kind == RTM_NEWNEIGH, buf, start, end)
    return None


def decode_fdb(new: bool, buf: Buffer, start: int, end: int) -> FdbRec | NeighRec | None:
    if end - start < NDMSG.size or buf[start] not in (socket.AF_BRIDGE, socket.AF_INET):
        return None  # IPv6 neighbours are not followed
    family, index, state, nflags, _ = NDMSG.unpack_from(buf, start)
    at = attrs(buf, start + NDMSG.size, end)
    mac = at.get(NDA_LLADDR)
    if family == socket.AF_INET:
        dst = at.get(NDA_DST)
        if dst is None or dst[1] - dst[0] != 4:
            return None
        # NOARP entries are static, except the ones zebra installs for guests on other
        # hosts (EVPN type-2 routes, "extern_learn"): those say who holds an address too.
        if state & NUD_NOARP and not nflags & NTF_EXT_LEARNED:
            return None
        ip = socket.inet_ntop(socket.AF_INET, bytes(buf[dst[0]:dst[1]]))
        if not new or mac is None or mac[1] - mac[0] != 6 \
                or state & (NUD_INCOMPLETE | NUD_FAILED):
            # Gone, or not (or no longer) resolved: nobody is known to hold the address.
            return NeighRec(False, index, ip, "")
        return NeighRec(True, index, ip, bytes(buf[mac[0]:mac[1]]).hex(":"))
    if mac is None or mac[1] - mac[0] != 6:
        return None
    dst = at.get(NDA_DST)
    where = None
    if dst is not None and dst[1] - dst[0] in (4, 16):
        raw = bytes(buf[dst[0]:dst[1]])
        where = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    return FdbRec(new, index, bytes(buf[mac[0]:mac[1]]).hex(":"), where)


def decode_all(buf: Buffer, size: int, port_flags: bool = True) -> list[Record]:
    out = []
    for kind, flags, _, start, end in messages(buf, size):
        rec = decode(kind, flags, buf, start, end, port_flags)
        if rec is not None:
            out.append(rec)
    return out


def _u32(buf: Buffer, span: tuple[int, int] | None) -> int | None:
    return _U32.unpack_from(buf, span[0])[0] if span is not None else None


def _u8(buf: Buffer, span: tuple[int, int] | None) -> int | None:
    return buf[span[0]] if span is not None and span[1] > span[0] else None


def _str(buf: Buffer, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_link(buf: Buffer, start: int, end: int, port_flags: bool = True) -> Link | None:
    if end - start < IFINFOMSG.size:
        return None
    family, _, index, ifflags, _ = IFINFOMSG.unpack_from(buf, start)
    # AF_BRIDGE copies (family 7) describe a port's bridge view, not the device; a port's
    # release even comes as an AF_BRIDGE RTM_DELLINK while the device lives on.
    if family != socket.AF_UNSPEC:
        return None
    at = attrs(buf, start + IFINFOMSG.size, end)
    name = at.get(IFLA_IFNAME)
    if name is None:
        return None
    kind = None
    stp = delay = owner = group = None
    isolated = suppress = vxlan = None
    info = at.get(IFLA_LINKINFO)
    if info is not None:
        sub = attrs(buf, *info)
        slave = sub.get(IFLA_INFO_SLAVE_DATA)
        if port_flags and slave is not None and sub.get(IFLA_INFO_SLAVE_KIND) is not None \
                and _str(buf, sub[IFLA_INFO_SLAVE_KIND]) == "bridge":
            port = attrs(buf, *slave)
            flag = _u8(buf, port.get(IFLA_BRPORT_ISOLATED))
            isolated = bool(flag) if flag is not None else None
            flag = _u8(buf, port.get(IFLA_BRPORT_NEIGH_SUPPRESS))
            suppress = bool(flag) if flag is not None else None
        if IFLA_INFO_KIND in sub:
            kind = _str(buf, sub[IFLA_INFO_KIND])
        data = sub.get(IFLA_INFO_DATA)
        if data is not None and kind == "bridge":
            opts = attrs(buf, *data)
            state = _u32(buf, opts.get(IFLA_BR_STP_STATE))
            stp = bool(state) if state is not None else None
            cs = _u32(buf, opts.get(IFLA_BR_FORWARD_DELAY))
            # Jiffies to clock_t can lose one tick (15 s reads as 1499).
            delay = round(cs / USER_HZ) if cs is not None else None
        elif data is not None and kind == "vxlan":
            vxlan = _vxlan(buf, attrs(buf, *data))
        elif data is not None and kind == "tun":
            opts = attrs(buf, *data)
            owner = _u32(buf, opts.get(IFLA_TUN_OWNER))
            group = _u32(buf, opts.get(IFLA_TUN_GROUP))
    arp_accept = addrgenmode = None
    spec = at.get(IFLA_AF_SPEC)
    if spec is not None and kind in ("bridge", "vxlan"):
        arp_accept, addrgenmode = _af_spec(buf, attrs(buf, *spec))
    mac = at.get(IFLA_ADDRESS)
    return Link(
        index=index,
        name=_str(buf, name),
        kind=kind,
        master=_u32(buf, at.get(IFLA_MASTER)) or None,
        up=bool(ifflags & IFF_UP),
        mtu=_u32(buf, at.get(IFLA_MTU)) or 0,
        mac=bytes(buf[mac[0]:mac[1]]).hex(":") if mac is not None else "",
        stp=stp,
        forward_delay=delay,
        tun_owner=owner,
        tun_group=group,
        isolated=isolated,
        neigh_suppress=suppress,
        vxlan=vxlan,
        arp_accept=arp_accept,
        addrgenmode=addrgenmode,
    )


def _vxlan(buf: Buffer, opts: dict[int, tuple[int, int]]) -> Vxlan:
    local = opts.get(IFLA_VXLAN_LOCAL)
    port = opts.get(IFLA_VXLAN_PORT)
    return Vxlan(
        vni=_u32(buf, opts.get(IFLA_VXLAN_ID)) or 0,
        local=socket.inet_ntop(socket.AF_INET, bytes(buf[local[0]:local[1]]))
        if local is not None and local[1] - local[0] == 4 else None,
        port=int.from_bytes(buf[port[0]:port[0] + 2], "big") if port is not None else 0,
        learning=bool(_u8(buf, opts.get(IFLA_VXLAN_LEARNING))),
    )


def _af_spec(buf: Buffer, spec: dict[int, tuple[int, int]]) -> tuple[bool | None, int | None]:
    """(arp_accept, IPv6 addr_gen_mode) of a link, as far as the kernel told them."""
    arp_accept = addrgenmode = None
    inet = spec.get(socket.AF_INET)
    if inet is not None:
        conf = attrs(buf, *inet).get(IFLA_INET_CONF)
        at = conf[0] + 4 * (IPV4_DEVCONF_ARP_ACCEPT - 1) if conf is not None else None
        if conf is not None and at is not None and at + 4 <= conf[1]:
            arp_accept = _U32.unpack_from(buf, at)[0] != 0
    inet6 = spec.get(socket.AF_INET6)
    if inet6 is not None:
        addrgenmode = _u8(buf, attrs(buf, *inet6).get(IFLA_INET6_ADDR_GEN_MODE))
    return arp_accept, addrgenmode


def decode_port(buf: Buffer, start: int, end: int) -> PortRec | None:
    _, _, index, _, _ = IFINFOMSG.unpack_from(buf, start)
    at = attrs(buf, start + IFINFOMSG.size, end)
    info = at.get(IFLA_PROTINFO)
    if info is None:
        return None
    port = attrs(buf, *info)
    flag = _u8(buf, port.get(IFLA_BRPORT_ISOLATED))
    suppress = _u8(buf, port.get(IFLA_BRPORT_NEIGH_SUPPRESS))
    if flag is None:
        return None
    return PortRec(index, bool(flag), bool(suppress) if suppress is not None else None)


def decode_addr(buf: Buffer, start: int, end: int) -> tuple[int, IPInterface] | None:
    if end - start < IFADDRMSG.size:
        return None
    family, prefixlen, _, _, index = IFADDRMSG.unpack_from(buf, start)
    at = attrs(buf, start + IFADDRMSG.size, end)
    iface: IPInterface
    if family == socket.AF_INET:
        # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on p2p links.
        span = at.get(IFA_LOCAL) or at.get(IFA_ADDRESS)
        if span is None or span[1] - span[0] != 4:
            return None
        iface = ipaddress.IPv4Interface((bytes(buf[span[0]:span[1]]), prefixlen))
    elif family == socket.AF_INET6:
        span = at.get(IFA_ADDRESS)
        if span is None or span[1] - span[0] != 16:
            return None
        iface = ipaddress.IPv6Interface((bytes(buf[span[0]:span[1]]), prefixlen))
        if iface.ip in _LINK_LOCAL6:
            return None
    else:
        return None
    return index, iface


def decode_route(buf: Buffer, start: int, end: int) -> Route | None:
    if end - start < RTMSG.size:
        return None
    family, dst_len, _, _, table, proto, scope, rtype, rflags = RTMSG.unpack_from(buf, start)
    if family == socket.AF_INET:
        width = 4
    elif family == socket.AF_INET6:
        width = 16
    else:
        return None
    if rtype != RTN_UNICAST or rflags & RTM_F_CLONED:
        return None
    at = attrs(buf, start + RTMSG.size, end)
    table = _u32(buf, at.get(RTA_TABLE)) or table
    if table != MAIN_TABLE:
        return None
    span = at.get(RTA_DST)
    dst = bytes(buf[span[0]:span[1]]) if span is not None else bytes(width)
    if len(dst) != width:
        return None
    net: IPNetwork
    if width == 4:
        net = ipaddress.IPv4Network((dst, dst_len), strict=False)
    else:
        net = ipaddress.IPv6Network((dst, dst_len), strict=False)
        if net.subnet_of(_LINK_LOCAL6):
            return None  # the kernel adds fe80::/64 on every link; never ours
    gw = at.get(RTA_GATEWAY)
    gateway = socket.inet_ntop(family, bytes(buf[gw[0]:gw[1]])) if gw is not None else None
    return Route(
        dst=net,
        oif=_u32(buf, at.get(RTA_OIF)),
        gateway=gateway,
        table=MAIN_TABLE,
        proto=proto,
        scope=scope,
        priority=_u32(buf, at.get(RTA_PRIORITY)),
    )


def decode_error(buf: Buffer, flags: int, start: int, end: int) -> tuple[int, str]:
    """(errno, extended-ack message) of an NLMSG_ERROR; errno 0 is a plain ack."""
    code = -NLMSGERR.unpack_from(buf, start)[0]
    reason = ""
    if code and flags & NLM_F_ACK_TLVS and end - start >= 20:
        inner = NLMSGHDR.unpack_from(buf, start + 4)[0]
        tlvs = start + 4 + (16 if flags & NLM_F_CAPPED else (inner + 3) & ~3)
        msg = attrs(buf, tlvs, end).get(NLMSGERR_ATTR_MSG)
        if msg is not None:
            reason = _str(buf, msg)
    return code, reason


_ERRORS: dict[int, type[KvmnetError]] = {
    errno.EEXIST: Conflict,
    errno.ENOTEMPTY: Conflict,
    errno.ENODEV: NoSuchPort,
    errno.EBUSY: Busy,
    errno.EPERM: PermissionDenied,
    errno.EACCES: PermissionDenied,
    errno.EOPNOTSUPP: NotSupported,
    errno.EINVAL: InvalidArgument,
    errno.ERANGE: InvalidArgument,
}


def kernel_error(code: int, reason: str, what: str) -> KvmnetError:
    """A typed error naming the request and the kernel's reason (its extended ack if any)."""
    generic = os.strerror(code) if code > 0 else "unknown error"
    detail = reason if reason and reason != generic else generic
    name = errno.errorcode.get(code, str(code))
    return _ERRORS.get(code, KvmnetError)(f"{what}: the kernel refused it: {detail} ({name})")
